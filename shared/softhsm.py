"""SoftHSM2 token set-up for dev stacks and tests: a token directory and an initialised
token. Both services' dev tooling uses it; production tokens are set up by their owners."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

__all__ = ["SoftHSMError", "init_token", "write_softhsm_conf"]


class SoftHSMError(Exception):
    """softhsm2-util failed; the message says why (never a PIN)."""


def write_softhsm_conf(token_dir: Path, conf_path: Path) -> None:
    """A SoftHSM2 configuration whose tokens live in ``token_dir``."""
    token_dir.mkdir(parents=True, exist_ok=True)
    conf_path.write_text(
        f"directories.tokendir = {token_dir}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )


def init_token(*, label: str, user_pin: str, so_pin: str, softhsm_conf: Path | None) -> None:
    """Initialise a token with this label and PINs, unless one with the label exists.

    :raises SoftHSMError: if softhsm2-util fails.
    """
    env = dict(os.environ)
    if softhsm_conf is not None:
        env["SOFTHSM2_CONF"] = str(softhsm_conf)
    shown = subprocess.run(["softhsm2-util", "--show-slots"], env=env, capture_output=True,
                           text=True, check=False)
    if re.search(rf"^\s*Label:\s+{re.escape(label)}\s*$", shown.stdout, re.M):
        return
    if not so_pin or not user_pin:
        raise SoftHSMError("an SO PIN and a user PIN are needed to initialise a token")
    # softhsm2-util takes the PINs as arguments; this runs once, at set-up, on a dev token.
    done = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--so-pin", so_pin, "--pin", user_pin],
        env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SoftHSMError(f"softhsm2-util --init-token failed: {done.stderr.strip()}")
