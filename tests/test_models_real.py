"""Real models no one here wrote: torchvision resnet18 and VisionTransformer, Hugging Face GPT-2
(from a tiny config, random weights) and GPT-2 with peft LoRA adapters.

Every entry point runs on them; the numbers are checked against independent float64 torch.func
references (:mod:`models_real_refs`): ``curvkit.fisher`` of every kind × structure (matvec,
solve, logdet, diagonal, blocks; KFAC's exact blocks where it has them; FOOF's refusal),
Laplace (full, kfac, diag; evidence against the dense formula), NaturalGradient / KFAC / FOOF
steps, EWC penalties and ``validate.compare``. At full size, resnet18's exact Fisher matvec is
compared with curvlinops' ``GGNLinearOperator``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models_real_refs import blocks_by_module, reference_columns, reference_columns_mc
from torch import nn

import curvkit
from curvkit.capture import GenericAdapter, UnsupportedLayerError, find_rules

f64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------- models
def _gpt2(n_embd=8, vocab=10, tie=True):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=8, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                          lora_dropout=0.0, fan_in_fan_out=True)
    torch.manual_seed(1)
    lm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # lora_B starts at zero; make the adapters' curvature non-trivial
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return lm


def _tokens(N=2, T=5, vocab=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (N, T), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((N, 1), -100)], 1)  # next token; last ignored
    return ids, labels


def _resnet18(num_classes=3):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=num_classes).double()
    for m in model.modules():  # non-trivial running statistics, then eval BatchNorm
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _vit():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                        hidden_dim=8, mlp_dim=16, num_classes=3).double().eval()
    with torch.no_grad():  # torchvision initialises the head at zero (no curvature below it)
        model.heads.head.weight.normal_(0, 0.5)
        model.encoder.pos_embedding.normal_(0, 0.5)
        model.class_token.normal_(0, 0.5)
    return model


def _only(model, prefixes):
    """Freeze every parameter except those whose name starts with one of ``prefixes``."""
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith(s) for s in prefixes))
        if p.requires_grad:
            params.append(p)
    return params


def _images(N, C, H, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, H, H, generator=g, dtype=f64), torch.randint(0, classes, (N,),
                                                                          generator=g)


# ---------------------------------------------------------------------------- checks
def _close(a, b, rel=1e-9, what=""):
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert scale > 0, what
    assert err <= rel * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _ref(model, batch, targets, params, kind, F, output_fn):
    if kind == "mc":
        return reference_columns_mc(model, batch, params, F.captured.sampled, targets, output_fn)
    return reference_columns(model, batch, params, kind, targets, output_fn)


def _positions(params, subset):
    ids = {id(p) for p in subset}
    out, off = [], 0
    for p in params:
        if id(p) in ids:
            out.append(torch.arange(off, off + p.numel()))
        off += p.numel()
    return torch.cat(out)


def check_fisher(model, batch, targets, params, kinds=("exact", "mc", "empirical"),
                 output_fn=None, dense=False):
    """Every kind × structure against the reference factor ``G`` (``F = G Gᵀ``)."""
    P = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(P, 2, generator=g, dtype=f64)
    kw = dict(params=params, output_fn=output_fn, mc_samples=2)
    for kind in kinds:
        F = curvkit.fisher(model, batch, targets, kind=kind, structure="full",
                           generator=torch.Generator().manual_seed(1), **kw)
        G = _ref(model, batch, targets, params, kind, F, output_fn)
        _close(F @ V, G @ (G.T @ V), what=f"{kind} full matvec")
        lam = 0.1 * float((G * G).sum(0).max())
        x = F.solve(V[:, 0], lam)
        res = G @ (G.T @ x) + lam * x - V[:, 0]
        assert float(res.norm() / V[:, 0].norm()) < 1e-9, kind
        M = G.shape[1]
        ref_logdet = torch.logdet(lam * torch.eye(M, dtype=f64) + G.T @ G) + (P - M) * math.log(lam)
        torch.testing.assert_close(F.logdet(lam), ref_logdet, rtol=1e-10, atol=1e-8)
        if dense:
            _close(F.to_dense(), G @ G.T, what=f"{kind} to_dense")
        B = curvkit.fisher(model, batch, targets, kind=kind, structure="block_diag",
                           generator=torch.Generator().manual_seed(1), **kw)
        ref = torch.zeros_like(V)
        for idx in blocks_by_module(model, params):
            ref[idx] = G[idx] @ (G[idx].T @ V[idx])
        _close(B @ V, ref, what=f"{kind} block_diag")
        D = curvkit.fisher(model, batch, targets, kind=kind, structure="diag",
                           generator=torch.Generator().manual_seed(1), **kw)
        _close(D.diagonal(), (G * G).sum(1), what=f"{kind} diag")
        K = curvkit.fisher(model, batch, targets, kind=kind, structure="kfac",
                           generator=torch.Generator().manual_seed(1), **kw)
        explicit = [layer for layer in K.layers if not layer.kronecker]
        for layer in explicit:  # layers without a Kronecker form: KFAC holds their exact block
            idx = _positions(params, layer.parameters())
            v = torch.zeros(P, dtype=f64)
            v[idx] = V[idx, 0]
            _close((K @ v)[idx], G[idx] @ (G[idx].T @ v[idx]), what=f"{kind} kfac exact block")
        KV = K @ V
        assert torch.isfinite(KV).all()
        torch.testing.assert_close(V[:, 0] @ KV[:, 1], V[:, 1] @ KV[:, 0], rtol=1e-9, atol=1e-12)
    if explicit:
        with pytest.raises(UnsupportedLayerError, match=r"structure='foof' needs a Kronecker form"):
            curvkit.fisher(model, batch, targets, structure="foof", **kw)
    else:
        FO = curvkit.fisher(model, batch, targets, structure="foof", **kw)
        assert float(V[:, 0] @ (FO @ V[:, 0])) > 0
    return G


def check_laplace(model, batch, targets, params, output_fn=None, num_data=10):
    """Laplace (full, kfac, diag): evidence of full and diag against the dense formula.

    Outputs ``(N, C)`` or ``(N, T, V)``: the log-likelihood is that of the non-ignored loss terms,
    scaled to ``num_data`` of them, as the Fisher's mean per loss term.
    """
    from curvkit.laplace import LaplacePosterior

    terms = int((targets != -100).sum())  # loss terms: inputs, or non-ignored positions
    G = reference_columns(model, batch, params, "exact", targets, output_fn)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        logits = output_fn(out) if output_fn is not None else getattr(out, "logits", out)
    loglik = -nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=-100, reduction="sum") * num_data / terms
    delta = 2.0
    P = theta.numel()
    M = G.shape[1]
    common = loglik - 0.5 * delta * theta @ theta + 0.5 * P * math.log(delta)
    full_ref = common - 0.5 * (P * math.log(delta) + torch.logdet(
        torch.eye(M, dtype=f64) + num_data / delta * G.T @ G))
    diag_ref = common - 0.5 * torch.log(delta + num_data * (G * G).sum(1)).sum()
    for structure, ref in (("full", full_ref), ("diag", diag_ref), ("kfac", None)):
        post = LaplacePosterior(model, batch, targets, structure=structure, kind="exact",
                                prior_precision=delta, num_data=num_data, params=params,
                                output_fn=output_fn)
        ev = post.log_marginal_likelihood()
        assert torch.isfinite(ev)
        if ref is not None:
            torch.testing.assert_close(ev.to(f64), ref, rtol=1e-9, atol=1e-7)
        s = post.sample(3, generator=torch.Generator().manual_seed(0))
        assert s.shape == (3, P) and torch.isfinite(s).all()
        probs = post.predictive(batch)
        assert probs.shape == logits.shape
        torch.testing.assert_close(probs.sum(-1), torch.ones(logits.shape[:-1], dtype=probs.dtype))


def _loss(model, batch, targets, output_fn=None):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    logits = output_fn(out) if output_fn is not None else getattr(out, "logits", out)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100)


def check_optimizers(model, batch, targets, params, positional=None):
    """KFAC / FOOF two steps; NaturalGradient (exact, same batch) one step against the
    reference ``θ − η (F + λI)⁻¹ ∇L``."""
    from curvkit.optim import FOOF, KFAC, NaturalGradient

    call = (lambda: _loss(model, positional, targets)) if positional is not None \
        else (lambda: _loss(model, batch, targets))
    state = copy.deepcopy(model.state_dict())
    for make in (lambda: KFAC(model, lr=0.1, damping=1.0, generator=torch.Generator()
                              .manual_seed(0), params=params, inv_period=1),
                 lambda: FOOF(model, lr=0.1, damping=1.0, params=params, inv_period=1)):
        opt = make()
        before = [p.detach().clone() for p in params]
        for _ in range(2):
            opt.zero_grad()
            loss = call()
            loss.backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        assert any(not torch.equal(b, p) for b, p in zip(before, params))
        model.load_state_dict(state)
    lr, lam = 0.5, 0.3
    # the optimizer sees only the inputs: every position is a loss term of its exact Fisher
    G = reference_columns(model, positional if positional is not None else batch, params,
                          "exact", None)
    opt = NaturalGradient(model, lr=lr, damping=lam, kind="exact", fisher_batch="same",
                          params=params)
    opt.zero_grad()
    loss = call()
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    if isinstance(positional, torch.Tensor) or not isinstance(batch, dict):
        opt.step()
    else:
        opt.step(inputs=positional)
    M = G.shape[1]  # (GGᵀ + λI)⁻¹ g by the push-through identity (P may be large)
    step = (grad - G @ torch.linalg.solve(lam * torch.eye(M, dtype=f64) + G.T @ G, G.T @ grad)) / lam
    new = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(new, theta - lr * step, rtol=1e-9, atol=1e-11)
    model.load_state_dict(state)


def check_ewc(model, batch, targets, params):
    """EWC penalty ``(κ/2) Δᵀ F Δ`` (full and diag) against the reference Fisher."""
    from curvkit.ewc import EWC

    G = reference_columns(model, batch, params, "exact", targets)
    state = copy.deepcopy(model.state_dict())
    for structure in ("full", "diag"):
        ewc = EWC(model, strength=3.0, kind="exact", structure=structure, params=params)
        ewc.consolidate(batch, targets)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=f64))
        delta = torch.cat([(p.detach() - state[n]).reshape(-1) for n, p in
                           model.named_parameters() if p.requires_grad])
        if structure == "full":
            ref = 1.5 * ((G.T @ delta) ** 2).sum()
        else:
            ref = 1.5 * (delta ** 2 * (G * G).sum(1)).sum()
        pen = ewc.penalty()
        assert pen.requires_grad
        torch.testing.assert_close(pen.detach(), ref, rtol=1e-9, atol=1e-12)
        model.load_state_dict(state)


def check_validate(model, batch, targets, params, reference="explicit"):
    rep = curvkit.validate.compare(model, batch, targets, kind="exact", params=params,
                                   structures=("full", "block_diag", "kfac", "diag"),
                                   reference=reference, progress=False)
    rows = {r.label: r for r in rep.rows}
    assert rows["full"].direction_error < 1e-8
    assert all(math.isfinite(r.direction_cosine) for r in rep.rows)
    assert rep.settings["num_params"] == sum(p.numel() for p in params)


# ---------------------------------------------------------------------------- GPT-2
def test_gpt2_every_kind_and_structure():
    model = _gpt2()
    ids, labels = _tokens()
    params = list(model.parameters())
    rules = find_rules(model, params)
    kinds = {type(r).__name__ for r in rules}
    assert "HFConv1DAdapter" in kinds and "LayerNormAdapter" in kinds  # GPT-2's Conv1D: a rule
    generic = {r.name: r.reason for r in rules if isinstance(r, GenericAdapter)}
    assert generic["transformer.wte"] == "tied to another module"  # wte tied to lm_head
    # wpe: the Embedding rule, its (1, T) position lookup shared by the batch taken per sample
    assert {r.name: type(r).__name__ for r in rules}["transformer.wpe"] == "EmbeddingAdapter"
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    F = curvkit.fisher(model, batch, labels, kind="empirical")
    assert F.info["num_loss_terms"] == 8  # 2 × 5 positions, one ignored per sequence
    check_fisher(model, batch, labels, params, dense=True)
    # Laplace on the (N, T, V) logits: every non-ignored token a loss term
    check_laplace(model, batch, labels, params)
    with pytest.raises(UnsupportedLayerError, match=r"'transformer.wte' \(Embedding\)"):
        curvkit.optim.KFAC(model, lr=0.1, damping=1.0)
    with pytest.raises(UnsupportedLayerError, match=r"'transformer.h.0.attn.c_attn' \(Conv1D\)"):
        curvkit.optim.FOOF(model, lr=0.1, damping=1.0, params=_only(model, ("transformer.h.0.attn",)))


def test_gpt2_padding_mask_and_untied_head():
    model = _gpt2(tie=False)
    ids, labels = _tokens(T=6, seed=1)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding of the first sequence
    labels[0, -3:] = -100
    params = _only(model, ("transformer.h.0.attn", "lm_head", "transformer.ln_f"))
    batch = {"input_ids": ids, "attention_mask": mask}
    check_fisher(model, batch, labels, params, kinds=("exact", "mc"), dense=True)


def test_gpt2_lora_every_entry_point():
    model = _lora(_gpt2(n_embd=16, vocab=12))
    ids, labels = _tokens(T=6, vocab=12)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any(isinstance(r, GenericAdapter) for r in find_rules(model, params))
    batch = {"input_ids": ids}
    check_fisher(model, batch, labels, params, dense=True)
    check_ewc(model, batch, labels, params)
    check_optimizers(model, batch, labels, params, positional=ids)
    check_validate(model, batch, labels, params)
    # Laplace on a sequence-classification readout (the last position's logits)
    last = lambda out: out.logits[:, -1]  # noqa: E731
    check_laplace(model, batch, ids[:, 0], params, output_fn=last)


# ---------------------------------------------------------------------------- resnet18
RESNET_SUBSET = ("conv1.", "bn1.", "layer1.0.conv1.", "layer1.0.bn1.", "layer4.1.bn2.", "fc.")


def test_resnet18_subset_every_kind_and_structure():
    model = _resnet18()
    params = _only(model, RESNET_SUBSET)
    x, y = _images(2, 3, 16)
    assert not any(isinstance(r, GenericAdapter) for r in find_rules(model, params))
    check_fisher(model, x, y, params)
    check_laplace(model, x, y, _only(model, ("layer4.1.bn2.", "fc.")))
    with pytest.raises(UnsupportedLayerError, match=r"'bn1' \(BatchNorm2d\)"):
        curvkit.optim.FOOF(model, lr=0.1, damping=1.0, params=_only(model, RESNET_SUBSET))
    convs = _only(model, ("conv1.", "layer1.0.conv1.", "fc."))
    check_optimizers(model, x, y, convs)
    check_ewc(model, x, y, convs)
    check_validate(model, x, y, convs, reference="woodbury")


def test_resnet18_kfac_exact_for_one_input():
    """KFAC is exact on a layer with one input and one location (fc at N = 1)."""
    model = _resnet18()
    params = _only(model, ("fc.",))
    x, y = _images(1, 3, 16)
    K = curvkit.fisher(model, x, y, structure="kfac", params=params)
    G = reference_columns(model, x, params, "exact")
    _close(K.to_dense(), G @ G.T, what="kfac fc N=1")


def test_resnet18_full_size_matches_curvlinops_ggn():
    curvlinops = pytest.importorskip("curvlinops")
    model = _resnet18()
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    x, y = _images(2, 3, 16)
    F = curvkit.fisher(model, x, y, kind="exact")
    ggn = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                                       progressbar=False, check_deterministic=False)
    v = torch.randn(F.shape[0], generator=torch.Generator().manual_seed(0), dtype=f64)
    ref = ggn @ v
    ref = ref if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
    _close(F @ v, ref.reshape(-1), what="resnet18 GGN matvec")


# ---------------------------------------------------------------------------- ViT
def test_vit_every_entry_point():
    model = _vit()
    x, y = _images(2, 3, 8)
    params = list(model.parameters())
    generic = {r.name for r in find_rules(model, params) if isinstance(r, GenericAdapter)}
    # class token, position embedding and the attention projections take the generic route
    assert {"", "encoder", "encoder.layers.encoder_layer_0.self_attention",
            "encoder.layers.encoder_layer_0.self_attention.out_proj"} <= generic
    check_fisher(model, x, y, params, dense=True)
    check_laplace(model, x, y, params)
    linear = _only(model, ("conv_proj.", "heads.", "encoder.layers.encoder_layer_0.mlp."))
    check_optimizers(model, x, y, linear)
    check_ewc(model, x, y, linear)
    check_validate(model, x, y, linear)


@pytest.mark.parametrize("select", ["weight", "bias", "both"])
def test_hf_conv1d_rule_transposed_layout(select):
    """GPT-2's Conv1D (``y = x W + b``, ``W`` stored ``(d_in, d_out)``): rule, any selection."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(4, 3), nn.Tanh(),
                          transformers.pytorch_utils.Conv1D(3, 4)).double()
    first = model[0]
    params = {"weight": [first.weight], "bias": [first.bias],
              "both": [first.weight, first.bias, model[2].weight]}[select]
    assert type(find_rules(model, params)[0]).__name__ == "HFConv1DAdapter"
    x = torch.randn(3, 2, 3, dtype=f64)  # (N, T, d_in): every position a loss term
    y = torch.randint(0, 3, (3, 2))
    check_fisher(model, x, y, params, kinds=("exact", "empirical"), dense=True)
