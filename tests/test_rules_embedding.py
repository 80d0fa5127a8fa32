"""The ``nn.Embedding`` rule: a Kronecker layer on one-hot inputs kept as indices.

References: the dense float64 torch.func factor ``G`` (:mod:`models_real_refs`, mean per loss
term) for ``full``/``block_diag``/``diag``, and -- for ``kfac``, whose factors are a definition --
curvkit's Linear rule on the same model with explicit one-hot inputs (``Â`` = index counts / N).
Per-position outputs ``(N, T, V)`` with ``ignore_index`` targets, ``padding_idx``, ``sparse=True``,
a lookup broadcast over the batch, and a vocabulary whose one-hots would not fit.
"""

from __future__ import annotations

import pytest
import torch
from models_real_refs import reference_columns, reference_columns_mc
from torch import nn

import curvkit
from curvkit.capture import GenericAdapter, UnsupportedLayerError, find_rules
from curvkit.capture.rules.embedding import EmbeddingAdapter
from curvkit.linalg import OneHotFactor

f64 = torch.float64
V, D = 7, 3


class LM(nn.Module):
    """Token + position embeddings -> Linear -> tanh -> head: logits ``(N, T, V)``."""

    def __init__(self, padding_idx=0, sparse=False, one_hot=False):
        super().__init__()
        self.one_hot = one_hot
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx, sparse=sparse)
        self.pos = nn.Embedding(5, D)
        self.lin = nn.Linear(V, D, bias=False)  # the explicit one-hot twin of emb
        self.fc = nn.Linear(D, 4)
        self.head = nn.Linear(4, V)

    def forward(self, ids):
        if self.one_hot:
            x = self.lin(nn.functional.one_hot(ids, V).to(self.lin.weight.dtype))
        else:
            x = self.emb(ids)
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))  # (1, T): shared by the batch
        return self.head(torch.tanh(self.fc(x + pos)))


def _model(**kw):
    torch.manual_seed(0)
    m = LM(**kw).double().eval()
    with torch.no_grad():
        m.lin.weight.copy_(m.emb.weight.T)
    return m


def _data(N=3, T=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (N, T), generator=g)
    ids[0, :2] = 0  # padding_idx positions (zero gradient rows)
    ids[1, 1] = ids[1, 2]  # a token repeated within a sequence
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :2] = -100
    return ids, labels


def _params(m):
    return [m.emb.weight, m.pos.weight, m.fc.weight, m.head.weight]


def test_embedding_gets_the_rule_and_stores_indices():
    m = _model()
    rules = {r.name: r for r in find_rules(m, _params(m))}
    assert isinstance(rules["emb"], EmbeddingAdapter) and isinstance(rules["pos"], EmbeddingAdapter)
    ids, labels = _data()
    F = curvkit.fisher(m, ids, labels, kind="mc", generator=torch.Generator().manual_seed(0),
                       params=_params(m))
    a = F.captured.a[0]
    assert a.dtype == torch.int64 and a.shape == (3, 4, 1)  # indices, no (N·T, V) one-hots
    assert bool((a[0, :2] == -1).all())  # padding_idx: no row
    assert F.captured.a[1].shape == (3, 4, 1)  # the shared (1, T) lookup, per sample


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_full_block_diag_diag_match_torch_func(kind):
    m = _model()
    ids, labels = _data()
    params = _params(m)
    g = torch.Generator().manual_seed(3)
    kw = {"kind": kind, "params": params, "generator": g}
    F = curvkit.fisher(m, ids, labels, structure="full", **kw)
    if kind == "mc":
        G = reference_columns_mc(m, ids, params, F.captured.sampled, labels)
    else:
        G = reference_columns(m, ids, params, kind, labels)
    dense = G @ G.T
    torch.testing.assert_close(F.to_dense(), dense, rtol=1e-10, atol=1e-13)
    assert float(dense[:D].detach().abs().sum()) == 0  # row 0 of emb.weight (padding_idx): no curvature
    P = dense.shape[0]
    v = torch.randn(P, 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    torch.testing.assert_close(F.solve(v, damping=0.3),
                               torch.linalg.solve(dense + 0.3 * torch.eye(P, dtype=f64), v),
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(F.logdet(0.3), torch.logdet(dense + 0.3 * torch.eye(P, dtype=f64)))
    for structure in ("block_diag", "diag"):
        g.manual_seed(3)
        S = curvkit.fisher(m, ids, labels, structure=structure, **kw)
        if structure == "diag":
            torch.testing.assert_close(S.diagonal(), dense.diagonal(), rtol=1e-10, atol=1e-13)
        else:
            off = 0
            for p in params:
                n = p.numel()
                blk = S.to_dense()[off:off + n, off:off + n]
                torch.testing.assert_close(blk, dense[off:off + n, off:off + n], rtol=1e-10,
                                           atol=1e-13)
                off += n


def test_kfac_equals_the_explicit_one_hot_linear():
    ids, labels = _data()
    m = _model()
    twin = _model(one_hot=True)
    emb = curvkit.fisher(m, ids, labels, structure="kfac", params=[m.emb.weight])
    lin = curvkit.fisher(twin, ids, labels, structure="kfac", params=[twin.lin.weight])
    # emb.weight (V, D) holds lin.weight.T: permute the flat positions
    perm = torch.arange(D * V).reshape(D, V).T.reshape(-1)  # emb position v·D + o -> o·V + v
    Lin = lin.to_dense()
    # padding_idx=0: the twin's column 0 still has gradients; the embedding's row 0 has none
    keep = torch.ones(V, D, dtype=torch.bool)
    keep[0] = False
    keep = keep.reshape(-1)
    E = emb.to_dense()
    ref = Lin[perm][:, perm]
    torch.testing.assert_close(E[keep][:, keep], ref[keep][:, keep], rtol=1e-10, atol=1e-13)
    assert float(E[~keep].abs().sum()) == 0
    A = emb.operator.factors.A[0]
    counts = torch.bincount(ids[ids != 0], minlength=V).to(f64)
    torch.testing.assert_close(A, torch.diag(counts / ids.shape[0]))
    with pytest.raises(UnsupportedLayerError, match=r"'emb' \(Embedding\)"):
        curvkit.optim.KFAC(m, lr=0.1, damping=1.0)


def test_sparse_gradients_and_untied_padding():
    ids, labels = _data()
    dense_m, sparse_m = _model(), _model(sparse=True)
    a = curvkit.fisher(dense_m, ids, labels, params=[dense_m.emb.weight])
    b = curvkit.fisher(sparse_m, ids, labels, params=[sparse_m.emb.weight])
    torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=0, atol=0)
    nopad = _model(padding_idx=None)
    c = curvkit.fisher(nopad, ids, labels, params=[nopad.emb.weight])
    assert float(c.to_dense()[:D].abs().sum()) > 0  # index 0 is an ordinary row then


def test_max_norm_refused_and_tied_embedding_stays_generic():
    m = _model()
    m.emb.max_norm = 1.0
    with pytest.raises(UnsupportedLayerError, match=r"'emb' \(Embedding\) has max_norm=1.0"):
        curvkit.fisher(m, *_data(), params=_params(m))
    m = _model()
    m.out = nn.Linear(D, V, bias=False).double()
    m.out.weight = m.emb.weight  # an Embedding tied to a Linear (GPT-2's wte / lm_head)
    rules = {r.name: r for r in find_rules(m, [m.emb.weight])}
    assert isinstance(rules["emb"], GenericAdapter)
    assert rules["emb"].reason == "tied to another module"


def test_large_vocabulary_without_one_hots():
    torch.manual_seed(0)
    big = 1_000_000
    m = nn.Sequential(nn.Embedding(big, 2), nn.Linear(2, 3))
    ids = torch.randint(0, big, (4, 6))
    y = torch.randint(0, 3, (4, 6))
    F = curvkit.fisher(m, ids, y, kind="mc", structure="full",
                       generator=torch.Generator().manual_seed(0), params=[m[0].weight])
    f = F.operator.factor if hasattr(F.operator, "factor") else None
    assert f is None or any(isinstance(b, OneHotFactor) for b in f.row_blocks())
    g = torch.randn(2 * big, generator=torch.Generator().manual_seed(0))
    x = F.solve(g, damping=1.0)
    assert x.shape == g.shape and torch.isfinite(x).all()
    d = curvkit.fisher(m, ids, y, kind="mc", structure="diag",
                       generator=torch.Generator().manual_seed(0), params=[m[0].weight]).diagonal()
    assert int((d > 0).sum()) <= 2 * ids.unique().numel()


def test_entry_points_on_the_embedding_rule(tmp_path):
    from curvkit.ewc import EWC
    from curvkit.laplace import LaplacePosterior

    m = _model()
    ids, labels = _data()
    params = _params(m)
    for p in m.parameters():
        p.requires_grad_(any(p is q for q in params))
    G = reference_columns(m, ids, params, "exact", labels)
    for structure in ("full", "kfac", "diag"):
        post = LaplacePosterior(m, ids, labels, structure=structure, prior_precision=0.5)
        assert torch.isfinite(post.log_marginal_likelihood())
        assert post.predictive(ids).shape == (3, 4, V)
        torch.save(post.state_dict(), tmp_path / "post.pt")
        again = LaplacePosterior(m, ids, labels, structure=structure, prior_precision=0.5)
        again.load_state_dict(torch.load(tmp_path / "post.pt", weights_only=True))
        torch.testing.assert_close(again.log_marginal_likelihood(), post.log_marginal_likelihood())
    ewc = EWC(m, strength=2.0, kind="exact", structure="full")
    ewc.consolidate(ids, labels)
    delta = [0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=f64)
             for i, p in enumerate(params)]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
    flat = torch.cat([d.reshape(-1) for d in delta])
    torch.testing.assert_close(ewc.penalty().detach(), ((G.T @ flat) ** 2).sum(), rtol=1e-9, atol=1e-12)
    rep = curvkit.validate.compare(m, ids, labels, kind="exact", structures=("full", "kfac", "diag"),
                                   progress=False)
    assert {r.label: r for r in rep.rows}["full"].direction_error < 1e-8


@pytest.mark.parametrize("chunked", [False, True])
def test_one_hot_factor_equals_the_dense_one_hot_outer_factor(chunked, monkeypatch):
    import curvkit.linalg.onehot as onehot
    from curvkit.linalg import OuterProductFactor

    g = torch.Generator().manual_seed(0)
    N, T, R, d, Vn = 3, 4, 2, 2, 6
    idx = torch.randint(0, Vn, (N, T), generator=g)
    idx[0, 1] = -1  # no row (padding)
    idx[2, 3] = idx[2, 0]
    e = torch.randn(N * R, T, d, generator=g, dtype=f64)
    a = nn.functional.one_hot(idx.clamp_min(0), Vn).to(f64) * (idx >= 0)[..., None]
    ref = OuterProductFactor(a, e)
    if chunked:  # two tokens per Gram chunk, one column per product chunk
        monkeypatch.setattr(onehot, "CHUNK_BYTES", 8 * N * R * d * 2)
    f = OneHotFactor(idx, e, Vn)
    U = ref.dense(f64)
    torch.testing.assert_close(f.dense(f64), U)
    torch.testing.assert_close(f.gram(), U.T @ U)
    torch.testing.assert_close(f.sq_row_norms(), (U * U).sum(1))
    X = torch.randn(d * Vn, 3, generator=g, dtype=f64)
    W = torch.randn(N * R, 3, generator=g, dtype=f64)
    torch.testing.assert_close(f.rmatmat(X), U.T @ X)
    torch.testing.assert_close(f.matmat(W), U @ W)
    f32 = OneHotFactor(idx, e.float(), Vn)
    torch.testing.assert_close(f32.gram64(), U.T @ U, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f32.rmatmat64(X), U.T @ X, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f32.sub_matmat64(X.float(), W, 2.0), (2 * (X - U @ W)).float(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"OneHotFactor needs indices \(N, T\) and errors"):
        OneHotFactor(idx, e[:, :2], Vn)


def test_outer_factor_with_positions_chunks_its_products(monkeypatch):
    import curvkit.linalg.outer as outer
    from curvkit.linalg import DenseFactor, OuterProductFactor

    g = torch.Generator().manual_seed(1)
    f = OuterProductFactor(torch.randn(3, 4, 5, generator=g, dtype=f64),
                           torch.randn(6, 4, 2, generator=g, dtype=f64))
    U = f.dense(f64)
    X = torch.randn(10, 7, generator=g, dtype=f64)
    monkeypatch.setattr(outer, "CHUNK_BYTES", 8 * 3 * 4 * 2 * 2)  # two columns per chunk
    torch.testing.assert_close(f.rmatmat(X), U.T @ X)
    other = DenseFactor(torch.randn(10, 3, generator=g, dtype=f64))
    torch.testing.assert_close(f.cross_gram64(other), U.T @ other.U)


def test_guard_fires_on_broken_embedding_rule(monkeypatch):
    """The capture guard checks the Embedding rule: wrong indices or a weight layout read
    untransposed raise ``CaptureMismatchError`` naming the layer, for every structure."""
    from curvkit.capture import CaptureMismatchError
    from curvkit.capture.rules.base import LayerAdapter

    ids, labels = _data()
    model = _model()
    original = EmbeddingAdapter.inputs

    def shifted(self, x, module=None, batch_size=None):
        a = original(self, x, module, batch_size)
        return torch.where(a >= 0, (a + 1) % self.d_w, a)

    match = r"Capture check failed for layer 'emb' \(Embedding\)"
    with monkeypatch.context() as mp:
        mp.setattr(EmbeddingAdapter, "inputs", shifted)
        for structure in ("full", "block_diag", "kfac", "diag"):
            with pytest.raises(CaptureMismatchError, match=match):
                curvkit.fisher(model, ids, labels, kind="empirical", structure=structure,
                              params=_params(model))
    with monkeypatch.context() as mp:  # Wᵀ read in storage order, as a Linear's W would be
        mp.setattr(EmbeddingAdapter, "layer_index", LayerAdapter.layer_index)
        mp.setattr(EmbeddingAdapter, "span", lambda self, offsets: None)
        with pytest.raises(CaptureMismatchError, match=match):
            curvkit.fisher(model, ids, labels, kind="empirical", structure="full", params=_params(model))
    # the real rule passes
    curvkit.fisher(model, ids, labels, kind="empirical", structure="full", params=_params(model))
