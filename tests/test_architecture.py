"""The layering holds: linalg ← capture ← curvature ← {optim, laplace, ewc, hypergrad, validate}."""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "curvkit"

#: package part -> curvkit parts it may import
#: (``typing`` holds only the Literal option types and imports nothing from curvkit)
ALLOWED = {
    "typing": set(),
    "linalg": {"linalg", "typing"},
    "capture": {"linalg", "capture", "typing"},
    "curvature": {"linalg", "capture", "curvature", "typing"},
    "testing": {"linalg", "capture", "curvature", "testing", "typing"},
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


#: Applications reach capture only through curvature (``curvkit.curvature.streaming``).
CAPTURE_FREE = {"optim", "ewc", "hypergrad", "validate"}
#: Factorisations and solves belong to linalg (and the dense references of testing); every other
#: part of curvkit composes linalg's operators and helpers instead.
FACTORISATION_ALLOWED = {"linalg", "testing"}
FACTORISATIONS = re.compile(r"torch\.(?:linalg\.)?(?:cholesky\w*|eigh|eigvalsh|eig|eigvals|inv|inv_ex|"
                            r"pinv|svd|svdvals|lu\w*|qr|solve\w*|lstsq|triangular_solve|logdet|slogdet|"
                            r"det)\(")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_applications_import_no_capture(path):
    if _part(path) not in CAPTURE_FREE:
        return
    tree = ast.parse(path.read_text())
    bad = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
           and n.module.startswith("curvkit.capture")]
    bad += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
            if a.name.startswith("curvkit.capture")]
    assert not bad, (f"{path.relative_to(ROOT)} imports {bad}; applications use capture only "
                     "through curvkit.curvature (e.g. curvkit.curvature.streaming)")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_no_factorisation_outside_linalg(path):
    if _part(path) in FACTORISATION_ALLOWED:
        return
    code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
    calls = sorted({m.group(0) for m in FACTORISATIONS.finditer(code)})
    assert not calls, (f"{path.relative_to(ROOT)} factorises a matrix ({calls}); use "
                       "curvkit.linalg (damped_cholesky, Kronecker.factorize, ...)")


def test_factorisation_pattern_catches_calls():
    for call in ("torch.linalg.cholesky_ex(A)", "torch.linalg.eigh(S)", "torch.cholesky_inverse(L)",
                 "torch.linalg.inv(A)", "torch.linalg.lu_factor(A)", "torch.linalg.cholesky(A)",
                 "torch.linalg.eigvalsh(A)", "torch.linalg.solve(A, b)", "torch.linalg.solve_ex(A, b)",
                 "torch.linalg.svd(A)", "torch.linalg.lstsq(A, b)", "torch.cholesky_solve(b, L)",
                 "torch.linalg.solve_triangular(L, b, upper=False)", "torch.logdet(A)",
                 "torch.linalg.slogdet(A)", "torch.linalg.qr(A)", "torch.linalg.pinv(A)"):
        assert FACTORISATIONS.search(call), call
    for call in ("damped_cholesky(S, lam).inverse()", "torch.linalg.vector_norm(v)",
                 "torch.linalg.matrix_norm(A)", "F.solve(g, damping=1e-3)", "F.logdet(1e-3)"):
        assert not FACTORISATIONS.search(call), call


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


#: Small files, one concept each (issue 11 item 5).
MAX_LINES = 500


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_files_are_small(path):
    n = len(path.read_text().splitlines())
    assert n < MAX_LINES, (f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES}); split it by "
                           "concept")
