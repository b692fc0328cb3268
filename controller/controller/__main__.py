"""`python -m controller`: run the controller."""

from controller.app import create_app
from controller.settings import ControllerSettings
from miaas.bus import KafkaBus, ensure_topics
from miaas.serve import run_service
from miaas.trust import Trust


def main() -> None:
    settings = ControllerSettings()  # type: ignore[call-arg]
    ensure_topics(settings.kafka_bootstrap)
    app = create_app(settings)
    trust: Trust = app.extensions["miaas_trust"]
    controller = app.extensions["controller"]
    # Every event the controller publishes is signed as the controller: consumers believe nothing unsigned.
    controller.bus = KafkaBus(settings.kafka_bootstrap, client_id="controller", signer=trust.message_signer())
    run_service("controller", app, settings, on_start=lambda _url: controller.start(), on_stop=controller.stop)


if __name__ == "__main__":
    main()
