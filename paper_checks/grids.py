"""Hyperparameter grids, selection by the median over seeds, and automatic edge widening.

The search of one method (:func:`search`) is pure logic over an ``evaluate`` callback, so it can be
tested on a synthetic loss surface:

1. *screen*: every grid point runs with the first seed;
2. *candidates*: the ``screen`` best points by that first run (all points if ``screen`` is
   ``None``) run with every seed;
3. *selection*: the candidate with the lowest **median** final loss over the seeds (a point where
   any seed diverges scores ``inf``; ties by the mean); no fallbacks;
4. *widening*: if the selected point is the smallest or largest evaluated value of an axis (learning
   rate / ``α``, damping) among the evaluated points of its row/column, that axis gets one more value
   beyond the edge (at the selected value of the other axis and its evaluated neighbours) and steps
   1–3 repeat, until the selection is interior or the axis side has been widened ``cap`` times (then
   the remaining edge is reported). A diverged neighbour beyond the selected point makes it
   interior: the optimum is bracketed;
5. *divergence*: a candidate with a diverged seed is not eligible and is replaced by the next
   screened point that is not known to diverge (seeds of a point whose first seed diverged are not
   run); if no point converges on every seed, the learning-rate (or ``α``) axis is extended
   **downward by a decade** (the two next values of the ``{1, 3}×10^i`` pattern, so the axis stays
   contiguous) at every damping of the grid (ranking cannot guide a search where everything
   diverges), up to ``diverged_cap`` times; then the ordinary widening continues from
   the first point that converges. If the cap is reached with nothing converged, the search ends
   with a diverged selection and says so.

Grid values follow ``{1, 3}×10^i`` (learning rates) and ``10^{2i}`` (dampings); the next value
beyond an edge continues that pattern (:func:`next_value`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Default number of widenings per axis side.
WIDEN_CAP = 3
#: Widening label of the downward decade steps taken while every candidate diverges.
DIVERGED = "lr low (all diverged)"

Key = tuple[float, "float | None"]  # (lr or α, damping)


def _round(v: float) -> float:
    return float(f"{v:.6g}")


@dataclass(frozen=True)
class Grid:
    """A hyperparameter grid (the starting point of a search).

    Attributes:
        lrs: learning rates, or ratios ``α = η/λ`` if ``ratio``.
        dampings: damping values (``(None,)`` for SGD/Adam).
        ratio: whether ``lrs`` are ``α = η/λ`` (then ``η = α·λ``).
        widen: which axes may be widened automatically (``"lr"``, ``"damping"``).
    """

    lrs: tuple[float, ...]
    dampings: tuple[float | None, ...] = (None,)
    ratio: bool = False
    widen: tuple[str, ...] = ("lr", "damping")

    def keys(self) -> list[Key]:
        """``(lr or α, damping)`` of every point, dampings outermost."""
        return [(a, d) for d in self.dampings for a in self.lrs]

    def lr_of(self, key: Key) -> float:
        a, d = key
        return _round(a * d) if (self.ratio and d is not None) else a

    def points(self) -> list[tuple[float, float | None, float]]:
        """``(lr, damping, grid value)`` triples, dampings outermost."""
        return [(self.lr_of(k), k[1], k[0]) for k in self.keys()]

    def describe(self) -> str:
        lr = "α=η/λ" if self.ratio else "η"
        d = "" if self.dampings == (None,) else f", λ ∈ {{{', '.join(f'{v:g}' for v in self.dampings)}}}"
        return f"{lr} ∈ {{{', '.join(f'{v:g}' for v in self.lrs)}}}{d}"


def next_value(values: Sequence[float], up: bool) -> float:
    """The next grid value beyond ``max(values)`` (``up``) or ``min(values)``.

    A ``{1, 3}×10^i`` axis continues that pattern (…, 0.3, 1, 3, 10, …); otherwise the ratio of the
    two outermost values is repeated (a single value steps by 10).
    """
    vals = sorted(set(values))
    edge = vals[-1] if up else vals[0]
    mant = edge / 10 ** math.floor(math.log10(edge) + 1e-9)
    on_13 = all(any(abs(v / 10 ** math.floor(math.log10(v) + 1e-9) - m) < 1e-6 for m in (1, 3)) for v in vals)
    if on_13 and len(vals) > 1 and abs(vals[1] / vals[0] - 100) > 1e-6:
        if up:
            return _round(edge * (3.0 if abs(mant - 1) < 1e-6 else 10 / 3))
        return _round(edge / (3.0 if abs(mant - 3) < 1e-6 else 10 / 3))
    f = (vals[-1] / vals[-2] if up else vals[1] / vals[0]) if len(vals) > 1 else 10.0
    return _round(edge * f if up else edge / f)


def score(finals: Sequence[float]) -> tuple[float, float]:
    """Selection score of a point: (median, mean) of its final losses; ``inf`` if any diverged."""
    vals = [float(v) for v in finals]
    if not vals or not all(math.isfinite(v) for v in vals):
        return math.inf, math.inf
    return float(np.median(vals)), float(np.mean(vals))


def select(results: dict[Key, Sequence[float]]) -> Key:
    """The key with the lowest :func:`score` (ties: first in insertion order)."""
    return min(results, key=lambda k: score(results[k]))


def edges(keys: Sequence[Key], sel: Key) -> list[str]:
    """Edges of the evaluated ``keys`` the selected point lies on (axes with > 1 value only)."""
    a, d = sel
    row = [k[0] for k in keys if k[1] == d]
    col = [k[1] for k in keys if k[0] == a and k[1] is not None]
    out = []
    if len(set(row)) > 1:
        if a == min(row):
            out.append("lr low")
        if a == max(row):
            out.append("lr high")
    if len(set(col)) > 1:
        if d == min(col):  # type: ignore[type-var]
            out.append("damping low")
        if d == max(col):  # type: ignore[type-var]
            out.append("damping high")
    return out


def _neighbours(values: Sequence[Any], v: Any) -> list[Any]:
    vals = sorted(set(values))
    i = vals.index(v)
    return vals[max(0, i - 1): i + 2]


def widen_keys(keys: Sequence[Key], sel: Key, edge: str) -> list[Key]:
    """New points beyond ``edge`` of the selected point (its row/column and the neighbours)."""
    a, d = sel
    if edge.startswith("lr"):
        row = [k[0] for k in keys if k[1] == d]
        new_a = next_value(row, up=edge.endswith("high"))
        ds = _neighbours([k[1] for k in keys if k[1] is not None], d) if d is not None else [d]
        return [(new_a, dd) for dd in ds]
    col = [k[1] for k in keys if k[0] == a and k[1] is not None]
    new_d = next_value(col, up=edge.endswith("high"))  # type: ignore[arg-type]
    return [(aa, new_d) for aa in _neighbours([k[0] for k in keys if k[1] == d], a)]


@dataclass
class Search:
    """The state and outcome of one method's search (see module doc)."""

    grid: Grid
    seeds: list[int]
    screen: int | None = 3
    cap: int = WIDEN_CAP
    diverged_cap: int | None = None
    keys: list[Key] = field(default_factory=list)
    first: dict[Key, float] = field(default_factory=dict)
    finals: dict[Key, list[float]] = field(default_factory=dict)
    widened: dict[str, int] = field(default_factory=dict)
    selected: Key | None = None
    remaining_edges: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)
    done: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = self.grid.keys()
        if self.diverged_cap is None:
            self.diverged_cap = max(2, 2 * self.cap)

    # --- the three phases; ``need_*`` say which (key, seed) runs are missing
    def need_screen(self) -> list[tuple[Key, int]]:
        return [(k, self.seeds[0]) for k in self.keys if k not in self.first]

    def record(self, key: Key, seed: int, final: float) -> None:
        if seed == self.seeds[0]:
            self.first[key] = final

    def _converges(self, key: Key) -> bool:
        """Whether ``key`` is not known to diverge (first seed finite, no diverged seed so far)."""
        return math.isfinite(self.first[key]) and all(map(math.isfinite, self.finals.get(key, [0.0])))

    def candidates(self) -> list[Key]:
        """The ``screen`` best screened points by the first seed that are not known to diverge
        (if there are none: the ``screen`` best of all, which are all diverged)."""
        ranked = sorted(self.keys, key=lambda k: (not math.isfinite(self.first[k]), self.first[k]))
        n = len(ranked) if self.screen is None else max(1, self.screen)
        ok = [k for k in ranked if self._converges(k)]
        return ok[:n] if ok else ranked[:n]

    def need_seeds(self) -> list[tuple[Key, int]]:
        return [(k, s) for k in self.candidates() if k not in self.finals and math.isfinite(self.first[k])
                for s in self.seeds[1:]]

    def conclude(self, finals: dict[tuple[Key, int], float]) -> list[Key]:
        """Select among the candidates (their finals for every seed in ``finals``) and return the
        new keys to evaluate (empty and ``done``: the search is over; empty and not ``done``: a
        candidate diverged and its replacement needs its seeds)."""
        for k in self.candidates():
            if k not in self.finals:
                # a point whose first seed diverged scores inf without running the other seeds
                first = self.first[k]
                self.finals[k] = ([first if s == self.seeds[0] else finals[(k, s)] for s in self.seeds]
                                  if math.isfinite(first) else [first])
        if any(k not in self.finals for k in self.candidates()):
            return []  # a diverged candidate was replaced: run the replacement's seeds first
        cand = {k: self.finals[k] for k in self.candidates()}
        self.selected = select(cand)
        on = edges(self.keys, self.selected)
        self.remaining_edges = on
        self.capped = []
        new: list[Key] = []
        if not math.isfinite(score(cand[self.selected])[0]):
            # nothing converges on every seed: step the lr axis down a decade at every damping
            if "lr" in self.grid.widen and self.widened.get(DIVERGED, 0) < (self.diverged_cap or 0):
                for d in dict.fromkeys(k[1] for k in self.keys):
                    row = [k[0] for k in self.keys if k[1] == d]
                    for _ in range(2):  # one decade, contiguous on the {1, 3}×10^i pattern
                        row.append(next_value(row, up=False))
                        new.append((row[-1], d))
                new = [k for k in dict.fromkeys(new) if k not in self.keys]
                if new:
                    self.widened[DIVERGED] = self.widened.get(DIVERGED, 0) + 1
            elif "lr" in self.grid.widen:
                self.capped.append(DIVERGED)
        else:
            for e in [e for e in on if e.split()[0] in self.grid.widen]:
                if self.widened.get(e, 0) >= self.cap:
                    self.capped.append(e)
                    continue
                added = [k for k in widen_keys(self.keys, self.selected, e) if k not in self.keys]
                if added:
                    self.widened[e] = self.widened.get(e, 0) + 1
                    new += added
            new = list(dict.fromkeys(new))
        self.keys += new
        if not new:
            self.done = True
        return new

    def summary(self) -> dict[str, Any]:
        return {"widened": dict(self.widened), "capped_edges": list(self.capped),
                "remaining_edges": list(self.remaining_edges), "screen": self.screen, "cap": self.cap,
                "diverged_cap": self.diverged_cap,
                "candidates": [list(k) for k in self.candidates()]}


def search(grid: Grid, seeds: Sequence[int], evaluate: Callable[[list[tuple[Key, int]]], list[float]],
           screen: int | None = 3, cap: int = WIDEN_CAP, diverged_cap: int | None = None) -> Search:
    """Run one method's search with ``evaluate([(key, seed), ...]) -> finals`` (see module doc)."""
    s = Search(grid, list(seeds), screen, cap, diverged_cap)
    while not s.done:
        todo = s.need_screen()
        for (k, sd), v in zip(todo, evaluate(todo)):
            s.record(k, sd, v)
        todo = s.need_seeds()
        vals = dict(zip(todo, evaluate(todo)))
        s.conclude(vals)
    return s
