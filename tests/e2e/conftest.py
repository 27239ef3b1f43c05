"""One dev stack (``kms-proxy dev up``: real subprocesses) for every e2e test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from alibabacloud_kms20160120.client import Client

from tests.e2e.stacktools import run, sdk_for


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("stack")
    info = json.loads(run("dev", "up", "--workdir", str(workdir)))
    try:
        yield {**info, "workdir": workdir}
    finally:
        run("dev", "down", "--workdir", str(workdir))


@pytest.fixture(scope="session")
def sdk(stack: dict[str, Any]) -> Client:
    return sdk_for(stack)
