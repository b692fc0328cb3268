"""`python -m controller`: run the controller."""

from controller.app import create_app
from controller.settings import ControllerSettings
from miaas.bus import KafkaBus, ensure_topics
from miaas.serve import run_service


def main() -> None:
    settings = ControllerSettings()  # type: ignore[call-arg]
    ensure_topics(settings.kafka_bootstrap)
    bus = KafkaBus(settings.kafka_bootstrap, client_id="controller")
    app = create_app(settings, bus=bus)
    controller = app.extensions["controller"]
    run_service("controller", app, settings, on_start=lambda _url: controller.start(), on_stop=controller.stop)


if __name__ == "__main__":
    main()
