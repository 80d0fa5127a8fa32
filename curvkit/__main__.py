"""Command line: ``curvkit validate [options]`` (or ``python -m curvkit validate``).

``validate`` runs a built-in demo on scikit-learn's digits (8×8 images, 10 classes): it trains a
small ReLU MLP for a few epochs with Adam, then compares the curvature structures with the exact
damped Fisher on a batch of training images (:func:`curvkit.validate.compare`) and prints the
table (``--json PATH`` also writes :meth:`ValidationReport.to_dict`). Progress bars (tqdm, on
stderr) show the training epochs; ``--no-progress`` turns them off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from curvkit import __version__
from curvkit.capture import KINDS
from curvkit.typing import Kind, Structure
from curvkit.validate import DEFAULT_STRUCTURES, REFERENCES, ValidationReport, compare


def _ints(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return vals


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive(kind: type):
    def parse(text: str):
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    return parse


def digits_demo(
    hidden: Sequence[int] = (32, 32),
    num_data: int = 256,
    epochs: int = 5,
    kind: Kind = "exact",
    damping: float = 1e-3,
    reference: str = "explicit",
    structures: Sequence[Structure] = DEFAULT_STRUCTURES,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    mc_samples: int = 1,
    progress: bool = True,
) -> tuple[ValidationReport, dict]:
    """Train a ReLU MLP ``64-hidden-10`` on digits, then :func:`compare` on ``num_data`` images.

    Args:
        hidden: Hidden layer widths.
        num_data: Number of training images the structures are compared on (the batch ``N``).
        epochs: Epochs of Adam (lr 1e-3, batch 64) before comparing.
        kind: Fisher kind of the reference and of every structure.
        damping: Damping ``λ > 0``.
        reference: ``"explicit"`` (dense ``P × P``) or ``"woodbury"``.
        structures: Structures to compare.
        seed: Seed of the data split, initialisation, training order and MC sampling.
        dtype: Floating dtype of the model and data.
        mc_samples: MC samples per input for ``kind="mc"``.
        progress: Show a tqdm progress bar over the training epochs on stderr.

    Returns:
        ``(report, info)`` with ``info`` holding the model and training summary.

    Raises:
        ValueError: If ``num_data`` is not in ``[1, number of training images]``, or
            :func:`compare` rejects an argument.
        MemoryError: If ``reference="explicit"`` would not fit in memory.
    """
    from curvkit.datasets import load_digits

    ds = load_digits(seed=seed).to(dtype=dtype)
    if not 0 < num_data <= ds.n_train:
        raise ValueError(f"num_data must lie in [1, {ds.n_train}] (training images), got {num_data}")
    torch.manual_seed(seed)
    widths = [ds.x_train.shape[1], *hidden, ds.num_classes]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in tqdm(range(epochs), desc="train (Adam)", unit="epoch", disable=not progress):
        perm = torch.randperm(ds.n_train, generator=g)
        for i in range(0, ds.n_train, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).double().mean())
    idx = torch.randperm(ds.n_train, generator=g)[:num_data]
    report = compare(model, ds.x_train[idx], ds.y_train[idx], likelihood="classification", kind=kind,
                     structures=tuple(structures), damping=damping, reference=reference,
                     generator=torch.Generator().manual_seed(seed), mc_samples=mc_samples)
    info = {"data": "digits", "architecture": "-".join(map(str, widths)), "activation": "ReLU",
            "epochs": epochs, "test_accuracy": acc, "seed": seed}
    return report, info


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (the ``curvkit`` console script).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 for bad arguments (also raised by argparse as
        ``SystemExit(2)``) or a demo that cannot run (the error is printed to stderr).
    """
    parser = argparse.ArgumentParser(prog="curvkit", description="curvkit command line")
    parser.add_argument("--version", action="version",
                        version=f"curvkit {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "validate",
        help="compare KFAC / FOOF / block-diagonal / diagonal with the exact Fisher (digits demo)",
        description="Train a small MLP on scikit-learn's digits, then compare curvature structures "
                    "with the exact damped Fisher on one batch and print the table.",
    )
    v.add_argument("--hidden", type=_ints, default=[32, 32], help="hidden widths (default 32,32)")
    v.add_argument("--num-data", type=_positive(int), default=256, help="batch size N (default 256)")
    v.add_argument("--epochs", type=int, default=5, help="Adam epochs before comparing (default 5)")
    v.add_argument("--kind", choices=KINDS, default="exact", help="Fisher kind (default exact)")
    v.add_argument("--mc-samples", type=_positive(int), default=1, help="MC samples for --kind mc")
    v.add_argument("--damping", type=_positive(float), default=1e-3, help="damping λ (default 1e-3)")
    v.add_argument("--reference", choices=REFERENCES, default="explicit",
                   help="explicit P×P Fisher or Woodbury solves (default explicit)")
    v.add_argument("--structures", type=_names, default=list(DEFAULT_STRUCTURES),
                   help="comma-separated structures (default kfac,foof,block_diag,diag)")
    v.add_argument("--seed", type=int, default=0, help="seed of data split, init, training, MC")
    v.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    v.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    v.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args(argv)

    if args.epochs < 0:
        parser.error(f"--epochs must be ≥ 0, got {args.epochs}")
    try:
        report, info = digits_demo(
            hidden=args.hidden, num_data=args.num_data, epochs=args.epochs, kind=args.kind,
            damping=args.damping, reference=args.reference, structures=args.structures,
            seed=args.seed, dtype=torch.float32 if args.float32 else torch.float64,
            mc_samples=args.mc_samples, progress=not args.no_progress,
        )
    except (ValueError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"digits demo: MLP {info['architecture']} ({info['activation']}), {info['epochs']} epochs "
          f"of Adam, test accuracy {info['test_accuracy']:.3f}")
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"demo": info, **report.to_dict()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
