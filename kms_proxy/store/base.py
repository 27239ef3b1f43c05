"""The metadata store interface. Every write is one transaction: it happens whole or not at
all, so a failed request changes nothing. Implementations never hold plaintext material
(key versions carry only what the backend wrapped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from kms_proxy.core.model import Alias, Instance, Key, KeyVersion

__all__ = ["Store", "StoreConflict"]


class StoreConflict(Exception):
    """A uniqueness rule was broken (an alias that exists, a key id reused)."""


class Store(Protocol):
    async def put_instance(self, instance: Instance) -> None:
        """Create or replace an instance."""
        ...

    async def get_instance(self, instance_id: str) -> Instance | None: ...

    async def list_instances(self, account_id: str, region: str) -> Sequence[Instance]: ...

    async def create_key(self, key: Key, versions: Sequence[KeyVersion],
                         tags: Mapping[str, str], *, aliases: Sequence[Alias] = ()) -> None:
        """Insert a key with its versions (the first one at least), tags and aliases, in
        one transaction.

        :raises StoreConflict:"""
        ...

    async def get_key(self, key_id: str) -> Key | None: ...

    async def count_instance_versions(self, instance_id: str) -> int:
        """Key versions held by the keys of an instance (what its key quota counts)."""
        ...

    async def update_key(self, key: Key, versions: Sequence[KeyVersion] = (), *,
                         expected_revision: int) -> None:
        """Replace a key's metadata (its id, account and region do not change) and insert or
        replace ``versions`` of it, in one transaction, if the stored key's ``revision`` is
        still ``expected_revision``.

        :raises StoreConflict: if it is not (or the key is gone): nothing is written."""
        ...

    async def delete_key(self, key_id: str) -> None:
        """Remove a key with its versions, aliases and tags (deletion at the window's end)."""
        ...

    async def all_keys(self) -> Sequence[Key]:
        """Every key of every account and region (the lifecycle sweep reads them)."""
        ...

    async def list_versions(self, key_id: str) -> Sequence[KeyVersion]:
        """A key's versions, oldest first."""
        ...

    async def list_keys(self, account_id: str, region: str) -> Sequence[Key]: ...

    async def get_version(self, version_id: str) -> KeyVersion | None: ...

    async def create_alias(self, alias: Alias) -> None:
        """:raises StoreConflict: if the name exists in the account and region."""
        ...

    async def update_alias(self, alias: Alias) -> bool:
        """Point an existing alias elsewhere; False if it does not exist."""
        ...

    async def delete_alias(self, account_id: str, region: str, name: str) -> bool: ...

    async def get_alias(self, account_id: str, region: str, name: str) -> Alias | None: ...

    async def list_aliases(self, account_id: str, region: str,
                           key_id: str | None = None) -> Sequence[Alias]:
        """Aliases of an account and region (of one key if given), sorted by name."""
        ...

    async def get_tags(self, key_id: str) -> Mapping[str, str]: ...

    async def get_tags_many(self, key_ids: Sequence[str]) -> Mapping[str, Mapping[str, str]]:
        """Every listed key's tags (keys without tags are absent)."""
        ...

    async def set_tags_many(self, key_ids: Sequence[str], tags: Mapping[str, str], *,
                            limit: int) -> str | None:
        """Add or overwrite ``tags`` on every key in one transaction, unless one of them
        would then have more than ``limit``: that key's id is returned, nothing changed."""
        ...

    async def remove_tags_many(self, key_ids: Sequence[str],
                               tag_keys: Sequence[str] | None) -> None:
        """Remove ``tag_keys`` (every tag when None) from every key, in one transaction."""
        ...
