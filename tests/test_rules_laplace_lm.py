"""Laplace on per-position outputs ``(N, T, V)`` (a tiny float64 language model, ``ignore_index``).

The Fisher is the mean per loss term (non-ignored positions, ``N_ℓ``), so the posterior's
``n = num_data`` counts loss terms (default ``N_ℓ``) and the log-likelihood is
``(n/N_ℓ) Σ log p`` -- checked against ``F.cross_entropy`` over the flattened positions, the
evidence against the dense formula with the torch.func factor ``G`` (:mod:`models_real_refs`),
and the GLM predictive of every position against dense ``J Λ⁻¹ Jᵀ``.
"""

from __future__ import annotations

import math

import pytest
import torch
from models_real_refs import reference_columns
from torch import nn
from torch.func import functional_call, jacrev

from curvkit.laplace import LaplacePosterior

f64 = torch.float64
V = 5


class TinyLM(nn.Module):
    """Embedding → Linear → tanh → Linear: logits ``(N, T, V)``."""

    def __init__(self, vocab: int = V, d: int = 3, h: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, h)
        self.head = nn.Linear(h, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def _data(N=3, T=4, seed=0):
    torch.manual_seed(seed)
    model = TinyLM().double().eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, T), generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, -2:] = -100  # padding: no loss terms
    labels[-1, 0] = -100
    return model, ids, labels


def _dense_loglik(model, ids, labels):
    with torch.no_grad():
        logits = model(ids)
    return -nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                        ignore_index=-100, reduction="sum")


def test_loglik_default_num_data_and_evidence_match_dense():
    model, ids, labels = _data()
    params = list(model.parameters())
    terms = int((labels != -100).sum())
    G = reference_columns(model, ids, params, "exact", labels)  # F = G Gᵀ, mean per loss term
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    P, M = G.shape
    delta = 0.7
    for num_data in (None, 40):
        n = terms if num_data is None else num_data
        loglik = _dense_loglik(model, ids, labels) * n / terms
        common = loglik - 0.5 * delta * theta @ theta + 0.5 * P * math.log(delta)
        refs = {
            "full": common - 0.5 * (P * math.log(delta) + torch.logdet(
                torch.eye(M, dtype=f64) + n / delta * G.T @ G)),
            "diag": common - 0.5 * torch.log(delta + n * (G * G).sum(1)).sum(),
        }
        for structure in ("full", "diag", "kfac"):
            post = LaplacePosterior(model, ids, labels, structure=structure, kind="exact",
                                    prior_precision=delta, num_data=num_data)
            assert post.num_data == n
            torch.testing.assert_close(post.log_likelihood(), loglik, rtol=1e-12, atol=1e-12)
            ev = post.log_marginal_likelihood()
            if structure == "kfac":  # its own n·F + δI, densely
                Fk = post.curvature.to_dense().to(f64)
                refs["kfac"] = common - 0.5 * torch.logdet(n * Fk + delta * torch.eye(P, dtype=f64))
            torch.testing.assert_close(ev, refs[structure], rtol=1e-9, atol=1e-8)
            post.optimize_prior_precision()
            assert post.log_marginal_likelihood() >= ev - 1e-9


def test_mc_fisher_over_every_token_and_ignore_index_option():
    model, ids, labels = _data(seed=1)
    other = labels.masked_fill(labels == -100, 7)  # another padding value (out of range)
    g = torch.Generator().manual_seed(0)
    post = LaplacePosterior(model, ids, other, kind="mc", structure="full", ignore_index=7,
                            generator=g, prior_precision=1.0)
    assert post.num_data == int((labels != -100).sum())
    assert post.rank == ids.shape[0]  # one MC column per sequence (its tokens' summed gradient)
    torch.testing.assert_close(post.log_likelihood(), _dense_loglik(model, ids, labels))
    with pytest.raises(ValueError, match=r"classification targets must lie in \[0, 5\)"):
        LaplacePosterior(model, ids, other, kind="mc", generator=g).log_likelihood()


def test_glm_predictive_per_position_matches_dense():
    model, ids, labels = _data(N=2, T=3)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    delta, n = 0.5, 20
    G = reference_columns(model, ids, params, "exact", labels)
    P = G.shape[0]
    Lam = n * G @ G.T + delta * torch.eye(P, dtype=f64)
    theta = {k: p.detach() for k, p in zip(names, params)}
    x = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(5))

    def f(th):
        return functional_call(model, th, (x,))

    J = jacrev(f)(theta)
    J = torch.cat([J[k].reshape(2, 3, V, -1) for k in names], -1)  # (N, T, V, P)
    cov = torch.einsum("ntcp,pq,ntdq->ntcd", J, torch.linalg.inv(Lam), J)
    with torch.no_grad():
        mean = model(x)
    kappa = torch.rsqrt(1 + math.pi / 8 * cov.diagonal(dim1=-2, dim2=-1))
    probit = torch.softmax(kappa * mean, -1)
    for structure in ("full", "diag", "kfac"):
        post = LaplacePosterior(model, ids, labels, structure=structure, prior_precision=delta,
                                num_data=n)
        fv = post.functional_variance(x)
        assert fv.shape == (2, 3, V, V)
        probs = post.predictive(x)
        assert probs.shape == (2, 3, V)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, dtype=f64))
        if structure == "full":
            torch.testing.assert_close(fv, cov, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(probs, probit, rtol=1e-9, atol=1e-12)
        mc = post.predictive(x, link_approx="mc", n_samples=8,
                             generator=torch.Generator().manual_seed(0))
        nn_p = post.predictive(x, pred_type="nn", n_samples=4,
                               generator=torch.Generator().manual_seed(0))
        assert mc.shape == nn_p.shape == (2, 3, V)
    # grid search by the validation NLL per loss term (ignored positions skipped)
    best = post.optimize_prior_precision(method="gridsearch", val_inputs=ids, val_targets=labels,
                                         grid=[0.1, 1.0, 10.0])
    assert best in (0.1, 1.0, 10.0)


def test_glm_predictive_refuses_too_many_positions_times_classes():
    model, ids, labels = _data()
    post = LaplacePosterior(model, ids, labels, structure="diag")
    long = torch.zeros(1, 900, dtype=torch.long)  # 900 positions × 5 classes > 4096 seeds
    with pytest.raises(ValueError, match=r"4500 backward passes per input .*pred_type='nn'"):
        post.predictive(long)
    assert post.predictive(long, pred_type="nn", n_samples=2,
                           generator=torch.Generator().manual_seed(0)).shape == (1, 900, V)


@pytest.mark.parametrize("structure,route", [("full", "dual"), ("full", "primal"),
                                             ("block_diag", "auto"), ("kfac", None),
                                             ("diag", None)])
def test_loader_union_is_the_concatenated_batch_per_loss_term(structure, route):
    import curvkit

    model, ids, labels = _data(N=5, T=4, seed=2)
    labels[1, 1:] = -100  # batches with different numbers of loss terms per sequence
    loader = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    opts = {} if route is None else {"route": route}
    F1 = curvkit.fisher(model, ids, labels, structure=structure)
    FU = curvkit.fisher(model, loader, structure=structure, progress=False, **opts)
    terms = int((labels != -100).sum())
    assert F1.info["num_loss_terms"] == FU.info["num_loss_terms"] == terms
    torch.testing.assert_close(FU.to_dense(), F1.to_dense(), rtol=1e-10, atol=1e-12)
    if structure in ("full", "kfac"):
        post1 = LaplacePosterior(model, ids, labels, structure=structure)
        postU = LaplacePosterior(model, loader, structure=structure, progress=False)
        assert post1.num_data == postU.num_data == terms
        torch.testing.assert_close(postU.log_marginal_likelihood(),
                                   post1.log_marginal_likelihood(), rtol=1e-10, atol=1e-10)
