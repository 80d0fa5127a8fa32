"""Batches and outputs as users hold them: tuples, dicts, Hugging Face BatchEncoding / ModelOutput."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture import batch_size, parse_batch, slice_inputs


class TwoInputs(nn.Module):
    """``model(x, z)`` / ``model(input_ids=..., attention_mask=...)`` with a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x, z, mask=None):
        out = self.a(x) + self.b(z)
        return out if mask is None else out * mask


class Plain(nn.Module):
    def __init__(self, inner: TwoInputs) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, xz):
        return self.inner(xz[:, :4], xz[:, 4:])


def batch(n: int = 6):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, dtype=torch.float64, generator=g)
    z = torch.randn(n, 2, dtype=torch.float64, generator=g)
    return x, z, torch.randint(0, 3, (n,), generator=g)


def reference(model: TwoInputs, x, z, y, **kw):
    return curvkit.fisher(Plain(model), torch.cat([x, z], 1), y, **kw).to_dense()


@pytest.mark.parametrize("structure", ["full", "kfac", "diag"])
def test_tuple_and_dict_inputs(structure):
    model = TwoInputs().double()
    x, z, y = batch()
    ref = reference(model, x, z, y, kind="empirical", structure=structure)
    kw = dict(kind="empirical", structure=structure)
    forms = [
        curvkit.fisher(model, (x, z), y, **kw),  # targets given: the tuple is positional
        curvkit.fisher(model, ((x, z), y), **kw),  # DataLoader batch (inputs, targets)
        curvkit.fisher(model, {"x": x, "z": z}, y, **kw),  # model(**batch)
        curvkit.fisher(model, {"x": x, "z": z, "labels": y}, **kw),  # labels key
        curvkit.fisher(model, [{"x": x, "z": z}, y], **kw),  # collated list [inputs, targets]
        curvkit.fisher(model, {"x": x, "z": z, "target": y}, label_key="target", **kw),
        curvkit.fisher(model, [((x[:2], z[:2]), y[:2]), ((x[2:], z[2:]), y[2:])],
                       progress=False, **kw),  # a list of batches
    ]
    for F in forms:
        assert F.num_data == 6
        torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_unbatched_tensor_is_passed_unchanged_and_sliced_inputs():
    x, z, y = batch()
    mask = torch.ones(3, dtype=torch.float64)
    inputs = {"x": x, "z": z, "mask": mask}
    assert batch_size(inputs) == 6
    part = slice_inputs(inputs, 1, 3)
    assert part["x"].shape == (2, 4) and part["mask"] is mask
    assert torch.equal(slice_inputs((x, z), 0, 2)[1], z[:2])
    model = TwoInputs().double()
    F = curvkit.fisher(model, inputs, y, kind="empirical")
    torch.testing.assert_close(F.to_dense(), reference(model, x, z, y, kind="empirical"),
                               rtol=1e-10, atol=1e-12)


def test_hugging_face_batch_encoding_and_model_output():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import SequenceClassifierOutput

    class HF(TwoInputs):
        def forward(self, x, z):
            return SequenceClassifierOutput(logits=super().forward(x, z))

    model = HF().double()
    x, z, y = batch()
    enc = transformers.BatchEncoding({"x": x, "z": z, "labels": y})
    ref = reference(model, x, z, y, kind="empirical", structure="full")
    F = curvkit.fisher(model, enc, kind="empirical")
    torch.testing.assert_close(F.to_dense(), ref, rtol=1e-10, atol=1e-12)
    loader = [transformers.BatchEncoding({"x": x[:4], "z": z[:4], "labels": y[:4]}),
              transformers.BatchEncoding({"x": x[4:], "z": z[4:], "labels": y[4:]})]
    for structure in ("full", "kfac", "foof", "diag"):
        G = curvkit.fisher(model, loader, kind="empirical", structure=structure, progress=False)
        torch.testing.assert_close(
            G.to_dense(), reference(model, x, z, y, kind="empirical", structure=structure),
            rtol=1e-10, atol=1e-12)


def test_output_fn_and_output_errors():
    class TupleOut(TwoInputs):
        def forward(self, x, z):
            return (super().forward(x, z), "aux")

    model = TupleOut().double()
    x, z, y = batch()
    with pytest.raises(TypeError, match=r"the model returned tuple, not a Tensor or an object with "
                                        r"a \.logits tensor; pass output_fn=\.\.\."):
        curvkit.fisher(model, (x, z), y)
    F = curvkit.fisher(model, (x, z), y, output_fn=lambda out: out[0], structure="kfac")
    same = TwoInputs().double()  # same seed, same weights
    torch.testing.assert_close(F.to_dense(), reference(same, x, z, y, structure="kfac"),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="output_fn must return the logits Tensor, got str"):
        curvkit.fisher(model, (x, z), y, output_fn=lambda out: out[1])


def test_batch_errors():
    model = TwoInputs().double()
    x, z, y = batch()
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function; .*wrap a "
                                        "function-based model in an nn.Module"):
        curvkit.fisher(lambda t: t, x, y)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) or \(inputs,\), got 3 elements; for "
                                         r"several model inputs nest them"):
        curvkit.fisher(model, (x, z, y))
    with pytest.raises(ValueError, match=r"targets must have one row per input \(6\), got 5 rows"):
        curvkit.fisher(model, ((x, z), y[:5]))
    with pytest.raises(TypeError, match="targets must be a Tensor, got list"):
        parse_batch(x, [0, 1])
    with pytest.raises(TypeError, match=r"hold no tensor, so the batch size cannot be inferred"):
        curvkit.fisher(model, {"x": 1.0}, y)
    with pytest.raises(ValueError, match="the batch is empty"):
        curvkit.fisher(model, (x[:0], z[:0]), y[:0])
    with pytest.raises(ValueError, match="the first input tensor is a scalar"):
        batch_size(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"data must be a batch \(Tensor, tuple, dict\) or an "
                                        r"iterable of batches"):
        curvkit.fisher(model, 3.0, y)
    with pytest.raises(TypeError, match="inputs have dtype torch.float32 but the parameters "
                                        "torch.float64"):
        curvkit.fisher(model, {"x": x.float(), "z": z}, y)
