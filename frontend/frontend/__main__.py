"""`python -m frontend`: run the portal."""

from frontend.app import create_app
from frontend.settings import FrontendSettings
from miaas.serve import MULTIPART_SLACK_BYTES, configure_logging, run_service


def main() -> None:
    settings = FrontendSettings()  # type: ignore[call-arg]
    configure_logging(settings.log_level)  # before create_app, which logs the creation of the first admin
    run_service("frontend", create_app(settings), settings,
                max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES)


if __name__ == "__main__":
    main()
