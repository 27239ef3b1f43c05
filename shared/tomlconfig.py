"""TOML configuration with environment overrides, checked once with errors naming fields.

Both services use it. An environment variable overrides any value by its path, upper case,
joined by double underscores after the service's prefix: ``EKM_SIM__SERVER__PORT=9443``,
``KMS_PROXY__ACCOUNTS__0__ACCESS_KEYS__1__SECRET=...``. A value is read as a TOML literal
when it parses as one (numbers, booleans, arrays) and as a string otherwise. Nothing reads
``os.environ`` after ``read_toml``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "TableReader", "apply_env", "read_toml"]


class ConfigError(ValueError):
    """A configuration value is missing or invalid. The message names the field."""


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """Overlay ``<PREFIX>A__B=...`` variables onto the parsed TOML tree.

    :raises ConfigError: for a variable whose path does not fit the tree.
    """
    for name, raw in env.items():
        if not name.startswith(prefix):
            continue
        path = [p.lower() for p in name[len(prefix):].split("__")]
        try:
            _set_path(data, path, _parse_env_value(raw))
        except (ValueError, TypeError, IndexError):
            raise ConfigError(f"{name} does not name a value of the configuration "
                              "(tables by name, arrays by index)") from None
    return data


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            index = int(part)
            while len(node) <= index:
                node.append({})
            node = node[index]
        elif isinstance(node, dict):
            node = node.setdefault(part, [] if path[i + 1].isdigit() else {})
        else:
            raise TypeError("a scalar has no members")
    last = path[-1]
    if isinstance(node, list):
        index = int(last)
        while len(node) <= index:
            node.append(None)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise TypeError("a scalar has no members")


class TableReader:
    """Typed access to one TOML table; every error names the field."""

    def __init__(self, data: Any, where: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'} must be a table")
        self.data, self.where, self.base = data, where, base

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise ConfigError(f"{self._name(key)} is required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and isinstance(value, int) and not isinstance(value, bool):
            # EKM_SIM__HSM__USER_PIN=1234 parses as a TOML integer; a PIN is still text.
            value = str(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self._name(key)} must be a {kind.__name__}")
        return value

    def path(self, key: str, *, required: bool = False) -> Path | None:
        value = self.get(key, str, required=required)
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else (self.base / p).resolve()

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._name(key)} must be a list of strings")
        return tuple(value)

    def table(self, key: str) -> TableReader:
        return TableReader(self.data.get(key, {}), self._name(key), self.base)

    def check(self, ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{self._name(key)} {why}")


def read_toml(path: Path, prefix: str, env: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """Parse ``path`` and overlay ``prefix``-ed environment variables.

    :raises ConfigError: if the file is unreadable or a variable does not fit.
    """
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return apply_env(data, os.environ if env is None else env, prefix)
