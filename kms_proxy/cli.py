"""``kms-proxy``: serve the KMS front, verify its audit trail, run the dev stack."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kms_proxy.config import ConfigError, load
from kms_proxy.core.audit import verify_chain

DEFAULT_CONFIG = "kms-proxy.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms-proxy",
        description="KMS front speaking the Alibaba Cloud KMS OpenAPI (2016-01-20).")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=os.environ.get("KMS_PROXY_CONFIG", DEFAULT_CONFIG),
                       help="TOML configuration (env KMS_PROXY_CONFIG; default %(default)s)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the front"))
    serve.add_argument("--port-file", type=Path, help="write the bound port here")
    with_config(sub.add_parser("init", help="check the config and create the database"))
    audit = sub.add_parser("audit", help="the audit trail")
    asub = audit.add_subparsers(dest="action", required=True)
    with_config(asub.add_parser("verify", help="verify the audit log's hash chain"))

    dev = sub.add_parser("dev", help="the whole local stack (EKM simulator + front)")
    dsub = dev.add_subparsers(dest="action", required=True)
    up = dsub.add_parser("up", help="start it; writes WORKDIR/stack.json")
    up.add_argument("--workdir", type=Path, required=True)
    down = dsub.add_parser("down", help="stop it")
    down.add_argument("--workdir", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from kms_proxy.server import serve

            serve(load(Path(args.config)), port_file=args.port_file)
        elif args.command == "init":
            import asyncio

            from kms_proxy.store.sqlite import SQLiteStore

            config = load(Path(args.config))

            async def init() -> None:
                async with SQLiteStore(config.database):
                    pass

            asyncio.run(init())
            print(f"database ready at {config.database}")
        elif args.command == "audit":
            config = load(Path(args.config))
            report = verify_chain(config.audit_log, chain_key=config.audit_chain_key)
            print(json.dumps({"ok": report.ok, "events": report.events,
                              "first_bad_seq": report.first_bad_seq, "reason": report.reason,
                              "last_hash": report.last_hash}))
            return 0 if report.ok else 1
        elif args.command == "dev":
            from kms_proxy import devstack

            if args.action == "up":
                print(json.dumps(devstack.up(args.workdir), indent=2))
            else:
                devstack.down(args.workdir)
    except ConfigError as exc:
        print(f"kms-proxy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
