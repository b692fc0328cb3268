"""`python -m agent`: run an agent on this machine."""

from agent.app import create_app, parts
from agent.credential import CredentialHolder, NoCredential
from agent.settings import AgentSettings
from miaas.bus import KafkaBus
from miaas.identity import MessageSigner
from miaas.serve import run_service


def main() -> None:
    settings = AgentSettings()  # type: ignore[call-arg]
    # One holder for everything the agent signs: filled when it starts (its file, or a join), renewed in place.
    credential = CredentialHolder()
    bus = KafkaBus(settings.kafka_bootstrap, client_id=settings.agent_id, signer=MessageSigner(credential))
    app = create_app(settings, bus, credential=credential)
    agent = parts(app)

    def on_start(url: str) -> None:
        try:
            agent.start_metrics(url)
        except NoCredential as exc:
            agent.shutdown()
            bus.close()
            raise SystemExit(f"agent {settings.agent_id} refuses to start: {exc.message}") from exc

    def on_stop() -> None:
        agent.shutdown()
        bus.close()

    run_service(
        "agent",
        app,
        settings,
        instance_id=settings.agent_id,
        metadata={"agent_id": settings.agent_id, "runtimes": settings.runtimes},
        on_start=on_start,
        on_stop=on_stop,
    )


if __name__ == "__main__":
    main()
