"""The report's figures, as PNG files: convergence, Pareto front (a scatter for two
objectives, parallel coordinates for more), hypervolume over evaluations, per-layer
coefficients (lines and heatmaps), a data-flow path, and the comparison of several runs.

The only module that imports matplotlib (headless: the Agg backend). Functions take plain
numbers, not archives, so a notebook can call them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..search.archive import Trial  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def best_so_far(trials: Sequence[Trial]) -> list[float | None]:
    """The best scalar after each evaluation (None until one completes)."""
    out, best = [], None
    for t in trials:
        if t.ok:
            best = t.scalar if best is None else max(best, t.scalar)
        out.append(best)
    return out


def convergence_plot(trials: Sequence[Trial], path: Path) -> None:
    """Every trial's scalar objective as a dot, the best so far as a step line."""
    xs = [t.number + 1 for t in trials if t.ok]
    ys = [t.scalar for t in trials if t.ok]
    curve = [(t.number + 1, b) for t, b in zip(trials, best_so_far(trials)) if b is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=10, alpha=0.4, label="trial")
    if curve:
        ax.step(*zip(*curve), where="post", color="C3", label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("scalar objective (larger is better)")
    ax.set_title("convergence")
    ax.legend(loc="lower right")
    _save(fig, path)


def front_scatter(names: Sequence[str], points: Sequence[Sequence[float]], front: Sequence[Sequence[float]],
                  reference: Sequence[float] | None, path: Path, heldout: Sequence[Sequence[float]] = (),
                  title: str = "Pareto front", heldout_label: str = "held-out") -> None:
    """Two objectives (their own units): every completed trial, the front joined as a
    staircase, the reference point, and the front members' held-out scores when given (drawn
    last, as larger hollow diamonds, so they stay visible where they equal a search point)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    if points:
        ax.scatter(*zip(*points), s=10, color="0.7", label="trial", zorder=1)
    if front:
        f = sorted(front)
        ax.plot(*zip(*f), color="C3", marker="o", ms=5, label=f"front ({len(f)})", zorder=2)
    if heldout:
        ax.scatter(*zip(*heldout), s=70, marker="D", facecolors="none", edgecolors="C0", linewidths=1.5,
                   label=f"front members, {heldout_label}", zorder=3)
    _reference(ax, reference, [*points, *front, *heldout])
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def _reference(ax, reference: Sequence[float] | None, points: Sequence[Sequence[float]]) -> None:
    """Mark the reference point when it lies near the points; far off (an accuracy's 0),
    drawing it would squash them into a corner: it is named in the legend instead."""
    if reference is None:
        return
    if points:
        near = all(min(p[j] for p in points) - 0.5 * _span(points, j) <= reference[j]
                   <= max(p[j] for p in points) + 0.5 * _span(points, j) for j in range(2))
        if not near:
            ax.plot([], [], " ", label=f"reference point ({reference[0]:g}, {reference[1]:g}), off the axes")
            return
    ax.scatter([reference[0]], [reference[1]], marker="x", color="k", label="reference point")


def _span(points: Sequence[Sequence[float]], j: int) -> float:
    return max(p[j] for p in points) - min(p[j] for p in points) or 1.0


def parallel_coordinates(names: Sequence[str], rows: Sequence[Sequence[float]], path: Path,
                         colour_by: Sequence[float] | None = None, title: str = "Pareto front") -> None:
    """More than two objectives: one line per front member over one axis per objective,
    each axis scaled to its members' range (written at its ends)."""
    lows = [min(r[j] for r in rows) for j in range(len(names))]
    highs = [max(r[j] for r in rows) for j in range(len(names))]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    cmap = plt.get_cmap("viridis")
    c = list(colour_by) if colour_by is not None else list(range(len(rows)))
    lo, hi = min(c), max(c)
    for row, value in zip(rows, c):
        ys = [(v - a) / (b - a) if b > a else 0.5 for v, a, b in zip(row, lows, highs)]
        ax.plot(range(len(names)), ys, color=cmap((value - lo) / (hi - lo) if hi > lo else 0.5), alpha=0.7)
    for j, (a, b) in enumerate(zip(lows, highs)):
        ax.axvline(j, color="0.6", lw=0.8)
        ax.annotate(f"{b:.3g}", (j, 1.0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
        ax.annotate(f"{a:.3g}", (j, 0.0), textcoords="offset points", xytext=(0, -10), ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(rows)} members; colour: scalar objective)")
    _save(fig, path)


def hypervolume_plot(series: Mapping[str, Sequence[float]], path: Path, reference_text: str = "") -> None:
    """Hypervolume after each evaluation, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, hv) in enumerate(series.items()):
        ax.plot(range(1, len(hv) + 1), hv, color=f"C{i % 10}", label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume")
    ax.set_title("hypervolume" + (f" (reference {reference_text})" if reference_text else ""))
    if len(series) > 1:
        ax.legend(fontsize=7)
    _save(fig, path)


def coefficients_plot(labels: list[str], series: dict[str, list[float]], title: str, path: Path) -> None:
    """Per-layer coefficients of one recipe, one line per source model and parameter."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_xlabel("tensor group (embedding, layers, final norm, head)")
    ax.set_ylabel("coefficient")
    ax.set_title(title)
    ax.set_xticks(range(len(labels)), labels)
    if series:
        ax.legend(fontsize=7)
    _save(fig, path)


def coefficient_heatmaps(labels: list[str], rows: Sequence[tuple[str, dict[str, list[float]]]], title: str,
                         path: Path) -> None:
    """One heatmap per source model and parameter: a row per recipe (e.g. the best, or each
    front member), a column per tensor group, colour the coefficient."""
    fig = heatmap_figure(labels, rows, title)
    if fig is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)


def heatmap_figure(labels: list[str], rows: Sequence[tuple[str, dict[str, list[float]]]], title: str):
    """``coefficient_heatmaps``' figure (None: nothing to draw). Laid out by matplotlib's
    constrained layout, so the title, the panels' titles, the row labels (on the first panel
    only) and the colour bar never overlap."""
    keys = list(dict.fromkeys(k for _, series in rows for k in series))
    if not keys:
        return None
    values = [[series.get(k) or [float("nan")] * len(labels) for _, series in rows] for k in keys]
    lo = min(v for m in values for r in m for v in r if v == v)
    hi = max(v for m in values for r in m for v in r if v == v)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(5, 3.2 * len(keys)), 1.8 + 0.3 * len(rows)), squeeze=False,
                             layout="constrained")
    for j, (ax, key, grid) in enumerate(zip(axes[0], keys, values)):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
        ax.set_yticks(range(len(rows)), [name for name, _ in rows] if j == 0 else [], fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def path_plot(path, title: str, path_png: Path) -> None:
    """A data-flow path: each step's layer index, coloured by its model, its scale written
    beside it."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(path.steps)), 4))
    ax.plot(range(len(path.steps)), [i for _, i in path.steps], color="0.8", zorder=1)
    for n, model in enumerate(dict.fromkeys(m for m, _ in path.steps)):
        ks = [k for k, (m, _) in enumerate(path.steps) if m == model]
        ax.scatter(ks, [path.steps[k][1] for k in ks], color=f"C{n}", label=model, zorder=2)
    for k, ((_, i), s) in enumerate(zip(path.steps, path.scales)):
        ax.annotate(f"{s:.2f}", (k, i), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel(f"step (embedding and head: {path.io_model})")
    ax.set_ylabel("source layer")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path_png)


def compare_plot(curves: Mapping[str, Sequence[float | None]], groups: Mapping[str, str], path: Path,
                 ylabel: str = "best scalar so far", threshold: float | None = None) -> None:
    """One line per run (best so far, or hypervolume, vs evaluations), a colour per group
    (runs that differ only in their seed share one)."""
    colours = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(groups.values()))}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    for run, ys in curves.items():
        g = groups[run]
        pts = [(i + 1, y) for i, y in enumerate(ys) if y is not None]
        if pts:
            ax.step(*zip(*pts), where="post", color=colours[g], alpha=0.8, label=None if g in labelled else g)
            labelled.add(g)
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label="95% of the best")
    ax.set_xlabel("evaluations")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    _save(fig, path)


def fronts_plot(names: Sequence[str], fronts: Mapping[str, Sequence[Sequence[float]]], path: Path,
                reference: Sequence[float] | None = None, title: str = "Pareto fronts") -> None:
    """Two objectives: several runs' fronts as staircases in one plot."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (label, front) in enumerate(fronts.items()):
        if front:
            ax.plot(*zip(*sorted(front)), marker="o", ms=3, color=f"C{i % 10}", label=f"{label} ({len(front)})")
    _reference(ax, reference, [p for f in fronts.values() for p in f])
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)
