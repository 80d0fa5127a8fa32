"""laplace-torch's ``FullLaplace`` as a test-only oracle for the evidence and covariance.

Conventions mapped: laplace-torch fits ``H = Σ_{n=1}^{N} J_nᵀ Λ_n J_n`` (the *summed* GGN over
the data loader, i.e. ``N·F_exact``) and uses ``Λ = H/temperature + diag(δ)`` with
``temperature = 1``; its ``log_marginal_likelihood`` is ``log_lik − ½(log det Λ − log det Λ_p) −
½ θᵀΛ_pθ`` with ``log_lik = −Σ_n CE`` -- exactly curvkit's evidence with ``num_data = N``.
Per-tensor priors are laplace-torch's "layerwise" prior (one value per parameter tensor).
"""

from __future__ import annotations

import pytest
import torch
from cases import mlp

from curvkit.laplace import LaplacePosterior

f64 = torch.float64


def import_laplace_torch():
    """Import laplace-torch (part of the ``test`` extra) or skip if it is not installed."""
    return pytest.importorskip("laplace")


@pytest.mark.parametrize("bias", [True, False])
def test_evidence_matches_laplace_torch_full_laplace(bias):
    laplace = import_laplace_torch()
    from torch.utils.data import DataLoader, TensorDataset

    case = mlp(bias, n=20)
    m, x, y = case.model, case.inputs, case.targets
    n_tensors = len(list(m.parameters()))
    P = sum(p.numel() for p in m.parameters())
    priors = [0.8, torch.linspace(0.5, 2.0, n_tensors, dtype=f64),
              torch.linspace(0.3, 3.0, P, dtype=f64)]
    la = laplace.FullLaplace(m, "classification", prior_precision=0.8)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    post = LaplacePosterior(m, x, y, prior_precision=0.8)
    cov_ref = la.posterior_covariance.clone()
    torch.testing.assert_close(post.marginal_variance(), cov_ref.diagonal(), rtol=1e-6, atol=1e-9)
    for prior in priors:
        ref = la.log_marginal_likelihood(prior)  # laplace-torch sets its prior here
        torch.testing.assert_close(post.log_marginal_likelihood(prior), ref.to(f64), rtol=1e-6, atol=1e-6)
