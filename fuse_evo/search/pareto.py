"""Pareto bookkeeping on objective vectors: dominance, the non-dominated front, its
hypervolume against a reference point, the hypervolume after each evaluation, and a spread
of K front members.

Everything here works on losses (every objective minimized; ``to_losses`` turns objective
values in their own directions into losses), so one reference point convention holds: a
point counts toward the hypervolume only where it is strictly better than the reference in
every objective. Plain numpy; no strategy, archive or model in sight.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def to_losses(values: Mapping[str, float], directions: Mapping[str, str]) -> list[float]:
    """Objective values (each in its own direction, ``"max"`` or ``"min"``) as losses, in the
    order of ``directions``."""
    return [-float(values[n]) if d == "max" else float(values[n]) for n, d in directions.items()]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (losses)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def front_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, in input order. Equal points do not
    dominate each other: all of them stay on the front."""
    p = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    keep = []
    for i in range(len(p)):
        le = (p <= p[i]).all(axis=1)
        lt = (p < p[i]).any(axis=1)
        if not (le & lt).any():
            keep.append(i)
    return keep


def hypervolume(points: Iterable[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (losses). Points not
    strictly better than the reference in every objective add nothing. Exact: a sweep in 2
    dimensions, slicing along the last objective above that (fine for fronts of hundreds of
    points in a few dimensions)."""
    ref = np.asarray(reference, dtype=np.float64)
    p = np.asarray(list(points), dtype=np.float64).reshape(-1, ref.shape[0])
    p = p[(p < ref).all(axis=1)]
    if not len(p):
        return 0.0
    return _hv(p[front_indices(p)], ref)


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    d = ref.shape[0]
    if d == 1:
        return float(ref[0] - p[:, 0].min())
    if d == 2:
        p = p[np.lexsort((p[:, 1], p[:, 0]))]  # by the first objective, then the second
        volume, y = 0.0, ref[1]
        for x0, y0 in p:
            if y0 < y:
                volume += (ref[0] - x0) * (y - y0)
                y = y0
        return float(volume)
    # slices between consecutive values of the last objective: each slab's (d-1)-volume is
    # that of the points at or below its floor
    p = p[np.argsort(p[:, -1])]
    volume = 0.0
    for k in range(len(p)):
        top = p[k + 1, -1] if k + 1 < len(p) else ref[-1]
        if top > p[k, -1]:
            below = p[: k + 1, :-1]
            volume += (top - p[k, -1]) * _hv(below[front_indices(below)], ref[:-1])
    return float(volume)


class Front:
    """A front grown one evaluation at a time, with its hypervolume against ``reference``
    (losses; None: the front only)."""

    def __init__(self, reference: Sequence[float] | None = None):
        self.reference = None if reference is None else np.asarray(reference, dtype=np.float64)
        self.points: list[np.ndarray] = []
        self.hypervolume = 0.0

    def __len__(self) -> int:
        return len(self.points)

    def add(self, point: Sequence[float]) -> bool:
        """Offer one evaluation's losses; True when it joins the front (an equal point
        already there: False, it adds nothing)."""
        x = np.asarray(point, dtype=np.float64)
        if any(dominates(f, x) or (f == x).all() for f in self.points):
            return False
        self.points = [f for f in self.points if not dominates(x, f)] + [x]
        if self.reference is not None and (x < self.reference).all():
            self.hypervolume = hypervolume(self.points, self.reference)
        return True


def hypervolume_history(points: Sequence[Sequence[float] | None], reference: Sequence[float]) -> list[float]:
    """The hypervolume of the front of the first ``n`` points for every ``n`` (None: a failed
    evaluation, which adds nothing)."""
    front, out = Front(reference), []
    for point in points:
        if point is not None:
            front.add(point)
        out.append(front.hypervolume)
    return out


def spread(points: Sequence[Sequence[float]], k: int) -> list[int]:
    """``k`` indices of ``points`` (a front) spread over it: the best point of each objective
    first, then repeatedly the point farthest (objectives scaled to [0, 1]) from those
    chosen. All of them when ``k`` >= their number; the order is the order chosen."""
    p = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    n = len(p)
    if k >= n:
        return list(range(n))
    span = p.max(axis=0) - p.min(axis=0)
    z = (p - p.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen: list[int] = []
    for j in range(z.shape[1]):
        i = int(np.argmin(z[:, j]))
        if i not in chosen and len(chosen) < k:
            chosen.append(i)
    while len(chosen) < k:
        gaps = np.min(np.linalg.norm(z[:, None, :] - z[None, chosen, :], axis=2), axis=1)
        gaps[chosen] = -1.0
        chosen.append(int(np.argmax(gaps)))
    return chosen
