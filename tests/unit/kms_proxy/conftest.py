"""Fixtures the KMS front's unit tests share: a real SoftHSM2 token behind the shared pool,
and the hardware backend on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kms_proxy.backends.hsm import HSMBackend
from shared.pkcs11pool import PKCS11Pool
from tests.conftest import HSMConfig

WRAP_LABEL = "kms-proxy.wrap"


@pytest.fixture
async def pool(hsm_config: HSMConfig) -> AsyncIterator[PKCS11Pool]:
    async with PKCS11Pool(hsm_config.pool()) as opened:
        yield opened


@pytest.fixture
async def hsm(pool: PKCS11Pool) -> HSMBackend:
    """The hardware backend, its wrapping key created in the token."""
    backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
    assert await backend.ensure_token_keys()
    return backend
