"""The README's main command ends with the KMS demo (``python -m kms_proxy.demo``) against
the dev stack: every kind working and every refusal, each checked against the outcome it
must have. It runs last in this session (it creates keys and a service key)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def test_the_demo_shows_every_kind_and_refusal_as_expected(stack: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run([sys.executable, "-m", "kms_proxy.demo",
                           str(Path(stack["workdir"]) / "stack.json")],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "UNEXPECTED" not in done.stdout
    for shown in ("Software key management instance", "Hardware key management instance",
                  "External key management instance", "default master key",
                  "migrated from KMS 1.0", "Sign with an external key",
                  "An application Encrypts with the default master key"):
        assert shown in done.stdout, shown
