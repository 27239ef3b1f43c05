"""``ekm-sim``: set up a token, manage keys, serve, and run a ready dev simulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ekm_sim.admin import AdminError, KeyAdmin, KeyUsage, init_token
from ekm_sim.config import Config, ConfigError, load
from ekm_sim.registry import KeyRegistry, RegistryError
from shared.pkcs11pool import HSMError, PKCS11Pool
from shared.serving import run_in_foreground

DEFAULT_CONFIG = "ekm-sim.toml"


def _config(args: argparse.Namespace) -> Config:
    return load(Path(args.config))


async def _with_admin(config: Config, action: str, args: argparse.Namespace) -> None:
    if config.hsm.softhsm_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(config.hsm.softhsm_conf)
    async with PKCS11Pool(config.hsm.pool()) as pool:
        admin = KeyAdmin(pool, KeyRegistry(config.registry))
        if action == "init":
            await admin.ensure_test_key(config.health.test_key)
            print(f"token {config.hsm.token_label!r} ready; health test key present")
        elif action == "create":
            usage = KeyUsage(encrypt=args.usage in ("both", "encrypt"),
                             decrypt=args.usage in ("both", "decrypt"))
            record = await admin.create(args.key_id, usage, enabled=not args.disabled)
            print(f"created {record.key_id} version 1 usage={','.join(usage.names()) or '-'}")
        elif action == "list":
            rows = await admin.list()
            if args.json:
                print(json.dumps([{**r.to_json(), "usage": u.names()} for r, u in rows]))
            for record, usage in rows if not args.json else []:
                print(f"{record.key_id:32} {'enabled ' if record.enabled else 'disabled'} "
                      f"v{record.current_version} versions={list(record.versions)} "
                      f"usage={','.join(usage.names()) or '-'}")
        elif action == "rotate":
            record = await admin.rotate(args.key_id)
            print(f"rotated {record.key_id}: now version {record.current_version}")
        elif action in ("enable", "disable"):
            record = await admin.set_enabled(args.key_id, action == "enable")
            print(f"{record.key_id} {'enabled' if record.enabled else 'disabled'}")
        elif action == "delete":
            count = await admin.delete(args.key_id)
            print(f"deleted {args.key_id} ({count} token objects destroyed)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ekm-sim",
        description="EKM simulator: XKS Proxy API v1 over TLS/mTLS with SigV4, keys in a "
                    "SoftHSM2 token.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=os.environ.get("EKM_SIM_CONFIG", DEFAULT_CONFIG),
                       help="TOML configuration (env EKM_SIM_CONFIG; default %(default)s)")
        return p

    with_config(sub.add_parser(
        "init", help="initialise the configured SoftHSM token and its health-check key"))

    keys = sub.add_parser("keys", help="manage keys (create, list, enable, disable, "
                                       "rotate, delete)")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = with_config(ksub.add_parser("create", help="create an AES-256 key"))
    create.add_argument("key_id")
    create.add_argument("--usage", choices=("both", "encrypt", "decrypt", "none"),
                        default="both", help="CKA_ENCRYPT/CKA_DECRYPT (default both)")
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    listing = with_config(ksub.add_parser("list", help="list keys"))
    listing.add_argument("--json", action="store_true")
    for name, text in (("enable", "enable a key"), ("disable", "disable a key"),
                       ("rotate", "add a new key version; old ciphertexts still decrypt"),
                       ("delete", "destroy every version of a key")):
        with_config(ksub.add_parser(name, help=text)).add_argument("key_id")

    serve = with_config(sub.add_parser("serve", help="run the XKS server"))
    serve.add_argument("--port-file", type=Path,
                       help="write the bound port here once listening")
    serve.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)

    certs = sub.add_parser("certs", help="create a dev CA, a server and a client certificate")
    certs.add_argument("--out", type=Path, default=Path("certs/out"))
    certs.add_argument("--san", action="append", default=None,
                       help="server certificate SAN (repeatable; default localhost, 127.0.0.1)")
    certs.add_argument("--client-cn", default="kms-proxy.dev.internal")

    dev = sub.add_parser("dev", help="a ready simulator in the background for humans and tests")
    dsub = dev.add_subparsers(dest="action", required=True)
    up = dsub.add_parser("up", help="set up and start; writes WORKDIR/ekm.json")
    up.add_argument("--workdir", type=Path, required=True)
    up.add_argument("--port", type=int, default=0, help="0 picks a free port")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--name", help="the host name clients use (a container's service name): "
                                   "a SAN of the server certificate and ekm.json's url")
    up.add_argument("--bind", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0"),  # noqa: S104
                    help="listen on loopback, or on every interface (a container)")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the foreground with the server (a container's command)")
    down = dsub.add_parser("down", help="stop the simulator started by dev up")
    down.add_argument("--workdir", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from ekm_sim.server import serve

            serve(_config(args), config_path=Path(args.config), port_file=args.port_file,
                  worker_port=args.worker_port)
        elif args.command == "init":
            config = _config(args)
            init_token(config.hsm)
            asyncio.run(_with_admin(config, "init", args))
        elif args.command == "keys":
            asyncio.run(_with_admin(_config(args), args.action, args))
        elif args.command == "certs":
            from ekm_sim.devstack import make_certs

            paths = make_certs(args.out, sans=args.san or ["localhost", "127.0.0.1"],
                               client_cn=args.client_cn)
            print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        elif args.command == "dev":
            from ekm_sim import devstack

            if args.action == "up":
                def start() -> dict[str, object]:
                    return devstack.up(args.workdir, port=args.port, workers=args.workers,
                                       name=args.name, bind=args.bind,
                                       foreground=args.foreground)

                if args.foreground:
                    return run_in_foreground(
                        lambda: f"ekm-sim: serving at {start()['url']}",
                        ready_file=args.workdir / "ekm.json",
                        pid_file=args.workdir / devstack.PID_FILE)
                print(json.dumps(start(), indent=2))
            else:
                devstack.down(args.workdir)
    except (ConfigError, AdminError, RegistryError, HSMError) as exc:
        print(f"ekm-sim: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
