"""`python -m agent`: run an agent on this machine."""

import logging
import os
import sys

from agent.app import create_app, parts
from agent.credential import CredentialHolder, NoCredential
from agent.settings import AgentSettings
from miaas.bus import KafkaBus
from miaas.identity import MessageSigner
from miaas.serve import run_service

log = logging.getLogger("agent")
EXIT_NO_CREDENTIAL = 2


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
            # Nothing runs yet and nothing could be signed. The server is bound but run_service closes it only
            # once it serves, and its worker threads would keep a raised SystemExit from ending the process.
            log.error("refusing to start: %s", exc.message)
            print(f"agent {settings.agent_id} refuses to start: {exc.message}", file=sys.stderr, flush=True)
            os._exit(EXIT_NO_CREDENTIAL)

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
