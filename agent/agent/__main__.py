"""`python -m agent`: run an agent on this machine."""

from agent.app import create_app, parts
from agent.settings import AgentSettings
from miaas.bus import KafkaBus
from miaas.serve import run_service


def main() -> None:
    settings = AgentSettings()  # type: ignore[call-arg]
    bus = KafkaBus(settings.kafka_bootstrap, client_id=settings.agent_id)
    app = create_app(settings, bus)
    agent = parts(app)

    def on_stop() -> None:
        agent.shutdown()
        bus.close()

    run_service(
        "agent",
        app,
        settings,
        instance_id=settings.agent_id,
        metadata={"agent_id": settings.agent_id, "runtimes": settings.runtimes},
        on_start=agent.start_metrics,
        on_stop=on_stop,
    )


if __name__ == "__main__":
    main()
