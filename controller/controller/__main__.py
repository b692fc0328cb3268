"""`python -m controller`: run the controller."""

from controller.app import create_app
from controller.leader import RegisterWhileLeading
from controller.service import Controller
from controller.settings import ControllerSettings
from miaas.bus import KafkaBus, ensure_topics
from miaas.discovery import Registration
from miaas.serve import run_service
from miaas.trust import Trust


def main() -> None:
    settings = ControllerSettings()  # type: ignore[call-arg]
    ensure_topics(settings.kafka_bootstrap)
    app = create_app(settings)
    trust: Trust = app.extensions["miaas_trust"]
    controller: Controller = app.extensions["controller"]
    # Every event the controller publishes is signed as the controller: consumers believe nothing unsigned.
    controller.bus = KafkaBus(settings.kafka_bootstrap, client_id="controller", signer=trust.message_signer())
    registry_url = settings.service_registry_url
    registered: RegisterWhileLeading | None = None

    def start(url: str) -> None:
        nonlocal registered
        controller.leader.url = url  # the URL the lease names, for a standby's refusals and GET /controller/leader
        if registry_url:
            # Only the leader is listed as `controller`: a standby is listed once it takes over.
            registered = RegisterWhileLeading(lambda: Registration(
                registry_url, trust.credential, name="controller", url=url,
                instance_id=settings.controller_id.replace(":", "-"), interval_s=settings.heartbeat_interval_s))
            controller.leader.listeners.append(registered.on_role)
        controller.start()

    def stop() -> None:
        controller.stop()
        if registered is not None:
            registered.stop()

    # run_service registers nothing: the registration follows the lease (above).
    run_service("controller", app, settings.model_copy(update={"service_registry_url": None}), on_start=start,
                on_stop=stop)


if __name__ == "__main__":
    main()
