"""Command line: ``python -m paper_checks [--quick] [--only NAME ...] [--seeds N] [--jobs N]``.

* full (default): every check at the REPORT size; writes ``results/<name>.json``, the committed
  copies ``paper_checks/results/<name>.json`` and ``paper_checks/figures/<name>.png``, and
  regenerates ``paper_checks/REPORT.md``;
* ``--quick``: every check at reduced size (a few minutes on 2 cores; 2 seeds, 2 candidates per
  search, one widening per axis side); writes only under
  ``results/quick/`` (including ``results/quick/REPORT.md``), never the committed files.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from paper_checks import CHECKS, load
from paper_checks.harness import (
    NOT_RUN,
    PKG_DIR,
    REPO_ROOT,
    CheckResult,
    Config,
    Harness,
    git_commit,
    write_json,
)
from paper_checks.report import missing_requirements, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paper_checks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sizes (< 10 min on 2 cores)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # unit tests
    p.add_argument("--only", nargs="+", metavar="NAME", choices=CHECKS, help="run only these checks")
    p.add_argument("--seeds", type=int, default=None, help="seeds per selected point (default 3; "
                   "2 with --quick)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for training runs (default 2)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/, or "
                   "results/quick/ with --quick)")
    p.add_argument("--no-commit", action="store_true",
                   help="full run without writing paper_checks/results, figures and REPORT.md")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--cap", type=int, default=None, help="automatic widenings per grid-axis side "
                   "(default 2; 1 with --quick)")
    p.add_argument("--notes", default="", help="run notes recorded in _run.json and REPORT.md "
                   "(e.g. machine load)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in CHECKS:
            mod = load(name)
            print(f"{name:14s} {mod.TITLE}: {mod.CLAIM}")
        return 0
    level = "tiny" if args.tiny else ("quick" if args.quick else "full")
    seeds = args.seeds if args.seeds is not None else (3 if level == "full" else 2)
    out = args.out or (REPO_ROOT / "results" / ("" if level == "full" else level))
    commit = level == "full" and not args.no_commit and args.out is None
    command = "python -m paper_checks " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                           else sys.argv[1:]))
    cfg = Config(level=level, seeds=seeds, jobs=max(1, args.jobs), out_dir=out, commit=commit,
                 progress=not args.no_progress, command=command.strip(),
                 screen=2, cap=args.cap if args.cap is not None else
                 (2 if level == "full" else 1))
    torch.set_num_threads(1)
    git_commit()  # fix the recorded commit at the start of the invocation
    names = args.only or list(CHECKS)
    results: list[CheckResult] = []
    failed = False
    t_start = time.perf_counter()
    with Harness(cfg) as h:
        for name in names:
            mod = load(name)
            print(f"[paper_checks] {name}: {mod.TITLE} ({level})", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            missing = missing_requirements(getattr(mod, "REQUIRES", ()))
            if missing:
                res = CheckResult(name=name, title=mod.TITLE, claim=mod.CLAIM, paper=mod.PAPER,
                                  ours=f"not run: the library API {', '.join(missing)} is missing",
                                  verdict=NOT_RUN, rule="-")
                res.seconds = time.perf_counter() - t0
                h.finish(res)
            else:
                try:
                    res = mod.run(h)
                except Exception as err:  # report the failure, keep going with the other checks
                    failed = True
                    traceback.print_exc()
                    res = CheckResult(name=name, title=mod.TITLE, claim=mod.CLAIM, paper=mod.PAPER,
                                      ours=f"not run: {type(err).__name__}: {err}", verdict=NOT_RUN,
                                      rule="-")
                    res.seconds = time.perf_counter() - t0
                    h.finish(res)
            results.append(res)
            print(f"[paper_checks] {name}: {res.verdict} ({res.seconds:.0f} s) -- {res.ours}",
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - t_start
    meta = {"command": cfg.command, "level": level, "seeds": seeds, "jobs": cfg.jobs,
            "checks": names, "seconds": total, "notes": args.notes,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json(out / "_run.json", meta)
    if commit:
        write_json(PKG_DIR / "results" / "_run.json", meta)
        write_report(PKG_DIR / "results", PKG_DIR / "REPORT.md", figure_prefix="")
    else:
        write_report(out, out / "REPORT.md", figure_prefix="")
    print(f"\n{'check':14s} {'verdict':14s} {'time':>6s}  ours", file=sys.stderr)
    for r in results:
        print(f"{r.name:14s} {r.verdict:14s} {r.seconds:5.0f}s  {r.ours}", file=sys.stderr)
    print(f"total: {total:.0f} s ({total / 60:.1f} min), level={level}, seeds={seeds}, jobs={cfg.jobs}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
