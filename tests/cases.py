"""Tiny seeded float64 cases shared by the tests.

Each case is ``(name, model, inputs, targets, likelihood)``; ``tags`` say where an approximation
is known to be exact (e.g. KFAC on a single linear layer with one datapoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    likelihood: str
    tags: set[str] = field(default_factory=set)

    @property
    def num_classes(self) -> int:
        with torch.no_grad():
            return int(self.model(self.inputs[:1]).shape[1])


def _seed(s: int) -> torch.Generator:
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def mlp(bias: bool = True, n: int = 6, seed: int = 0) -> Case:
    _seed(seed)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return Case(f"mlp{'_bias' if bias else '_nobias'}", model, x, y, "classification")


def cnn(seed: int = 1, n: int = 4) -> Case:
    _seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, stride=1, dilation=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(2, 3),
    ).double()
    x = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return Case("cnn", model, x, y, "classification")


def regression(seed: int = 2, n: int = 5) -> Case:
    _seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    return Case("regression", model, x, y, "regression")


def binary(seed: int = 3, n: int = 5) -> Case:
    _seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 1)).double()
    return Case("binary", model, x, y, "binary")


def single_linear_one_point(seed: int = 4) -> Case:
    """KFAC is exact: one Linear layer, one datapoint."""
    _seed(seed)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (1,))
    return Case("linear_1pt", model, x, y, "classification", {"kfac_exact"})


def deep_linear_regression(seed: int = 5, n: int = 7) -> Case:
    """KFAC equals the exact block-diagonal Fisher: deep linear net, Gaussian likelihood.

    (The output Fisher is ``I`` and the errors do not depend on the input, so the expectation
    over ``y`` factorises; exact for kind="exact".)
    """
    _seed(seed)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    return Case("deep_linear_regression", model, x, y, "regression", {"kfac_exact"})


def all_cases() -> list[Case]:
    """The shared tiny cases: MLP with and without bias, CNN, regression, binary."""
    return [mlp(True), mlp(False), cnn(), regression(), binary()]
