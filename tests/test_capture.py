"""Capture: hooks are removed, and every bad input gets a clear, pinned error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture import UnsupportedLayerError, capture, find_layers
from curvkit.linalg import SingularError
from curvkit.testing.dense import dense_fisher
from tests.cases import mlp


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_inputs_and_errors_shapes_and_scaling():
    case = mlp(True)
    layers = find_layers(case.model, list(case.model.parameters()))
    cap = capture(case.model, case.inputs, layers, kind="exact")
    N, C = case.inputs.shape[0], 3
    assert [a.shape for a in cap.a] == [(N, 1, 6), (N, 1, 5)]  # bias ones column appended
    assert [e.shape for e in cap.e] == [(N * C, 1, 4), (N * C, 1, 3)]
    # last-layer errors are the seeds √p_c(p − 1_c)/√N, input-major
    p = case.model(case.inputs).softmax(1).detach()
    e = cap.e[1][:, 0].reshape(N, C, C)
    ref = p.sqrt()[:, :, None] * (p[:, None, :] - torch.eye(C, dtype=p.dtype)) / N**0.5
    torch.testing.assert_close(e, ref)
    assert _n_hooks(case.model) == 0


def test_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom().double()
    with pytest.raises(RuntimeError, match="boom"):
        curvkit.fisher(model, torch.randn(4, 3, dtype=torch.float64))
    assert _n_hooks(model) == 0


def test_unsupported_layer_named_with_fix():
    """BatchNorm (eval) now has a rule; in train mode it is refused with the layer and the fix."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError,
                       match=r"Layer '1' \(BatchNorm1d\) normalises with batch statistics.*"
                             r"model.eval\(\).*requires_grad_\(False\)"):
        curvkit.fisher(model, x)
    model.eval()
    F = curvkit.fisher(model, x)
    assert torch.allclose(F.to_dense(), dense_fisher(model, x), atol=1e-12)
    # freezing it works
    model[1].requires_grad_(False)
    F = curvkit.fisher(model, x)
    assert F.shape == (4 * 3 + 4 + 2 * 4 + 2,) * 2


def test_grouped_conv_supported():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    F = curvkit.fisher(model, x)
    assert torch.allclose(F.to_dense(), dense_fisher(model, x), atol=1e-12)
    assert len(F.layers) == 2


def test_weight_sharing_is_summed_over_uses():
    # issue 10: a layer called twice is supported (uses = extra locations); was an error
    from curvkit.testing.dense import dense_fisher
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    F = curvkit.fisher(model, x)
    torch.testing.assert_close(F.to_dense(), dense_fisher(model, x), rtol=1e-10, atol=1e-12)
    assert _n_hooks(model) == 0


def test_empirical_needs_targets():
    case = mlp(True)
    with pytest.raises(ValueError, match="kind='empirical' needs the data targets"):
        curvkit.fisher(case.model, case.inputs, kind="empirical")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "fisher"}, r"unknown kind 'fisher'; valid: 'exact', 'mc', 'empirical'"),
        ({"likelihood": "poisson"}, r"unknown likelihood 'poisson'; valid: 'classification'"),
        ({"structure": "lowrank"}, r"unknown structure 'lowrank'; valid: 'full', 'block_diag'"),
        ({"kind": "mc", "mc_samples": 0}, r"mc_samples must be a positive int"),
        ({"route": "sideways"}, r"route must be 'auto', 'dual' or 'primal'"),
        ({"colour": 1}, r"structure='full' got unknown options \['colour'\]"),
    ],
)
def test_unknown_choices(kwargs, match):
    case = mlp(True)
    with pytest.raises((ValueError, TypeError), match=match):
        curvkit.fisher(case.model, case.inputs, case.targets, **kwargs)


def test_bad_targets():
    case = mlp(True)
    with pytest.raises(ValueError, match=r"integer class indices of shape \(6,\)"):
        curvkit.fisher(case.model, case.inputs, case.targets.double(), kind="empirical")
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        curvkit.fisher(case.model, case.inputs, case.targets + 5, kind="empirical")
    with pytest.raises(ValueError, match="regression targets must have the output shape"):
        curvkit.fisher(case.model, case.inputs, torch.zeros(6, 2, dtype=torch.float64),
                       likelihood="regression", kind="empirical")


def test_non_finite_outputs():
    case = mlp(True)
    x = case.inputs.clone()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="model output has non-finite values"):
        curvkit.fisher(case.model, x)


def test_output_must_be_at_least_2d():
    """(N, T, C) outputs are per-position loss terms now (tests/test_rules_targets.py); 1-D is refused."""
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).double()
    with pytest.raises(ValueError, match=r"must be at least 2-D \(N, C\) or \(N, \.\.\., C\)"):
        curvkit.fisher(model, torch.randn(4, 3, dtype=torch.float64))


def test_empty_batch():
    case = mlp(True)
    with pytest.raises(ValueError, match="batch is empty"):
        curvkit.fisher(case.model, case.inputs[:0])


def test_input_dtype_and_device_mismatch():
    case = mlp(True)
    with pytest.raises(TypeError, match="inputs have dtype torch.float32 but the parameters torch.float64"):
        curvkit.fisher(case.model, case.inputs.float())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="inputs are on cuda"):
            curvkit.fisher(case.model, case.inputs.cuda())


def test_damping_errors():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="exact")  # P = 39 > M = 18
    v = torch.randn(F.shape[0], dtype=torch.float64)
    with pytest.raises(SingularError, match=r"rank-deficient \(rank ≤ 18 < P = 39\).*damping > 0"):
        F.solve(v, 0.0)
    with pytest.raises(ValueError, match="damping must be ≥ 0, got -1"):
        F.solve(v, -1.0)
    with pytest.raises(SingularError, match="rank-deficient"):
        F.logdet(0.0)
    with pytest.raises(SingularError, match="rank-deficient"):
        F.inverse(0.0)


def test_vector_errors():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="exact")
    with pytest.raises(ValueError, match=r"has shape \(5,\).*accepts \(39,\), \(39, k\)"):
        F @ torch.zeros(5, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float32 but .* works in torch.float64"):
        F @ torch.zeros(39)
    with pytest.raises(ValueError, match=r"has 2 tensors but .* expects 4"):
        F @ ([torch.zeros(4, 5, dtype=torch.float64)] * 2)
    with pytest.raises(ValueError, match=r"v\[0\] has shape \(5, 4\), expected \(4, 5\)"):
        F @ [torch.zeros(5, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
             torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="damping_mode='heuristic' is not available.*supports"):
        F.solve(torch.zeros(39, dtype=torch.float64), 1.0, damping_mode="heuristic")


def test_gram_memory_error_says_gb(monkeypatch):
    import curvkit.linalg.memory as memory_mod

    monkeypatch.setattr(memory_mod, "available_memory_bytes", lambda device="cpu": 1_000)
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="exact")
    msg = r"18×18 Gram of .* needs [\d.e-]+ GB but only [\d.e-]+ GB is available"
    with pytest.raises(MemoryError, match=msg):
        F.solve(torch.zeros(39, dtype=torch.float64), 1.0)


def test_layer_not_called():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(RuntimeError, match="'unused' \\(Linear\\).*was not called"):
        curvkit.fisher(Skip().double(), torch.randn(3, 3, dtype=torch.float64))


def test_train_mode_dropout_warns():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    with pytest.warns(UserWarning, match="call model.eval"):
        curvkit.fisher(model, torch.randn(3, 3, dtype=torch.float64))
