"""Smoke test of the main demo (the README's first command runs it in full)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_covers_every_kind_and_structure_with_tiny_residuals(capsys):
    quickstart = _load("quickstart")
    rows = quickstart.main(["--batch", "20", "--epochs", "1", "--no-progress"])
    out = capsys.readouterr()
    assert {(r["kind"], r["structure"]) for r in rows} == {
        *((k, s) for k in ("exact", "mc", "empirical") for s in ("full", "block_diag", "kfac", "diag")),
        ("–", "foof"),
    }
    assert {r["structure"] for r in rows} == set(quickstart.STRUCTURES) == {
        "full", "block_diag", "kfac", "foof", "diag"}
    for r in rows:
        assert r["residual"] < 1e-9, r  # relative residual against the explicit matrix
        if r["structure"] == "full":
            assert r["distance"] < 1e-12, r  # the Woodbury operator is the explicit Fisher
    assert "rel. residual" in out.out and "kfac" in out.out
    assert "it/s" not in out.err and "s/it" not in out.err  # --no-progress
