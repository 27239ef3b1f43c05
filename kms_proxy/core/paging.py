"""One page of a listing (PageNumber/PageSize, as every Alibaba List* action pages)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Page", "page"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    page_number: int
    page_size: int
    total: int


def page(items: Sequence[T], number: int, size: int) -> Page[T]:
    start = (number - 1) * size
    return Page(items=items[start:start + size], page_number=number, page_size=size,
                total=len(items))
