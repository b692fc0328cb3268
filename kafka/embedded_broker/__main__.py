"""`python -m embedded_broker [--host H] [--port P]`: run the embedded broker until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from embedded_broker.launcher import EmbeddedBroker


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the embedded Kafka-compatible broker (Tansu).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9092, help="0 picks a free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with EmbeddedBroker(args.host, args.port) as broker:
        print(f"broker ready at {broker.bootstrap}", flush=True)
        while not done.wait(1.0):
            if broker.process is not None and broker.process.poll() is not None:
                raise SystemExit(f"broker exited with code {broker.process.returncode}")


if __name__ == "__main__":
    main()
