"""`python -m model_registry`: run the model registry."""

from miaas.bus import KafkaBus
from miaas.serve import MULTIPART_SLACK_BYTES, run_service
from model_registry.app import create_app
from model_registry.settings import ModelRegistrySettings


def main() -> None:
    settings = ModelRegistrySettings()  # type: ignore[call-arg]
    bus = KafkaBus(settings.kafka_bootstrap, client_id="model-registry")
    app = create_app(settings, bus)
    run_service("model-registry", app, settings, on_stop=bus.close,
                max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES)


if __name__ == "__main__":
    main()
