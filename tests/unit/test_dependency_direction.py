"""The packages' dependency direction, checked on the source with ``ast``.

``shared`` is imported by both sides and imports neither; the EKM simulator and the KMS
front never import each other; the pure domain modules stay free of the web framework; and
only the modules that own PKCS#11 sessions or objects import ``pkcs11``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "ekm_sim", "kms_proxy")


@dataclass(frozen=True)
class Rule:
    """Files matching ``applies_to`` (paths relative to ROOT; a trailing '/' = a package)
    must not import ``forbidden`` (top-level module names), except files in ``allowed``."""

    name: str
    applies_to: tuple[str, ...]
    forbidden: frozenset[str]
    allowed: tuple[str, ...] = ()


RULES = [
    Rule("shared imports neither side", ("shared/",), frozenset({"ekm_sim", "kms_proxy"})),
    Rule("ekm_sim does not import kms_proxy", ("ekm_sim/",), frozenset({"kms_proxy"})),
    Rule("kms_proxy does not import ekm_sim", ("kms_proxy/",), frozenset({"ekm_sim"})),
    Rule("domain modules and shared/ stay free of aiohttp",
         ("ekm_sim/keystore.py", "ekm_sim/registry.py", "ekm_sim/errors.py", "shared/",
          "kms_proxy/core/", "kms_proxy/backends/", "kms_proxy/store/"),
         frozenset({"aiohttp"}),
         # Running an app until a signal is what shared/serving is for, and answering what
         # aiohttp cannot parse shared/unparsable's; the XKS client is the one backend
         # part that speaks HTTP (as a client, never aiohttp.web).
         allowed=("shared/serving.py", "shared/unparsable.py",
                  "kms_proxy/backends/xks_client.py")),
    Rule("only the PKCS#11 owners import pkcs11",
         ("shared/", "ekm_sim/", "kms_proxy/"),
         frozenset({"pkcs11"}),
         allowed=("shared/pkcs11pool.py", "ekm_sim/keystore.py", "ekm_sim/admin.py",
                  "kms_proxy/backends/hsm.py")),
]


def python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir()
                  for p in (ROOT / pkg).rglob("*.py"))


def _module_of(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, anywhere in the file (also in functions
    and ``TYPE_CHECKING`` blocks); relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path)[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            # "from pkg import sub" may import the submodule pkg.sub.
            found.update(f"{prefix}.{alias.name}" if prefix else alias.name
                         for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
              in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m and m != "__future__"}


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in patterns)


def violations(rule: Rule) -> list[str]:
    out = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        if not _matches(rel, rule.applies_to) or _matches(rel, rule.allowed):
            continue
        bad = top_level(imported_modules(path)) & rule.forbidden
        out.extend(f"{rel} imports {name}" for name in sorted(bad))
    return out


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_dependency_rule(rule: Rule) -> None:
    assert violations(rule) == []


# ---------------------------------------------------- the checker itself must not be vacuous


def test_the_packages_are_found() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in python_files()}
    for expected in ("shared/xks.py", "shared/sigv4.py", "shared/pkcs11pool.py",
                     "ekm_sim/app.py", "ekm_sim/keystore.py", "ekm_sim/registry.py",
                     "ekm_sim/errors.py", "ekm_sim/admin.py"):
        assert expected in files


def test_the_rules_name_existing_files() -> None:
    for rule in RULES:
        for pattern in (*rule.applies_to, *rule.allowed):
            if pattern.endswith("/"):
                assert (ROOT / pattern).is_dir(), pattern
            else:
                assert (ROOT / pattern).is_file(), pattern


def test_checker_sees_known_imports() -> None:
    assert "aiohttp" in top_level(imported_modules(ROOT / "ekm_sim/app.py"))
    assert "pkcs11" in top_level(imported_modules(ROOT / "shared/pkcs11pool.py"))
    assert "shared" in top_level(imported_modules(ROOT / "ekm_sim/config.py"))
    # sign_request imports botocore inside the function body.
    assert "botocore.auth" in imported_modules(ROOT / "shared/sigv4.py")


def test_checker_catches_each_import_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    pkg = tmp_path / "shared"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(
        "import os\n"
        "import ekm_sim.app as app\n"
        "from kms_proxy import client\n"
        "from . import sibling\n"
        "from .. import ekm_sim\n"
        "def f():\n"
        "    import aiohttp.web\n"
        "    from pkcs11 import Attribute\n"
        "    return __import__('importlib').import_module('kms_proxy.x')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imported_modules(pkg / "bad.py")
    assert {"os", "ekm_sim.app", "kms_proxy", "kms_proxy.client", "shared",
            "shared.sibling", "ekm_sim", "aiohttp.web", "pkcs11", "importlib",
            "kms_proxy.x"} <= found
    assert violations(RULES[0]) == ["shared/bad.py imports ekm_sim",
                                    "shared/bad.py imports kms_proxy"]
    assert violations(RULES[3]) == ["shared/bad.py imports aiohttp"]
    assert violations(RULES[4]) == ["shared/bad.py imports pkcs11"]
