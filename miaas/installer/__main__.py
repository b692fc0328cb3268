"""`python -m miaas.installer CLUSTER_ENV [--check] [--host NAME] [--state DIR] [uninstall [--purge]]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from miaas.installer import config as cluster_config
from miaas.installer.run import Installer, InstallError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bootstrap.sh", description="Install (or uninstall) a MIaaS cluster over SSH from one cluster file.")
    parser.add_argument("cluster_env", type=Path, help="the cluster file (bootstrap/cluster.env.example)")
    parser.add_argument("action", nargs="?", default="install", choices=["install", "uninstall"])
    parser.add_argument("--check", action="store_true", help="say what would change; change nothing")
    parser.add_argument("--host", help="(re)install or uninstall this host only")
    parser.add_argument("--state", type=Path, help="the operator's state folder: CA, credentials, secrets, "
                                                   "known_hosts, wheels (default: <cluster file>.state/)")
    parser.add_argument("--purge", action="store_true", help="uninstall: remove the data too (databases, models)")
    args = parser.parse_args(argv)
    state = args.state or args.cluster_env.with_name(args.cluster_env.name + ".state")
    try:
        cfg = cluster_config.load(args.cluster_env)
        installer = Installer(cfg, state.resolve(), only=args.host, check=args.check,
                              out=lambda line: print(line, flush=True))
        if args.action == "uninstall":
            installer.uninstall(purge=args.purge)
        else:
            installer.install()
    except cluster_config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InstallError as exc:
        print("error: " + ("\n  - ".join(["nothing more was done:", *exc.problems])), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
