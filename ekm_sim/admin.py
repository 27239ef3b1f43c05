"""Key management for the simulator (the XKS API has none): token set-up and key lifecycle.

Keys are AES-256 secret keys in the token, ``CKA_SENSITIVE`` and not extractable. Every
version of a key is its own token object with the key id as ``CKA_LABEL`` and the version as
``CKA_ID``; usage is ``CKA_ENCRYPT``/``CKA_DECRYPT``, so the HSM itself refuses what a key may
not do. Lifecycle state (enabled, versions) is in the registry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, KeyType, ObjectClass

from ekm_sim.config import HSMConfig
from ekm_sim.keystore import key_version_id
from ekm_sim.registry import KeyRecord, KeyRegistry, RegistryError
from shared import softhsm
from shared.pkcs11pool import PKCS11Pool, SessionContext
from shared.softhsm import write_softhsm_conf
from shared.xks import EXTERNAL_KEY_ID

__all__ = ["AdminError", "KeyAdmin", "KeyUsage", "init_token", "write_softhsm_conf"]


class AdminError(Exception):
    """A management request cannot be carried out; the message says why."""


@dataclass(frozen=True, slots=True)
class KeyUsage:
    encrypt: bool = True
    decrypt: bool = True

    def names(self) -> list[str]:
        return [n for n, on in (("ENCRYPT", self.encrypt), ("DECRYPT", self.decrypt)) if on]


def init_token(hsm: HSMConfig) -> None:
    """Initialise the configured token unless it exists. :raises AdminError:"""
    try:
        softhsm.init_token(label=hsm.token_label, user_pin=hsm.user_pin, so_pin=hsm.so_pin,
                           softhsm_conf=hsm.softhsm_conf)
    except softhsm.SoftHSMError as exc:
        raise AdminError(str(exc)) from None


def _template(usage: KeyUsage) -> dict[Any, Any]:
    return {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.PRIVATE: True,
        Attribute.ENCRYPT: usage.encrypt,
        Attribute.DECRYPT: usage.decrypt,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KeyAdmin:
    """Create, rotate, enable, disable, delete and list keys in one token and registry."""

    def __init__(self, pool: PKCS11Pool, registry: KeyRegistry) -> None:
        self._pool = pool
        self._registry = registry

    async def _generate(self, key_id: str, version: int, usage: KeyUsage) -> None:
        def generate(ctx: SessionContext) -> None:
            ctx.session.generate_key(KeyType.AES, 256, label=key_id,
                                     id=key_version_id(version), store=True,
                                     template=_template(usage))

        await self._pool.run(generate)

    async def ensure_test_key(self, label: str) -> None:
        """Create the health check's key (never listed, never in a store) if it is missing."""
        def exists(ctx: SessionContext) -> bool:
            return bool(list(ctx.session.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})))

        if not await self._pool.run(exists):
            await self._generate(label, 1, KeyUsage())

    async def _in_token(self, key_id: str) -> int:
        def count(ctx: SessionContext) -> int:
            return len(list(ctx.session.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_id})))

        return await self._pool.run(count)

    async def create(self, key_id: str, usage: KeyUsage, *, enabled: bool = True) -> KeyRecord:
        """:raises AdminError: for a bad or taken key id (in the registry, or in the token:
        the health check's key, or objects a failed change left behind)."""
        if not EXTERNAL_KEY_ID.fullmatch(key_id):
            raise AdminError("a key id is 1-128 characters of [A-Za-z0-9._-], not . or ..")
        async with self._registry.changing() as records:
            if key_id in records:
                raise AdminError(f"key {key_id!r} exists already")
            if await self._in_token(key_id):
                raise AdminError(f"the token already holds objects labelled {key_id!r} "
                                 "(the health check's key, or a key made outside this "
                                 "registry)")
            await self._generate(key_id, 1, usage)
            record = KeyRecord(key_id=key_id, enabled=enabled, versions=(1,), created=_now())
            with self._registry.edit() as editing:
                editing[key_id] = record
        return record

    async def usage(self, key_id: str, version: int) -> KeyUsage:
        def read(ctx: SessionContext) -> KeyUsage:
            key = ctx.secret_key(key_id, key_version_id(version))
            return KeyUsage(encrypt=bool(key[Attribute.ENCRYPT]),
                            decrypt=bool(key[Attribute.DECRYPT]))

        return await self._pool.run(read)

    async def rotate(self, key_id: str) -> KeyRecord:
        """Add a new version with the same usage; old versions still decrypt.

        :raises AdminError: if the key does not exist.
        """
        # One change at a time across processes: the next version is decided, made in the
        # token and recorded under one lock.
        async with self._registry.changing() as records:
            record = _require(records, key_id)
            usage = await self.usage(key_id, record.current_version)
            version = record.current_version + 1
            await self._generate(key_id, version, usage)
            with self._registry.edit() as editing:
                current = editing[key_id]
                if version in current.versions:  # Cannot happen under the lock; never write it.
                    raise AdminError(f"key {key_id!r} has a version {version} already")
                editing[key_id] = record = KeyRecord(
                    key_id=key_id, enabled=current.enabled,
                    versions=(*current.versions, version), created=current.created)
        return record

    async def set_enabled(self, key_id: str, enabled: bool) -> KeyRecord:
        # Through ``changing`` like every admin change: the registry's own (blocking) lock
        # is then re-entered, never waited for on the event loop.
        async with self._registry.changing():
            try:
                return self._registry.set_enabled(key_id, enabled)
            except RegistryError as exc:
                raise AdminError(str(exc)) from None

    async def delete(self, key_id: str) -> int:
        """Destroy every version of a key in the token; returns how many objects went.

        :raises AdminError: if the key does not exist.
        """
        def destroy(ctx: SessionContext) -> int:
            objects = list(ctx.session.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_id}))
            for obj in objects:
                obj.destroy()
            ctx.forget_keys()
            return len(objects)

        async with self._registry.changing() as records:
            _require(records, key_id)
            with self._registry.edit() as editing:
                del editing[key_id]
            return await self._pool.run(destroy)

    async def list(self) -> list[tuple[KeyRecord, KeyUsage]]:
        out = []
        for record in sorted(self._registry.records().values(), key=lambda r: r.key_id):
            out.append((record, await self.usage(record.key_id, record.current_version)))
        return out


def _require(records: Mapping[str, KeyRecord], key_id: str) -> KeyRecord:
    record = records.get(key_id)
    if record is None:
        raise AdminError(f"no key {key_id!r}")
    return record
