"""Coarse-then-refine: which grid points of a latency table to measure; the rest are interpolated.

A unit's latency over its ``(c_in, c_out)`` grid is mostly smooth, with steps where the kernel
changes algorithm or SIMD blocking. Measuring every point is what made tables slow: a 368-channel
RegNet stage at step 8 alone is 46 × 46 points. Instead, per unit:

1. Measure a coarse lattice (every ``start``-th grid value, and the last one): its cells.
2. For every open cell measure the midpoints of its edges and its centre. If bilinear
   interpolation from the cell's corners predicts each of them within ``tol`` (or within the
   midpoint's own measured spread, whichever is larger), the cell is accepted: its four
   half-cells are final and their other points are interpolated from the measured 3 × 3 points.
   Otherwise the half-cells are opened and checked the same way at the next level.
3. Cells are checked worst first while the point budget lasts (``budget`` × the full grid, but
   never less than the lattice and its first check). A cell the budget or the time limit leaves
   unchecked is interpolated from its corners, and the build says how many.

Interpolation is bilinear in channel counts (not in grid index: concatenation readers have
irregular ``c_in`` grids). Depthwise units have one width (``c_in = c_out``) and refine in 1-D.
Interpolated entries are stored with ``samples = 0``, so a table says which points were measured.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

Point = tuple[str, int, int]          # (unit key, c_in, c_out)
PROFILE_MIN = 6      # a 2-D grid at least this wide on both axes is profiled
PROFILE_RISE = 0.02  # a profile is trusted between two points when it rises by this fraction
Cell = tuple[int, int, int, int]       # grid indices (i0, i1, j0, j1) of its corners


@dataclass(frozen=True)
class Refinement:
    """How much of a table's grid is measured. ``start=1`` measures every point (no refinement)."""

    start: int = 8
    tol: float = 0.03
    budget: float = 0.3
    atol_ms: float = 0.002

    def __post_init__(self) -> None:
        if self.start < 1 or self.start & (self.start - 1):
            raise ValueError(f"refine start must be a power of two >= 1 grid steps, got {self.start}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"refine budget must be a fraction of the grid in (0, 1], got {self.budget}")
        if self.tol < 0:
            raise ValueError(f"refine tol must be >= 0, got {self.tol}")

    @classmethod
    def off(cls) -> "Refinement":
        return cls(start=1, budget=1.0)

    def to_dict(self) -> dict:
        return asdict(self)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _lattice(n: int, start: int) -> list[int]:
    """Grid indices of the coarse lattice on an axis of ``n`` values: at most every ``start``-th,
    spaced so that an axis has at least two cells to check where it can."""
    s = min(start, _pow2_floor(max(1, (n - 1) // 2)))
    idx = list(range(0, n, s))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


@dataclass
class UnitGrid:
    """One unit's grid: axis values, and which (i, j) index points the model can reach."""

    key: str
    a: list[int]                      # c_in values (or the one width of a depthwise unit)
    b: list[int]                      # c_out values ([0] placeholder when diagonal)
    diagonal: bool
    wanted: set[tuple[int, int]] = field(default_factory=set)

    @classmethod
    def of(cls, key: str, points: Iterable[tuple[int, int]]) -> "UnitGrid":
        pts = sorted(set(points))
        if pts and all(ci == co for ci, co in pts):
            a = sorted({ci for ci, _ in pts})
            return cls(key, a, [0], True, {(a.index(ci), 0) for ci, _ in pts})
        a, b = sorted({ci for ci, _ in pts}), sorted({co for _, co in pts})
        ia, ib = {v: i for i, v in enumerate(a)}, {v: j for j, v in enumerate(b)}
        return cls(key, a, b, False, {(ia[ci], ib[co]) for ci, co in pts})

    def point(self, i: int, j: int) -> Point:
        return (self.key, self.a[i], self.a[i] if self.diagonal else self.b[j])

    def wanted_in(self, c: Cell) -> list[tuple[int, int]]:
        i0, i1, j0, j1 = c
        return [(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1) if (i, j) in self.wanted]

    @property
    def profiled(self) -> bool:
        """Whether this unit is measured along a full row and column (wide 2-D grids only)."""
        return not self.diagonal and min(len(self.a), len(self.b)) >= PROFILE_MIN

    def profile_points(self) -> set[tuple[int, int]]:
        """The full row at the widest c_in and the full column at the widest c_out."""
        if not self.profiled:
            return set()
        ia, jb = len(self.a) - 1, len(self.b) - 1
        return {(ia, j) for j in range(len(self.b))} | {(i, jb) for i in range(len(self.a))}

    def _warp(self, lo: int, hi: int, k: int, axis: str, value: dict[Point, float]) -> float:
        """Where ``k`` lies between ``lo`` and ``hi`` (0..1): along the measured profile where it
        rises enough to be trusted, else linearly in channels."""
        xs = self.a if axis == "a" else self.b
        if hi == lo:
            return 0.0
        lin = (xs[k] - xs[lo]) / (xs[hi] - xs[lo])
        if not self.profiled:
            return lin
        prof = ((lambda t: value.get(self.point(t, len(self.b) - 1))) if axis == "a"
                else (lambda t: value.get(self.point(len(self.a) - 1, t))))
        p0, p1, pk = prof(lo), prof(hi), prof(k)
        if p0 is None or p1 is None or pk is None or abs(p1 - p0) < PROFILE_RISE * max(abs(p0), abs(p1)):
            return lin
        return min(1.0, max(0.0, (pk - p0) / (p1 - p0)))

    def interpolate(self, c: Cell, i: int, j: int, value: dict[Point, float]) -> float:
        """Bilinear from the measured corners of cell ``c``, with each axis warped by the unit's
        profile (its staircase) where it has one."""
        i0, i1, j0, j1 = c
        u = self._warp(i0, i1, i, "a", value)
        v = self._warp(j0, j1, j, "b", value)
        f = lambda ii, jj: value[self.point(ii, jj)]  # noqa: E731
        return ((1 - u) * (1 - v) * f(i0, j0) + u * (1 - v) * f(i1, j0)
                + (1 - u) * v * f(i0, j1) + u * v * f(i1, j1))


def _corners(c: Cell) -> set[tuple[int, int]]:
    i0, i1, j0, j1 = c
    return {(i0, j0), (i1, j0), (i0, j1), (i1, j1)}


def _mid(lo: int, hi: int) -> int | None:
    return (lo + hi) // 2 if hi - lo >= 2 else None


def _checks(c: Cell) -> list[tuple[int, int]]:
    """Edge midpoints and centre of a cell (along the axes it can still be split)."""
    i0, i1, j0, j1 = c
    mi, mj = _mid(i0, i1), _mid(j0, j1)
    out = set()
    if mi is not None:
        out |= {(mi, j0), (mi, j1)}
    if mj is not None:
        out |= {(i0, mj), (i1, mj)}
    if mi is not None and mj is not None:
        out.add((mi, mj))
    return sorted(out)


def _halves(c: Cell) -> list[Cell]:
    i0, i1, j0, j1 = c
    mi, mj = _mid(i0, i1), _mid(j0, j1)
    ia = [(i0, mi), (mi, i1)] if mi is not None else [(i0, i1)]
    ja = [(j0, mj), (mj, j1)] if mj is not None else [(j0, j1)]
    return [(a0, a1, b0, b1) for a0, a1 in ia for b0, b1 in ja]


class Refiner:
    """Chooses the points of a coarse-then-refine build, level by level.

    Usage: measure :meth:`first`, then repeatedly pass all values measured so far to
    :meth:`next` and measure what it returns, until it returns nothing; :meth:`fill` then gives
    every wanted point. Decisions depend only on the values, so a resumed build that reads its
    measured points back makes the same choices."""

    def __init__(self, points: dict[str, list[tuple[int, int]]], refine: Refinement) -> None:
        self.refine = refine
        self.grids = {k: UnitGrid.of(k, v) for k, v in points.items() if v}
        self.open: dict[str, list[Cell]] = {k: [] for k in self.grids}
        self.final: dict[str, list[Cell]] = {k: [] for k in self.grids}
        self.closed: set[tuple[str, Cell]] = set()  # cells the budget or the time limit left unchecked
        self.unchecked = 0  # wanted points interpolated from those (set by fill)
        self.full = sum(len(g.wanted) for g in self.grids.values())
        if refine.start == 1:  # measure exactly the wanted points
            self.lattice = sorted(g.point(*p) for g in self.grids.values() for p in g.wanted)
            self.checks: list[Point] = []
            self.budget = len(self.lattice)
            return
        lattice: set[Point] = set()
        first: set[Point] = set()
        hull: set[Point] = set()
        for k, g in self.grids.items():
            la, lb = _lattice(len(g.a), refine.start), _lattice(len(g.b), refine.start)
            pa = list(zip(la, la[1:])) or [(la[0], la[0])]
            pb = list(zip(lb, lb[1:])) or [(lb[0], lb[0])]
            cells = [c for c in ((a0, a1, b0, b1) for a0, a1 in pa for b0, b1 in pb) if g.wanted_in(c)]
            for c in cells:
                (self.open if _checks(c) else self.final)[k].append(c)
                lattice |= {g.point(*p) for p in _corners(c)}
                first |= {g.point(*p) for p in _checks(c)}
                hull |= {g.point(i, j) for i in range(c[0], c[1] + 1) for j in range(c[2], c[3] + 1)}
            lattice |= {g.point(*p) for p in g.profile_points()}
        self.lattice = sorted(lattice)
        self.checks = sorted(first - lattice)
        # the most this build measures, which is what it announces
        self.budget = min(len(hull), max(len(lattice | first), int(refine.budget * self.full + 0.999)))

    def first(self) -> list[Point]:
        """The lattice and its cells' first checks: what every build measures."""
        return self.lattice + self.checks

    def next(self, value: dict[Point, float], spread: dict[Point, float], measured: int,
             stop: bool = False) -> list[Point]:
        """Decide the open cells whose checks are measured; return the next level's check points
        that fit in the budget (``measured`` points so far). ``stop`` (time is up): close all."""
        tol, atol = self.refine.tol, self.refine.atol_ms
        pending: list[tuple[float, str, Cell]] = []  # (priority, unit, cell) to check next
        for k, cells in self.open.items():
            g = self.grids[k]
            for c in cells:
                checks = _checks(c)
                if stop or any(g.point(*p) not in value for p in checks):
                    self._close(k, c)
                    continue
                worst, ok = 0.0, True
                for i, j in checks:
                    p = g.point(i, j)
                    err = abs(value[p] - g.interpolate(c, i, j, value))
                    worst = max(worst, err)
                    ok = ok and err <= max(tol, spread.get(p, 0.0)) * value[p] + atol
                for h in _halves(c):
                    if not g.wanted_in(h):
                        continue
                    if ok or not _checks(h):
                        self.final[k].append(h)
                    else:  # worst first: the error times the points it would misprice
                        pending.append((worst * len(g.wanted_in(h)), k, h))
        self.open = {k: [] for k in self.grids}
        pending.sort(key=lambda t: -t[0])
        todo: set[Point] = set()
        left = self.budget - measured
        for _, k, c in pending:
            g = self.grids[k]
            new = {g.point(*p) for p in _checks(c)} - value.keys() - todo
            if len(new) <= left:
                todo |= new
                left -= len(new)
                self.open[k].append(c)
            else:
                self._close(k, c)
        if not todo and any(self.open.values()):  # their checks are measured already: decide now
            return self.next(value, spread, measured)
        return sorted(todo)

    def _close(self, k: str, c: Cell) -> None:
        self.closed.add((k, c))
        self.final[k].append(c)

    def fill(self, value: dict[Point, float]) -> dict[Point, tuple[float, bool]]:
        """Every wanted point: (ms, measured?). Unmeasured ones from the smallest final cell
        holding them."""
        out: dict[Point, tuple[float, bool]] = {}
        self.unchecked = 0
        for k, g in self.grids.items():
            best: dict[tuple[int, int], Cell] = {}
            for c in sorted(self.final[k], key=lambda c: -(c[1] - c[0] + 1) * (c[3] - c[2] + 1)):
                for p in g.wanted_in(c):
                    best[p] = c  # smaller cells come later and win
            for (i, j) in g.wanted:
                p = g.point(i, j)
                if p in value:
                    out[p] = (value[p], True)
                else:
                    out[p] = (g.interpolate(best[(i, j)], i, j, value), False)
                    self.unchecked += (k, best[(i, j)]) in self.closed
        return out
