"""The `miaas` command: run a local cluster, pack a model folder."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from miaas.package import PackError, pack_model


def cmd_up(args: argparse.Namespace) -> int:
    from miaas.cluster import LocalCluster

    agents: list[dict[str, str]] = [{} for _ in range(args.agents)]
    cluster = LocalCluster(state_dir=Path(args.state_dir), host=args.host, agents=agents)
    if args.free_ports:
        cluster.ports = {name: 0 for name in cluster.ports}
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = time.monotonic()
    print(f"starting a local MIaaS cluster in {Path(args.state_dir).resolve()} ...", flush=True)
    try:
        cluster.start(timeout=args.timeout)
    except (RuntimeError, OSError) as exc:
        print(f"error: the cluster did not start: {exc}", file=sys.stderr)
        return 1
    ready = time.monotonic() - started
    print(
        "\n".join(
            [
                f"MIaaS is ready in {ready:.1f}s",
                f"  portal:            {cluster.url('frontend')}",
                "  login:             admin / " + cluster.admin_password,
                f"  service registry:  {cluster.url('service-registry')}",
                f"  model registry:    {cluster.url('model-registry')}",
                f"  controller:        {cluster.url('controller')}",
                f"  agents:            {', '.join(cluster.url(f'agent-{i + 1}') for i in range(args.agents))}",
                f"  portal secrets:    {Path(args.state_dir).resolve() / 'secrets.env'}",
                f"  identities:        {Path(args.state_dir).resolve() / 'pki'} (CA, services, admin.json)",
                f"  logs: {Path(args.state_dir).resolve() / 'logs'}",
                "Press Ctrl-C to stop everything.",
            ]
        ),
        flush=True,
    )
    code = 0
    while not stopping:
        dead = cluster.dead()
        if dead:
            names = ", ".join(f"{p.name} (exit {p.process.returncode}, log {p.log})" for p in dead)
            print(f"error: stopped unexpectedly: {names}; stopping the cluster", file=sys.stderr)
            code = 1
            break
        time.sleep(0.5)
    print("stopping ...", flush=True)
    cluster.stop()
    print("stopped; nothing is left running.", flush=True)
    return code


def cmd_pack(args: argparse.Namespace) -> int:
    src = Path(args.folder)
    out = Path(args.output) if args.output else Path("dist") / f"{src.resolve().name}.zip"
    try:
        path = pack_model(src, out)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="miaas", description="MIaaS: models as web services.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run a local cluster until Ctrl-C")
    up.add_argument("--state-dir", default=".miaas", help="databases, model store, logs, secrets")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--agents", type=int, default=2)
    up.add_argument("--free-ports", action="store_true", help="any free ports instead of 8080, 8500, 8510, ...")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds each service has to become healthy")
    up.set_defaults(func=cmd_up)
    pack = sub.add_parser("pack", help="zip a model folder into an uploadable package")
    pack.add_argument("folder")
    pack.add_argument("-o", "--output", help="zip to write (default dist/<folder>.zip)")
    pack.set_defaults(func=cmd_pack)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
