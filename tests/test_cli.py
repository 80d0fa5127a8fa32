"""The ``curvkit`` command line: program name, ``--version``, progress bars on and off."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.__main__ import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"curvkit {curvkit.__version__} (torch {torch.__version__})"


def test_program_name_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: curvkit ")


@pytest.mark.parametrize("progress", [True, False])
def test_validate_progress_bars(capsys, progress):
    pytest.importorskip("sklearn")
    args = ["validate", "--hidden", "4", "--num-data", "8", "--epochs", "1", "--structures", "diag"]
    assert main(args + ([] if progress else ["--no-progress"])) == 0
    err = capsys.readouterr().err
    assert ("train (Adam)" in err) is progress
    assert ("it/s" in err or "s/it" in err or "epoch" in err) is progress
