"""The layering holds: linalg ← capture ← curvature ← {optim, laplace, ewc, hypergrad, validate}."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "curvkit"

#: package part -> curvkit parts it may import
ALLOWED = {
    "linalg": {"linalg"},
    "capture": {"linalg", "capture"},
    "curvature": {"linalg", "capture", "curvature"},
    "testing": {"linalg", "capture", "curvature", "testing"},
}
APPLICATIONS = {"optim", "laplace", "ewc", "hypergrad", "validate"}


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("curvkit."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("curvkit."):
                    out.add(a.name.split(".")[1])
    return out


FILES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_import_direction(path):
    part = _part(path)
    imported = _imports(path) - {part}
    if part in ALLOWED:
        assert imported <= ALLOWED[part], f"{path.relative_to(ROOT)} imports {imported - ALLOWED[part]}"
    elif part in APPLICATIONS:
        other_apps = imported & (APPLICATIONS - {part})
        assert not other_apps, f"{path.relative_to(ROOT)} imports application internals {other_apps}"


HOOK_CALLS = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
              "register_backward_hook", "register_hook(")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_hooks_only_in_capture(path):
    if _part(path) == "capture":
        return
    text = path.read_text()
    found = [h for h in HOOK_CALLS if h in text]
    assert not found, f"{path.relative_to(ROOT)} registers hooks ({found}); hooks live in curvkit/capture/"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean():
    proc = subprocess.run(["ruff", "check", "curvkit"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
