"""The SQLite metadata store: WAL, one connection, every write in one transaction.

Calls run on the event loop thread. They are short (a primary-key read is ~10 us, a WAL
commit with ``synchronous=NORMAL`` well under a millisecond because it does not fsync), and
a thread hop per call would cost more than it saves; BENCHMARKS.md has the figures. The
service caches keys and versions, so the encrypt path rarely reaches the store at all.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from kms_proxy.core.model import (
    Alias,
    Instance,
    InstanceType,
    Key,
    KeyVersion,
    key_from_record,
)
from kms_proxy.store.base import StoreConflict

__all__ = ["SQLiteStore"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, region TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, region TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS keys_by_account ON keys (account_id, region);
CREATE TABLE IF NOT EXISTS key_versions (
    version_id TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES keys(key_id),
    created TEXT NOT NULL, material BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS versions_by_key ON key_versions (key_id);
CREATE TABLE IF NOT EXISTS aliases (
    account_id TEXT NOT NULL, region TEXT NOT NULL, name TEXT NOT NULL,
    key_id TEXT NOT NULL REFERENCES keys(key_id), PRIMARY KEY (account_id, region, name));
CREATE INDEX IF NOT EXISTS aliases_by_key ON aliases (key_id);
CREATE TABLE IF NOT EXISTS tags (
    key_id TEXT NOT NULL REFERENCES keys(key_id), tag_key TEXT NOT NULL,
    tag_value TEXT NOT NULL, PRIMARY KEY (key_id, tag_key));
"""


def _key_json(key: Key) -> str:
    return json.dumps(asdict(key), separators=(",", ":"))


def _key(data: str) -> Key:
    return key_from_record(json.loads(data))


def _instance(data: str) -> Instance:
    raw: dict[str, Any] = json.loads(data)
    raw["type"] = InstanceType(raw["type"])
    return Instance(**raw)


class SQLiteStore:
    """A ``Store`` on one SQLite file. Use ``open``/``close`` (or ``async with``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> SQLiteStore:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash; an OS crash may lose the last
        # transactions but never corrupts the database.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store used before open()"
        return self._db

    def _write(self, statements: Sequence[tuple[str, Sequence[Any]]], *,
               first_changes_one: bool = False) -> None:
        """Run statements in one transaction. :raises StoreConflict: on a uniqueness clash,
        or when ``first_changes_one`` and the first statement changed no row."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for index, (sql, args) in enumerate(statements):
                changed = db.execute(sql, args).rowcount
                if index == 0 and first_changes_one and changed != 1:
                    raise sqlite3.IntegrityError("the row changed since it was read")
        except sqlite3.IntegrityError as exc:
            db.execute("ROLLBACK")
            raise StoreConflict(str(exc)) from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- instances ---------------------------------------------------------------------

    async def put_instance(self, instance: Instance) -> None:
        self._write([("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?)",
                      (instance.instance_id, instance.account_id, instance.region,
                       json.dumps(asdict(instance))))])

    async def get_instance(self, instance_id: str) -> Instance | None:
        row = self.db.execute("SELECT data FROM instances WHERE instance_id = ?",
                              (instance_id,)).fetchone()
        return _instance(row[0]) if row else None

    async def list_instances(self, account_id: str, region: str) -> Sequence[Instance]:
        rows = self.db.execute(
            "SELECT data FROM instances WHERE account_id = ? AND region = ? "
            "ORDER BY instance_id", (account_id, region)).fetchall()
        return [_instance(r[0]) for r in rows]

    # -- keys --------------------------------------------------------------------------

    async def create_key(self, key: Key, versions: Sequence[KeyVersion],
                         tags: Mapping[str, str], *, aliases: Sequence[Alias] = ()) -> None:
        self._write([
            ("INSERT INTO keys VALUES (?, ?, ?, ?)",
             (key.key_id, key.account_id, key.region, _key_json(key))),
            *[("INSERT INTO key_versions VALUES (?, ?, ?, ?)",
               (v.version_id, v.key_id, v.created, v.material)) for v in versions],
            *[("INSERT INTO tags VALUES (?, ?, ?)", (key.key_id, k, v))
              for k, v in tags.items()],
            *[("INSERT INTO aliases VALUES (?, ?, ?, ?)",
               (a.account_id, a.region, a.name, a.key_id)) for a in aliases],
        ])

    async def count_instance_versions(self, instance_id: str) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM key_versions JOIN keys USING (key_id) "
            "WHERE json_extract(keys.data, '$.instance_id') = ?", (instance_id,)).fetchone()
        return int(row[0])

    async def get_key(self, key_id: str) -> Key | None:
        row = self.db.execute("SELECT data FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return _key(row[0]) if row else None

    async def update_key(self, key: Key, versions: Sequence[KeyVersion] = (), *,
                         expected_revision: int) -> None:
        # Records written before revisions existed have none: revision 0.
        self._write([
            ("UPDATE keys SET data = ? WHERE key_id = ? "
             "AND COALESCE(json_extract(data, '$.revision'), 0) = ?",
             (_key_json(key), key.key_id, expected_revision)),
            *[("INSERT OR REPLACE INTO key_versions VALUES (?, ?, ?, ?)",
               (v.version_id, v.key_id, v.created, v.material)) for v in versions],
        ], first_changes_one=True)

    async def delete_key(self, key_id: str) -> None:
        self._write([(sql, (key_id,)) for sql in (
            "DELETE FROM aliases WHERE key_id = ?", "DELETE FROM tags WHERE key_id = ?",
            "DELETE FROM key_versions WHERE key_id = ?", "DELETE FROM keys WHERE key_id = ?")])

    async def all_keys(self) -> Sequence[Key]:
        return [_key(r[0]) for r in self.db.execute("SELECT data FROM keys ORDER BY rowid")]

    async def list_versions(self, key_id: str) -> Sequence[KeyVersion]:
        rows = self.db.execute(
            "SELECT key_id, version_id, created, material FROM key_versions "
            "WHERE key_id = ? ORDER BY rowid", (key_id,)).fetchall()
        return [KeyVersion(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    async def list_keys(self, account_id: str, region: str) -> Sequence[Key]:
        rows = self.db.execute(
            "SELECT data FROM keys WHERE account_id = ? AND region = ? ORDER BY rowid",
            (account_id, region)).fetchall()
        return [_key(r[0]) for r in rows]

    async def get_version(self, version_id: str) -> KeyVersion | None:
        row = self.db.execute(
            "SELECT key_id, version_id, created, material FROM key_versions "
            "WHERE version_id = ?", (version_id,)).fetchone()
        return KeyVersion(row[0], row[1], row[2], bytes(row[3])) if row else None

    # -- aliases -----------------------------------------------------------------------

    async def create_alias(self, alias: Alias) -> None:
        self._write([("INSERT INTO aliases VALUES (?, ?, ?, ?)",
                      (alias.account_id, alias.region, alias.name, alias.key_id))])

    async def update_alias(self, alias: Alias) -> bool:
        before = self.db.total_changes
        self._write([("UPDATE aliases SET key_id = ? WHERE account_id = ? AND region = ? "
                      "AND name = ?", (alias.key_id, alias.account_id, alias.region,
                                       alias.name))])
        return self.db.total_changes > before

    async def delete_alias(self, account_id: str, region: str, name: str) -> bool:
        before = self.db.total_changes
        self._write([("DELETE FROM aliases WHERE account_id = ? AND region = ? AND name = ?",
                      (account_id, region, name))])
        return self.db.total_changes > before

    async def get_alias(self, account_id: str, region: str, name: str) -> Alias | None:
        row = self.db.execute(
            "SELECT key_id FROM aliases WHERE account_id = ? AND region = ? AND name = ?",
            (account_id, region, name)).fetchone()
        return Alias(name, row[0], account_id, region) if row else None

    async def list_aliases(self, account_id: str, region: str,
                           key_id: str | None = None) -> Sequence[Alias]:
        sql = "SELECT name, key_id FROM aliases WHERE account_id = ? AND region = ?"
        args: list[str] = [account_id, region]
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        rows = self.db.execute(sql + " ORDER BY name", args).fetchall()
        return [Alias(name, kid, account_id, region) for name, kid in rows]

    # -- tags --------------------------------------------------------------------------

    async def get_tags(self, key_id: str) -> Mapping[str, str]:
        rows = self.db.execute("SELECT tag_key, tag_value FROM tags WHERE key_id = ? "
                               "ORDER BY tag_key", (key_id,)).fetchall()
        return dict(rows)

    async def get_tags_many(self, key_ids: Sequence[str]) -> Mapping[str, Mapping[str, str]]:
        found: dict[str, dict[str, str]] = {}
        # One JSON array parameter: a statement's parameter count is capped.
        rows = self.db.execute(
            "SELECT key_id, tag_key, tag_value FROM tags WHERE key_id IN "
            "(SELECT value FROM json_each(?)) ORDER BY key_id, tag_key",
            (json.dumps(list(key_ids)),)).fetchall()
        for key_id, tag_key, tag_value in rows:
            found.setdefault(key_id, {})[tag_key] = tag_value
        return found

    async def set_tags_many(self, key_ids: Sequence[str], tags: Mapping[str, str], *,
                            limit: int) -> str | None:
        existing = await self.get_tags_many(key_ids)
        for key_id in key_ids:
            if len(set(existing.get(key_id, {})) | set(tags)) > limit:
                return key_id
        self._write([("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (key_id, k, v))
                     for key_id in key_ids for k, v in tags.items()])
        return None

    async def remove_tags_many(self, key_ids: Sequence[str],
                               tag_keys: Sequence[str] | None) -> None:
        if tag_keys is None:
            self._write([("DELETE FROM tags WHERE key_id = ?", (key_id,))
                         for key_id in key_ids])
        else:
            self._write([("DELETE FROM tags WHERE key_id = ? AND tag_key = ?", (key_id, k))
                         for key_id in key_ids for k in tag_keys])
