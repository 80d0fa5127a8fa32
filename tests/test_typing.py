"""``curvkit.typing``: the Literal option types agree with what the functions accept at run time."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture import KINDS, LIKELIHOODS
from curvkit.typing import DampingMode, Kind, Likelihood, Structure


def test_literals_match_the_runtime_choices():
    assert get_args(Kind) == tuple(KINDS)
    assert get_args(Likelihood) == tuple(LIKELIHOODS)
    assert set(get_args(Structure)) <= set(curvkit.structures())


def test_every_literal_combination_builds_and_solves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    targets = {"classification": torch.randint(0, 2, (5,)), "regression": torch.randn(5, 2).double(),
               "binary": torch.randint(0, 2, (5, 2)).double()}
    for likelihood in get_args(Likelihood):
        for structure in get_args(Structure):
            F = curvkit.fisher(model, x, targets[likelihood], likelihood=likelihood, kind="exact",
                               structure=structure)
            v = torch.ones(F.shape[0], dtype=torch.float64)
            modes = get_args(DampingMode) if structure == "kfac" else ("exact",)
            for mode in modes:
                assert torch.isfinite(F.solve(v, 0.1, damping_mode=mode)).all()


@pytest.mark.parametrize("kind", get_args(Kind))
def test_every_kind_builds(kind):
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    F = curvkit.fisher(model, x, y, kind=kind, generator=torch.Generator().manual_seed(0))
    assert F.kind == kind
