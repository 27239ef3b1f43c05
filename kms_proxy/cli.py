"""``kms-proxy``: serve the KMS front, verify its audit trail, run the dev stack."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    up.add_argument("--ekm-workdir", type=Path,
                    help="use the simulator `ekm-sim dev up` runs from this workdir (another "
                         "container) instead of starting one in WORKDIR/ekm")
    up.add_argument("--name", help="the host name clients use (a container's service name): "
                                   "a SAN of the front's certificate and stack.json's endpoint")
    up.add_argument("--bind", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0"),  # noqa: S104
                    help="listen on loopback, or on every interface (a container)")
    up.add_argument("--port", type=int, default=0, help="0 picks a free port")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the foreground with the front (a container's command)")
    down = dsub.add_parser("down", help="stop it")
    down.add_argument("--workdir", type=Path, required=True)
    tok = dsub.add_parser("token", help="print a service-principal JWT signed by the dev "
                                        "stack's issuer")
    tok.add_argument("--workdir", type=Path, required=True)
    tok.add_argument("--product", required=True, help="the cloud product, e.g. oss")
    tok.add_argument("--account", required=True, help="the account it acts for")
    tok.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")

    keys = sub.add_parser("keys", help="key records the API cannot make")
    ksub = keys.add_subparsers(dest="action", required=True)
    migrated = with_config(ksub.add_parser(
        "import-migrated", help="record a key migrated from KMS 1.0 (read-only metadata)"))
    migrated.add_argument("--account", required=True)
    migrated.add_argument("--key-id", required=True)
    migrated.add_argument("--key-spec", default="Aliyun_AES_256")
    migrated.add_argument("--description", default="migrated from KMS 1.0")
    migrated.add_argument("--created", default=None, help="ISO 8601 UTC creation date")
    return parser


def _import_migrated(args: argparse.Namespace) -> int:
    """Write a KMS 1.0 key's metadata straight into the store (the server need not run)."""
    import asyncio
    from datetime import UTC, datetime

    from kms_proxy.core.errors import KmsError
    from kms_proxy.core.model import KeySpec
    from kms_proxy.core.service import KeyService, ServiceConfig
    from kms_proxy.store.sqlite import SQLiteStore

    config = load(Path(args.config))
    created = args.created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def run() -> None:
        async with SQLiteStore(config.database) as store:
            service = KeyService(store=store, backends={}, config=ServiceConfig(
                region=config.region, regions=config.regions, default_instances={}))
            key = await service.import_migrated_key(
                args.account, key_id=args.key_id, spec=KeySpec(args.key_spec),
                description=args.description, created=created)
            print(json.dumps({"KeyId": key.key_id, "Arn": key.arn, "kind": key.kind.value}))

    try:
        asyncio.run(run())
    except (KmsError, ValueError) as exc:
        print(f"kms-proxy: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from kms_proxy.server import serve

            serve(load(Path(args.config)), port_file=args.port_file)
        elif args.command == "init":
            import asyncio
            import time

            from kms_proxy.app import nonce_journal
            from kms_proxy.store.sqlite import SQLiteStore

            config = load(Path(args.config))
            new_database = not config.database.exists()

            async def init() -> None:
                async with SQLiteStore(config.database):
                    pass

            asyncio.run(init())
            if new_database:
                # A new database has journaled every nonce it accepted (none): its first
                # start need not refuse requests dated before it.
                nonce_journal(config, window_us=config.max_clock_skew * 1_000_000).create(
                    time.time_ns() // 1000)
            print(f"database ready at {config.database}")
        elif args.command == "audit":
            config = load(Path(args.config))
            try:
                report = verify_chain(config.audit_log, chain_key=config.audit_chain_key)
            except OSError as exc:
                # Not a verdict on the chain (exit 1 means tampering): a read failure.
                print(f"kms-proxy: cannot read {config.audit_log}: {exc.strerror}",
                      file=sys.stderr)
                return 2
            print(json.dumps({"ok": report.ok, "events": report.events,
                              "first_bad_seq": report.first_bad_seq, "reason": report.reason,
                              "last_hash": report.last_hash}))
            return 0 if report.ok else 1
        elif args.command == "dev":
            from kms_proxy import devstack

            if args.action == "up":
                def start() -> dict[str, Any]:
                    return devstack.up(args.workdir, ekm_workdir=args.ekm_workdir,
                                       name=args.name, bind=args.bind, port=args.port,
                                       foreground=args.foreground)

                if args.foreground:
                    from shared.serving import run_in_foreground

                    def serving() -> str:
                        stack = start()
                        return (f"kms-proxy: serving at https://{stack['kms']['endpoint']}; "
                                f"{args.workdir / 'stack.json'} describes the stack")

                    return run_in_foreground(serving, ready_file=args.workdir / "stack.json",
                                             pid_file=args.workdir / devstack.PID_FILE)
                print(json.dumps(start(), indent=2))
            elif args.action == "token":
                print(devstack.token(args.workdir, product=args.product,
                                     account=args.account, ttl=args.ttl))
            else:
                devstack.down(args.workdir)
        elif args.command == "keys":
            return _import_migrated(args)
    except ConfigError as exc:
        print(f"kms-proxy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
