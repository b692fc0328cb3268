"""`python -m model_registry`: run the model registry; `python -m model_registry adopt-store`: rebuild an empty
database from the model store (see model-registry/README.md)."""

from __future__ import annotations

import argparse
import sys

from miaas.bus import EventBus, KafkaBus
from miaas.serve import MULTIPART_SLACK_BYTES, run_service
from miaas.trust import Trust
from model_registry.adopt import AdoptionRefused, adopt_store
from model_registry.app import create_app, registry_trust
from model_registry.ownership import StoreRefused
from model_registry.settings import ModelRegistrySettings

REFUSED = 2


def main(
    argv: list[str] | None = None, settings: ModelRegistrySettings | None = None, bus: EventBus | None = None
) -> None:
    """The command line; `settings` and `bus` default to the environment's and Kafka, its messages signed with the
    registry's credential (given by tests)."""
    parser = argparse.ArgumentParser(prog="python -m model_registry", description="the MIaaS model registry")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the registry (the default)")
    adopt = commands.add_parser(
        "adopt-store", help="rebuild an empty database (MODEL_REGISTRY_DATABASE_URL) from the versions in the model "
                            "store (MODEL_STORE), verifying each against its MANIFEST.json; changes nothing if any "
                            "does not verify")
    adopt.add_argument("--name", action="append", default=[], metavar="MODEL_ID=NAME",
                       help="name a model whose versions carry no record of its name (repeatable)")
    args = parser.parse_args(argv)
    settings = settings or ModelRegistrySettings()  # type: ignore[call-arg]
    if args.command == "adopt-store":
        _adopt(settings, args.name, parser)
    else:
        _serve(settings, bus)


def event_bus(settings: ModelRegistrySettings, trust: Trust) -> KafkaBus:
    """The registry's publisher of model-events: every message signed with the registry's own credential."""
    return KafkaBus(settings.kafka_bootstrap, client_id="model-registry", signer=trust.message_signer())


def _serve(settings: ModelRegistrySettings, given: EventBus | None) -> None:
    trust = registry_trust(settings)
    bus = given or event_bus(settings, trust)
    close = bus.close
    try:
        app = create_app(settings, bus, trust=trust)
    except StoreRefused as exc:
        close()
        print(f"model-registry: refusing to start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(REFUSED) from None
    run_service("model-registry", app, settings, on_stop=close,
                max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES)


def _adopt(settings: ModelRegistrySettings, given: list[str], parser: argparse.ArgumentParser) -> None:
    names: dict[str, str] = {}
    for pair in given:
        model_id, sep, name = pair.partition("=")
        if not sep or not model_id or not name:
            parser.error(f"--name takes MODEL_ID=NAME, not {pair!r}")
        names[model_id] = name
    try:
        done = adopt_store(settings, names=names)
    except AdoptionRefused as exc:
        print(f"model-registry adopt-store: refused: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(REFUSED) from None
    for warning in done.warnings:
        print(f"warning: {warning}", flush=True)
    print(f"adopted the model store {settings.model_store} (store id {done.store_id}): {done.models} models, "
          f"{done.versions} versions; start the registry as usual", flush=True)


if __name__ == "__main__":
    main()
