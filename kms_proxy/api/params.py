"""Typed parameter parsing for the Alibaba RPC edge.

Every helper raises ``MissingParameter``/``InvalidParameter`` naming the parameter, before
any side effect. JSON-valued parameters (``EncryptionContext``, ``Filters``, ``Tags``)
arrive as one JSON string each; booleans arrive as ``true``/``false`` or Python's
``True``/``False`` (the Python SDK sends the latter).
"""

from __future__ import annotations

import binascii
import json
import re
from base64 import b64decode
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final, TypeVar

from kms_proxy.core.errors import InvalidParameter, MissingParameter

__all__ = ["Params"]

E = TypeVar("E", bound=StrEnum)
MAX_CONTEXT_CHARS: Final = 8192
# RotationInterval: an integer and a unit (reference section 2.7: "7d" = "604800s").
_DURATION: Final = re.compile(r"([0-9]{1,12})([dhms])")
_UNIT_SECONDS: Final = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_INTEGER: Final = re.compile(r"-?[0-9]{1,19}")
_INDEX: Final = re.compile(r"[1-9][0-9]{0,5}")


class Params:
    """The request's business parameters (query string and form body, decoded)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def get(self, name: str) -> str | None:
        return self._values.get(name)

    def text(self, name: str, *, max_len: int = 8192) -> str:
        value = self._values.get(name)
        if value is None or value == "":
            raise MissingParameter(name)
        if len(value) > max_len:
            raise InvalidParameter(name, f"at most {max_len} characters")
        return value

    def optional_text(self, name: str, *, max_len: int = 8192) -> str | None:
        if self._values.get(name) in (None, ""):
            return None
        return self.text(name, max_len=max_len)

    def b64(self, name: str, *, max_len: int = 1 << 20) -> bytes:
        value = self.text(name, max_len=max_len)
        try:
            return b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameter(name, "not valid Base64") from None

    def integer(self, name: str, *, default: int | None, low: int, high: int) -> int | None:
        value = self._values.get(name)
        if value in (None, ""):
            return default
        # Plain ASCII digits only: int() would also take " 7", "+7", "0_7" and other
        # scripts' digits.
        if value is None or not _INTEGER.fullmatch(value):
            raise InvalidParameter(name, "not an integer")
        number = int(value)
        if not low <= number <= high:
            raise InvalidParameter(name, f"must be {low} to {high}")
        return number

    def page(self, *, default_size: int = 10) -> tuple[int, int]:
        # An Integer (int32) in the API.
        number = self.integer("PageNumber", default=1, low=1, high=(1 << 31) - 1)
        size = self.integer("PageSize", default=default_size, low=1, high=100)
        assert number is not None and size is not None
        return number, size

    def enum(self, name: str, kind: type[E], *, default: E | None = None) -> E | None:
        value = self._values.get(name)
        if value in (None, ""):
            return default
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise InvalidParameter(name, f"must be one of {allowed}") from None

    def boolean(self, name: str, *, default: bool = False) -> bool:
        value = self._values.get(name)
        if value in (None, ""):
            return default
        assert value is not None
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InvalidParameter(name, "must be true or false")

    def required_boolean(self, name: str) -> bool:
        if self._values.get(name) in (None, ""):
            raise MissingParameter(name)
        return self.boolean(name)

    def duration(self, name: str) -> int | None:
        """``<integer><d|h|m|s>`` in seconds; None when absent."""
        value = self._values.get(name)
        if value in (None, ""):
            return None
        assert value is not None
        match = _DURATION.fullmatch(value)
        if match is None:
            raise InvalidParameter(name, "an integer followed by d, h, m or s (e.g. 365d)")
        return int(match[1]) * _UNIT_SECONDS[match[2]]

    def _json(self, name: str) -> Any:
        value = self._values.get(name)
        if value in (None, ""):
            return None
        try:
            parsed = json.loads(value, object_pairs_hook=_unique_names)
            if "\\u" in value:
                # A \uD800-style escape decodes to a lone surrogate, a str that is not
                # Unicode text: it could not become UTF-8 (the AAD) or a database value.
                json.dumps(parsed, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidParameter(name, "holds a lone surrogate (\\uD800-\\uDFFF), "
                                         "not Unicode text") from None
        except _RepeatedName as exc:
            # Which value counts would be the parser's choice (the last), not the
            # caller's: an EncryptionContext pair would silently drop out of the AAD.
            raise InvalidParameter(name, f"repeats the name {str(exc)[:64]!r} in one JSON "
                                         "object") from None
        except (ValueError, RecursionError):
            # RecursionError: nesting deeper than the parser's recursion limit.
            raise InvalidParameter(name, "not valid JSON") from None
        return parsed

    def context(self, name: str = "EncryptionContext") -> dict[str, str] | None:
        """A JSON object of string to string, at most 8192 characters in all."""
        raw = self._values.get(name)
        if raw is not None and len(raw) > MAX_CONTEXT_CHARS:
            raise InvalidParameter(name, f"at most {MAX_CONTEXT_CHARS} characters")
        value = self._json(name)
        if value is None:
            return None
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise InvalidParameter(name, "must be a JSON object of string to string")
        return value

    def tags(self, name: str = "Tags") -> dict[str, str]:
        """``[{"TagKey": .., "TagValue": ..}, ..]`` as a mapping; keys must be unique."""
        value = self._json(name)
        if value is None:
            return {}
        if not isinstance(value, list):
            raise InvalidParameter(name, 'must be a JSON array of {"TagKey","TagValue"}')
        tags: dict[str, str] = {}
        for item in value:
            if (not isinstance(item, dict) or not isinstance(item.get("TagKey"), str)
                    or not isinstance(item.get("TagValue", ""), str)):
                raise InvalidParameter(name, 'each tag is {"TagKey": str, "TagValue": str}')
            if item["TagKey"] in tags:
                raise InvalidParameter(name, f"tag key {item['TagKey']!r} is repeated")
            tags[item["TagKey"]] = item.get("TagValue", "")
        return tags

    def string_list(self, name: str, *, max_items: int = 20, max_len: int = 128) -> list[str]:
        value = self._json(name)
        if value is None:
            raise MissingParameter(name)
        if (not isinstance(value, list) or not value or len(value) > max_items
                or not all(isinstance(v, str) and 1 <= len(v) <= max_len for v in value)):
            raise InvalidParameter(name, f"a JSON array of 1 to {max_items} strings of "
                                   f"1 to {max_len} characters")
        return value

    def repeated(self, name: str, *, max_items: int, max_len: int = 128) -> list[str]:
        """A list the SDK flattens into ``Name.1``, ``Name.2``, ... (RPC ``repeatList``
        style: ``ResourceId.N``, ``TagKey.N``); empty when absent."""
        items = self._numbered(name, max_items=max_items, fields=None)
        values = [item[""] for item in items]
        for index, value in enumerate(values, 1):
            if not 1 <= len(value) <= max_len:
                raise InvalidParameter(f"{name}.{index}", f"1 to {max_len} characters")
        return values

    def repeated_objects(self, name: str, fields: tuple[str, ...], *,
                         max_items: int) -> list[dict[str, str]]:
        """A list of objects flattened into ``Name.N.Field`` (``Tag.1.Key``,
        ``Tag.1.Value``); each object holds the fields it was sent with."""
        return self._numbered(name, max_items=max_items, fields=fields)

    def _numbered(self, name: str, *, max_items: int,
                  fields: tuple[str, ...] | None) -> list[dict[str, str]]:
        prefix = f"{name}."
        found: dict[int, dict[str, str]] = {}
        for param, value in self._values.items():
            if not param.startswith(prefix):
                continue
            index, dot, field = param[len(prefix):].partition(".")
            if fields is None and dot:  # "ResourceId.1." is not "ResourceId.1"
                raise InvalidParameter(param, f"{name}.N takes a value, not fields")
            if fields is not None and field not in fields:
                raise InvalidParameter(param, f"{name}.N has the fields "
                                              f"{', '.join(fields)}")
            # Decimal digits from 1, no sign or leading zero: "Tag.01" is not "Tag.1".
            if not _INDEX.fullmatch(index):
                raise InvalidParameter(param, f"{name}.N is numbered from 1")
            if int(index) > max_items:
                raise InvalidParameter(param, f"at most {max_items} items")
            found.setdefault(int(index), {})[field] = value
        if sorted(found) != list(range(1, len(found) + 1)):
            raise InvalidParameter(f"{name}.N", "numbered from 1 without gaps")
        return [found[i] for i in range(1, len(found) + 1)]

    def filters(self, name: str = "Filters") -> list[tuple[str, list[str]]]:
        """``[{"Key": .., "Values": [..]}, ..]``: at most 10 filters of at most 10 values."""
        value = self._json(name)
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > 10:
            raise InvalidParameter(name, "a JSON array of at most 10 filters")
        out = []
        for item in value:
            if (not isinstance(item, dict) or not isinstance(item.get("Key"), str)
                    or not isinstance(item.get("Values"), list) or len(item["Values"]) > 10
                    or not all(isinstance(v, str) for v in item["Values"])):
                raise InvalidParameter(name, 'each filter is {"Key": str, "Values": [str]}')
            out.append((item["Key"], list(item["Values"])))
        return out


class _RepeatedName(ValueError):
    """A JSON object names one member twice."""


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise _RepeatedName(name)
        obj[name] = value
    return obj
