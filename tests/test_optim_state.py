"""curvkit.optim: state_dict resumption (bit for bit), hook lifecycle, and bad input."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.capture import UnsupportedLayerError
from curvkit.optim import FOOF, KFAC, NaturalGradient
from tests.cases import cnn, mlp
from tests.optim_refs import assert_state_equal, loss_backward, params_of, snapshot

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP stalls on a loaded machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

MAKERS = {
    "foof": lambda m: FOOF(m, lr=0.2, damping=0.3, ema_decay=0.9, inv_period=3, ema_steps=2,
                           momentum=0.9, weight_decay=0.01),
    "kfac_mc_heuristic": lambda m: KFAC(m, lr=0.2, damping=0.3, ema_decay=0.9, inv_period=3,
                                        ema_steps=2, momentum=0.9, weight_decay=0.01,
                                        generator=torch.Generator().manual_seed(1)),
    "kfac_mc_standard": lambda m: KFAC(m, lr=0.2, damping=0.3, damping_mode="exact", inv_period=2,
                                       ema_steps=2, momentum=0.5, generator=torch.Generator().manual_seed(1)),
    "natural_mc_full": lambda m: NaturalGradient(m, lr=0.2, damping=0.3, inv_period=2, momentum=0.9,
                                                 generator=torch.Generator().manual_seed(1)),
    "natural_block_diag": lambda m: NaturalGradient(m, lr=0.2, damping=0.3, structure="block_diag",
                                                    inv_period=3, momentum=0.5,
                                                    generator=torch.Generator().manual_seed(1)),
}


def batches(n: int, image: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    shape = (4, 2, 4, 4) if image else (6, 5)
    return [(torch.randn(*shape, dtype=f64, generator=g), torch.randint(0, 3, (shape[0],), generator=g))
            for _ in range(n)]


def train(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        loss_backward(model, x, y)
        opt.step()


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("make_case", [lambda: mlp(True), cnn], ids=["mlp", "cnn"])
def test_resume_is_bit_for_bit(name, make_case):
    """Stopping after k steps, saving (torch.save), loading into a fresh model and optimizer and
    continuing gives exactly the trajectory of not stopping: parameters, EMA factors, inverses,
    counters, momentum buffers and generator state."""
    image = make_case is cnn
    data = batches(8, image)
    ref_case = make_case()
    ref_opt = MAKERS[name](ref_case.model)
    train(ref_case.model, ref_opt, data)

    case = make_case()
    opt = MAKERS[name](case.model)
    train(case.model, opt, data[:5])
    buf = io.BytesIO()
    torch.save({"model": case.model.state_dict(), "opt": opt.state_dict()}, buf)
    del opt, case
    buf.seek(0)
    saved = torch.load(buf)
    fresh = make_case()
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(1.0)  # a different starting point, overwritten by the checkpoint
    fresh.model.load_state_dict(saved["model"])
    opt2 = MAKERS[name](fresh.model)
    if opt2.generator is not None:
        opt2.generator.manual_seed(999)  # overwritten by the checkpoint
    opt2.load_state_dict(saved["opt"])
    train(fresh.model, opt2, data[5:])
    for a, b in zip(snapshot(ref_case.model), snapshot(fresh.model)):
        assert torch.equal(a, b)
    assert_state_equal(ref_opt.state_dict(), opt2.state_dict())


def test_state_dict_is_a_snapshot():
    """Steps after ``state_dict()`` do not modify the returned tensors (updates are out of place)."""
    case = mlp(True)
    opt = MAKERS["foof"](case.model)
    data = batches(4, False)
    train(case.model, opt, data[:2])
    sd = opt.state_dict()
    kept = copy.deepcopy(sd)
    train(case.model, opt, data[2:])
    assert_state_equal(sd, kept)


def test_load_state_dict_from_other_class_raises():
    case = mlp(True)
    foof = MAKERS["foof"](case.model)
    sd = foof.state_dict()
    foof.remove_hooks()
    kfac = MAKERS["kfac_mc_heuristic"](case.model)
    with pytest.raises(ValueError, match="saved by FOOF, not KFAC"):
        kfac.load_state_dict(sd)
    with pytest.raises(KeyError, match="no 'curvkit' entry"):
        kfac.load_state_dict(torch.optim.SGD(case.model.parameters(), lr=0.1).state_dict())


# ---------------------------------------------------------------------- hooks
def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["foof", "kfac_mc_heuristic", "natural_mc_full"])
def test_hooks_removed_on_gc(name):
    case = mlp(True)
    model = case.model
    assert hook_count(model) == 0
    opt = MAKERS[name](model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    train(model, opt, batches(2, False))
    assert hook_count(model) > 0
    ref = weakref.ref(opt)
    del opt, sched
    gc.collect()
    assert ref() is None
    assert hook_count(model) == 0
    loss_backward(model, *batches(1, False)[0])  # the model still works


@pytest.mark.parametrize("name", ["foof", "kfac_mc_heuristic", "natural_mc_full"])
def test_remove_hooks(name):
    case = mlp(True)
    model = case.model
    opt = MAKERS[name](model)
    opt.remove_hooks()
    opt.remove_hooks()  # idempotent
    assert hook_count(model) == 0 and not opt.hooks_active
    opt.zero_grad()
    loss_backward(model, *batches(1, False)[0])
    with pytest.raises(RuntimeError, match="hooks were removed"):
        opt.step()


def test_deepcopy_of_model_does_not_record():
    """A deepcopy of the model carries the hook functions; they must ignore the copy."""
    case = mlp(True)
    model = case.model
    opt = MAKERS["kfac_mc_heuristic"](model)
    twin = copy.deepcopy(model)
    state = opt.generator.get_state()
    loss_backward(twin, *batches(1, False)[0])
    assert all(a is None for a in opt.recorder.records.inputs)
    assert opt.errors.errors is None and torch.equal(opt.generator.get_state(), state)


# ---------------------------------------------------------------------- bad input
def test_nonfinite_loss_from_closure_changes_nothing():
    case = mlp(True)
    model = case.model
    opt = MAKERS["kfac_mc_heuristic"](model)
    data = batches(3, False)
    train(model, opt, data[:2])
    sd, params = copy.deepcopy(opt.state_dict()), snapshot(model)
    x, y = data[2]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x * float("nan")), y)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="the loss is non-finite"):
        opt.step(closure)
    assert_state_equal(opt.state_dict(), sd)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), params))


@pytest.mark.parametrize("name", list(MAKERS))
def test_nonfinite_gradient_changes_nothing(name):
    case = mlp(True)
    model = case.model
    opt = MAKERS[name](model)
    data = batches(4, False)
    train(model, opt, data[:2])
    sd, params = copy.deepcopy(opt.state_dict()), snapshot(model)
    opt.zero_grad()
    loss_backward(model, *data[2])  # samples MC labels on a statistics step
    model[2].weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"gradient of '2\.weight' has non-finite values"):
        opt.step()
    assert_state_equal(opt.state_dict(), sd)  # incl. the generator state: the sampling is undone
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), params))
    # training continues as if the failed step never happened
    ref = mlp(True)
    ref_opt = MAKERS[name](ref.model)
    train(ref.model, ref_opt, data[:2] + data[3:])
    train(model, opt, data[3:])
    for a, b in zip(snapshot(ref.model), snapshot(model)):
        assert torch.equal(a, b)


def test_nonfinite_model_output_kfac():
    case = mlp(True)
    model = case.model
    opt = MAKERS["kfac_mc_heuristic"](model)
    x, y = batches(1, False)[0]
    x[0, 0] = float("nan")
    opt.zero_grad()
    out = model(x)  # no error inside the forward pass
    assert opt.errors.nonfinite
    F.cross_entropy(out, y).backward()
    with pytest.raises(FloatingPointError, match="non-finite values"):
        opt.step()
    # with finite gradients but non-finite outputs the factor check fires
    opt.zero_grad()
    model(x)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(FloatingPointError, match="model output has non-finite values"):
        opt.step()
    assert opt.step_count == 0


def test_unsupported_trainable_layer():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    makers = (FOOF, lambda m: KFAC(m, lr=0.1, damping=0.1), lambda m: NaturalGradient(m, lr=0.1, damping=0.1))
    for make in makers:
        with pytest.raises(UnsupportedLayerError, match=r"Unsupported layer '1' \(BatchNorm1d\).*Freeze"):
            make(model)
    # excluding the BatchNorm parameters works
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    FOOF(model, params=params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(inv_period=3, ema_steps=5), r"ema_steps=5 > inv_period=3"),
    (dict(lr=0.0), r"lr must be a finite number > 0, got 0.0"),
    (dict(lr=-1.0), r"lr must be a finite number > 0"),
    (dict(lr=float("nan")), r"lr must be a finite number > 0"),
    (dict(damping=0.0), r"damping must be a finite number > 0"),
    (dict(damping=-1e-3), r"damping must be a finite number > 0"),
    (dict(momentum=1.0), r"momentum must be a number in \[0, 1\)"),
    (dict(weight_decay=-0.1), r"weight_decay must be a finite number ≥ 0"),
    (dict(ema_decay=1.0), r"ema_decay must be a number in \[0, 1\)"),
    (dict(inv_period=0), r"inv_period must be an int ≥ 1"),
    (dict(ema_steps=1.5), r"ema_steps must be an int ≥ 1"),
])
def test_foof_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FOOF(mlp(True).model, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(kind="empirical"), ValueError, "kind='empirical' needs the data labels"),
    (dict(kind="full"), ValueError, "unknown kind 'full'"),
    (dict(likelihood="poisson"), ValueError, "unknown likelihood 'poisson'"),
    (dict(damping_mode="tikhonov"), ValueError, "unknown damping_mode 'tikhonov'"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
    (dict(damping=0.0), ValueError, "damping must be a finite number > 0"),
])
def test_kfac_bad_arguments(kwargs, exc, match):
    args = dict(lr=0.1, damping=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        KFAC(mlp(True).model, **args)


def test_generator_on_another_device():
    model = nn.Sequential(nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"generator is on cpu but the parameters on meta"):
        KFAC(model, lr=0.1, damping=0.1, generator=torch.Generator())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(structure="kfac"), ValueError, "unknown structure 'kfac'"),
    (dict(fisher_batch="previous"), ValueError, "unknown fisher_batch 'previous'"),
    (dict(lr=0), ValueError, "lr must be a finite number > 0"),
    (dict(inv_period=0), ValueError, "inv_period must be an int ≥ 1"),
    (dict(fisher_batch="same", fisher_loader=[]), ValueError, "cannot be combined with fisher_batch='same'"),
])
def test_natural_bad_arguments(kwargs, exc, match):
    args = dict(lr=0.1, damping=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        NaturalGradient(mlp(True).model, **args)


def test_bad_usage():
    case = mlp(True)
    model = case.model
    with pytest.raises(TypeError, match="needs the model"):
        FOOF(list(model.parameters()))
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias] + params_of(model[2])}]
    with pytest.raises(ValueError, match=r"weight and bias of layer '0' \(Linear\) are in different"):
        FOOF(model, params=groups)
    opt = FOOF(model)
    with pytest.raises(NotImplementedError, match="add_param_group after construction"):
        opt.add_param_group({"params": []})
    with torch.no_grad():
        model(case.inputs)  # not recorded: statistics need a grad-enabled forward
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"no input of layer '0' \(Linear\) was recorded"):
        opt.step()
    opt.remove_hooks()

    nat = NaturalGradient(model, lr=0.1, damping=0.1)
    with pytest.raises(RuntimeError, match="needs the batch inputs"):
        nat.step()
    emp = NaturalGradient(model, lr=0.1, damping=0.1, kind="empirical", fisher_batch="same")
    loss_backward(model, case.inputs, case.targets)
    with pytest.raises(ValueError, match="needs the data labels"):
        emp.step()
    emp.step(targets=case.targets)
    same = NaturalGradient(model, lr=0.1, damping=0.1, fisher_batch="same")
    with pytest.raises(ValueError, match="set_fisher_batch needs fisher_batch='independent'"):
        same.set_fisher_batch(case.inputs)
    groups = [{"params": params_of(model[0]), "damping": 0.1},
              {"params": params_of(model[2]), "damping": 1.0}]
    with pytest.raises(ValueError, match="one damping for the whole Fisher"):
        NaturalGradient(model, lr=0.1, damping=0.1, params=groups)
    with pytest.raises(TypeError, match="share one dtype"):
        FOOF(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["foof", "kfac", "kfac_standard", "natural"])
def test_cuda(name):
    model = mlp(True).model.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    opt = {
        "foof": lambda: FOOF(model, lr=0.2, damping=0.3, inv_period=2, ema_steps=2, momentum=0.9),
        "kfac": lambda: KFAC(model, lr=0.2, damping=0.3, inv_period=2, ema_steps=2, generator=gen),
        "kfac_standard": lambda: KFAC(model, lr=0.2, damping=0.3, damping_mode="exact", generator=gen),
        "natural": lambda: NaturalGradient(model, lr=0.2, damping=0.3, generator=gen),
    }[name]()
    data = [(x.cuda(), y.cuda()) for x, y in batches(3, False)]
    train(model, opt, data)
    assert all(p.is_cuda and torch.isfinite(p).all() for p in model.parameters())
