"""The README's install works as written: every dependency and extra is installed, satisfies its pin
in ``pyproject.toml`` and imports (torchvision's compiled operators included)."""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import sys

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"

#: distribution name -> module it is imported as (every requirement of every extra needs a row)
IMPORT_NAME = {
    "torch": "torch",
    "torchvision": "torchvision",
    "backpack-for-pytorch": "backpack",
    "scipy": "scipy",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "typing-extensions": "typing_extensions",
    "pytest": "pytest",
    "ruff": "ruff",
    "mypy": "mypy",
    "tomli": "tomli",
    "packaging": "packaging",
    "scikit-learn": "sklearn",
    "mnist1d": "mnist1d",
    "matplotlib": "matplotlib",
    "torchmetrics": "torchmetrics",
    "psutil": "psutil",
    "curvlinops-for-pytorch": "curvlinops",
    "laplace-torch": "laplace",
    "asdfghjkl": "asdl",
    "timm": "timm",
    "transformers": "transformers",
    "peft": "peft",
}


def _requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        reqs += [(f"extra {extra!r}", Requirement(r)) for r in items]
    return [(where, r) for where, r in reqs if r.marker is None or r.marker.evaluate()]


REQUIREMENTS = _requirements()


def test_every_requirement_has_an_import_name():
    missing = sorted({r.name for _, r in REQUIREMENTS} - IMPORT_NAME.keys())
    assert not missing, f"add the import names of {missing} to IMPORT_NAME"


@pytest.mark.parametrize(("where", "req"), REQUIREMENTS, ids=[f"{w}:{r}" for w, r in REQUIREMENTS])
def test_requirement_installed_pinned_and_importable(where, req):
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{req} ({where} in pyproject.toml) is not installed; run the README's install "
                    "command: pip install torch==2.14.1 -e \".[test]\"")
    assert req.specifier.contains(version, prereleases=True), (
        f"{req.name} {version} is installed but pyproject.toml ({where}) asks for {req}")
    importlib.import_module(IMPORT_NAME[req.name])


def test_torchvision_operators_match_torch():
    """A torchvision built for another torch imports only partly: its C++ operators are missing."""
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.1], [5.0, 5.0, 6.0, 6.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_laplace_torch_imports_with_torchmetrics():
    from laplace import Laplace  # imports torchmetrics, which imports torchvision when present

    assert callable(Laplace)
