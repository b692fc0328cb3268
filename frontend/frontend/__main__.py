"""`python -m frontend`: run the portal."""

from frontend.app import close_app, create_app
from frontend.settings import FrontendSettings
from miaas.serve import MULTIPART_SLACK_BYTES, configure_logging, run_service


def main() -> None:
    settings = FrontendSettings()  # type: ignore[call-arg]
    configure_logging(settings.log_level)  # before create_app, which logs the creation of the first admin
    app = create_app(settings)
    run_service("frontend", app, settings, max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
                threads=settings.threads, on_stop=lambda: close_app(app))


if __name__ == "__main__":
    main()
