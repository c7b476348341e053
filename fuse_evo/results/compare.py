"""``fuse-evo report DIR1 DIR2 ...`` (or a folder of runs): several searches in one table and
one plot, e.g. the strategies or seeds of a study.

Runs that differ only in their seed form a group (same strategy, space method and genes,
budget); each group gets the mean and spread of its runs. Per run: evaluations, the best
scalar and when it was found, the evaluations needed to reach 95% of the best scalar seen in
any run, and with ``--heldout`` the best recipe's held-out scores (plus every source model,
once). Runs of several objectives also get their front's hypervolume against one reference
point shared by all runs, its history, and (two objectives) their fronts in one plot.
Written to ``OUT/compare.md`` (embedding ``compare.png`` ...) and ``OUT/compare.json``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..errors import FuseEvoError
from ..search import pareto
from ..search.archive import CONFIG_FILE, Archive, Trial, loss_points
from . import plots
from ..evaluate.outcomes import Difference
from .heldout import HeldOutMerge, heldout_spread, paired_difference

THRESHOLD = 0.95


class CompareError(FuseEvoError):
    """Runs that cannot be compared (the message names the run at fault)."""


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is a run directory, or a folder holding run directories (searched three
    levels down, skipping a run's own ``stages/`` and ``report/``); sorted, each once."""
    found: list[Path] = []
    for p in paths:
        p = Path(p).expanduser().resolve()
        if (p / CONFIG_FILE).is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise CompareError(f"{p}: not a run directory or a folder of runs")
        inside = sorted(c.parent for depth in ("*", "*/*", "*/*/*") for c in p.glob(f"{depth}/{CONFIG_FILE}")
                        if not {"stages", "report"} & set(c.relative_to(p).parts[:-1]))
        inside = [r for r in inside if not any(q != r and q in r.parents for q in inside)]
        if not inside:
            raise CompareError(f"{p}: holds no run directory (no */{CONFIG_FILE})")
        found += inside
    return list(dict.fromkeys(found))


def evaluations_to(curve: Sequence[float | None], threshold: float) -> int | None:
    """The first evaluation (1-based) whose best-so-far reaches ``threshold``."""
    for i, best in enumerate(curve):
        if best is not None and best >= threshold:
            return i + 1
    return None


def group_label(info: dict[str, Any]) -> str:
    """What a run searched, without its seed: strategy, method, genes, budget."""
    genes = info.get("genes") or []
    return f"{info.get('strategy')}, {info.get('method')} ({len(genes)} gene{'s' * (len(genes) != 1)}), " \
           f"budget {info.get('budget')}"


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(mean: float | None, sd: float | None, digits: int = 4) -> str:
    return "-" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _short(run: Path, root: Path) -> str:
    try:
        return str(run.relative_to(root)) or run.name
    except ValueError:
        return str(run)


def _common_root(runs: Sequence[Path]) -> Path:
    parents = [set(r.parents) for r in runs]
    common = set.intersection(*parents) if parents else set()
    return max(common, key=lambda p: len(p.parts)) if common else Path("/")


def compare_runs(paths: Sequence[str | Path], out: str | Path | None = None, heldout: bool = False,
                 device: str | None = None, front_heldout: int = 0) -> dict[str, Any]:
    """Compare the runs under ``paths``; returns what ``compare.json`` holds plus ``text``."""

    runs = find_runs(paths)
    root = _common_root(runs)
    out = Path(out).expanduser().resolve() if out else (root / "report")
    rows: list[dict[str, Any]] = []
    objective_keys = None
    histories: dict[str, list[Trial]] = {}
    infos: dict[str, dict[str, Any]] = {}
    for run in runs:
        with Archive.open(run) as archive:
            info, trials = archive.info, archive.trials()
            keys = [(o["name"], o.get("metric"), o.get("cost"), o["direction"], o["weight"]) for o in info["objectives"]]
            if objective_keys is None:
                objective_keys, first = keys, run
            elif keys != objective_keys:
                raise CompareError(f"{run}: scored with other objectives than {first} "
                                   f"({[k[0] for k in keys]} vs {[k[0] for k in objective_keys]}, or metrics, "
                                   "directions or weights differ)")
            best = archive.best()
            name = _short(run, root)
            histories[name], infos[name] = trials, info
            rows.append({"run": name, "dir": str(run), "group": group_label(info), "seed": info.get("seed"),
                         "strategy": info.get("strategy"), "evaluations": len(trials),
                         "best_scalar": None if best is None else best.scalar,
                         "best_trial": None if best is None else best.number,
                         "best_objectives": None if best is None else best.objectives,
                         "reference": archive.reference_point(), "front": archive.pareto_front()})
    if not rows:
        raise CompareError("no runs to compare")
    names = [k[0] for k in objective_keys]
    directions = {k[0]: k[3] for k in objective_keys}
    curves = {r["run"]: plots.best_so_far(histories[r["run"]]) for r in rows}
    top = max((r["best_scalar"] for r in rows if r["best_scalar"] is not None), default=None)
    threshold = THRESHOLD * top if top is not None and top > 0 else None
    for r in rows:
        r["evaluations_to_95"] = None if threshold is None else evaluations_to(curves[r["run"]], threshold)

    multi = len(names) > 1 and any(infos[r["run"]].get("multi_objective") for r in rows)
    reference = _shared_reference(rows, names, directions) if multi else None
    if reference is not None:
        ref = pareto.to_losses(reference, directions)
        for r in rows:
            r["hypervolume_history"] = pareto.hypervolume_history(loss_points(histories[r["run"]], directions), ref)
            r["hypervolume"] = r["hypervolume_history"][-1] if r["hypervolume_history"] else 0.0
            r["front_size"] = len(r["front"])

    sources_rows: list[dict[str, Any]] = []
    labels: list[str] = []  # what each run's held-out scores are (a search split without a held-out set)
    plans: dict[str, Any] = {}  # run -> its held-out plan
    if heldout:
        lives: dict[str, Any] = {}
        for r in rows:
            if r["best_trial"] is None:
                continue
            with Archive.open(r["dir"]) as archive:
                key = json.dumps([archive.info["sources"], archive.info.get("tasks")], sort_keys=True)
                live = lives.get(key)
                if live is None:
                    live = lives[key] = HeldOutMerge(archive, device=device)
                    for source in live.sources:
                        live.load(live.source_recipe(source))
                        sources_rows.append({"model": source, "models": key, **live.heldout()})
                live.load(archive.trial(r["best_trial"]).to_recipe())
                r["heldout"], r["models"], plans[r["run"]] = live.heldout(), key, live.plan
                labels.append(live.plan.label)
                if reference is not None and front_heldout and r["front"]:
                    held = [h for _, h in heldout_spread(live, r["front"], directions, front_heldout)]
                    r["heldout_front"] = held
                    r["heldout_hypervolume"] = pareto.hypervolume(
                        [pareto.to_losses(h, directions) for h in held if set(names) <= set(h)],
                        pareto.to_losses(reference, directions))

    out.mkdir(parents=True, exist_ok=True)
    groups = {r["run"]: r["group"] for r in rows}
    figures = [("Best scalar so far, every run", "compare.png")]
    plots.compare_plot(curves, groups, out / "compare.png", threshold=threshold)
    if reference is not None:
        plots.compare_plot({r["run"]: r["hypervolume_history"] for r in rows}, groups,
                           out / "compare_hypervolume.png", ylabel="hypervolume")
        figures.append(("Hypervolume, every run", "compare_hypervolume.png"))
        if len(names) == 2:
            plots.fronts_plot(names, {r["run"]: [[t.objectives[n] for n in names] for t in r["front"]] for r in rows},
                              out / "compare_fronts.png", [reference[n] for n in names])
            figures.append(("Fronts (search split)", "compare_fronts.png"))

    paired = _paired(rows, sources_rows, infos, plans)
    for h in [*(r.get("heldout") or {} for r in rows), *sources_rows]:  # outcomes served the pairing only
        h.pop("outcomes", None)
    summary = _summarize(rows, names, threshold, reference, sources_rows, out, labels)
    summary["paired"] = paired
    text = _markdown(summary, names, figures)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    summary["text"] = text
    return summary


def _paired(rows: list[dict[str, Any]], sources_rows: list[dict[str, Any]], infos: dict[str, Any],
            plans: dict[str, Any]) -> list[dict[str, Any]]:
    """The best run's best against every other run's best and every source model over the same
    models and tasks: the held-out difference of the scalar, paired by document, with its 95%
    bootstrap interval."""
    held = [r for r in rows if r.get("heldout") and r.get("best_scalar") is not None]
    if not held:
        return []
    top = max(held, key=lambda r: r["best_scalar"])
    others = [(f"run {r['run']}", r["heldout"]) for r in held if r is not top and r["models"] == top["models"]]
    others += [(f"source {s['model']}", s) for s in sources_rows if s["models"] == top["models"]]
    out = []
    for name, h in others:
        diff = paired_difference(infos[top["run"]], plans[top["run"]], top["heldout"], h)
        if diff is not None:
            out.append({"best": top["run"], "against": name, **diff})
    return out


def _shared_reference(rows: list[dict[str, Any]], names: list[str], directions: dict[str, str]) -> dict[str, float]:
    """One reference point for every run: each objective's stated (or default) value when
    all runs agree on it, else the worst value any run has seen."""
    point: dict[str, float] = {}
    for n in names:
        stated = {r["reference"][0].get(n) for r in rows if r["reference"][1].get(n) in ("stated", "default")}
        if len(stated) == 1 and all(r["reference"][1].get(n) in ("stated", "default") for r in rows):
            point[n] = stated.pop()
        else:
            values = [t.objectives[n] for r in rows for t in r["front"]]
            if values:
                point[n] = min(values) if directions[n] == "max" else max(values)
    return point


def _summarize(rows, names, threshold, reference, sources_rows, out: Path, labels: Sequence[str] = ()
               ) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    group_rows = []
    for label, members in groups.items():
        reached = [m["evaluations_to_95"] for m in members if m["evaluations_to_95"] is not None]
        g = {"group": label, "runs": len(members),
             "best_scalar": _mean_sd([m["best_scalar"] for m in members if m["best_scalar"] is not None]),
             "evaluations_to_95": _mean_sd(reached), "reached_95": len(reached)}
        held = [m["heldout"]["scalar"] for m in members if (m.get("heldout") or {}).get("scalar") is not None]
        if held:
            g["heldout_scalar"] = _mean_sd(held)
            g["heldout_objectives"] = {n: _mean_sd([m["heldout"]["objectives"][n] for m in members
                                                    if n in (m.get("heldout") or {}).get("objectives", {})])
                                       for n in names}
        if reference is not None:
            g["hypervolume"] = _mean_sd([m["hypervolume"] for m in members])
            hh = [m["heldout_hypervolume"] for m in members if m.get("heldout_hypervolume") is not None]
            if hh:
                g["heldout_hypervolume"] = _mean_sd(hh)
        group_rows.append(g)
    scored = [r for r in rows if r["best_scalar"] is not None]
    best = max(scored, key=lambda r: r["best_scalar"]) if scored else None
    keep = ("run", "dir", "group", "seed", "strategy", "evaluations", "best_scalar", "best_trial", "best_objectives",
            "evaluations_to_95", "heldout", "hypervolume", "heldout_hypervolume", "front_size")
    return {"out": str(out), "objectives": names, "threshold": threshold, "reference_point": reference,
            "runs": [{k: r[k] for k in keep if k in r} for r in rows], "groups": group_rows,
            "sources_heldout": [{"model": s["model"], "objectives": s["objectives"], "scalar": s["scalar"]}
                                for s in sources_rows],
            "heldout_label": "; ".join(dict.fromkeys(labels)) or None,
            "best": None if best is None else {"run": best["run"], "dir": best["dir"], "trial": best["best_trial"],
                                               "scalar": best["best_scalar"]}}


def _markdown(summary: dict[str, Any], names: list[str], figures: list[tuple[str, str]]) -> str:
    runs, groups = summary["runs"], summary["groups"]
    has_held = any(r.get("heldout") for r in runs)
    held = summary.get("heldout_label") or "held-out"  # "search split (no held-out set)" when there is none
    has_hv = summary["reference_point"] is not None
    threshold = summary["threshold"]
    lines = [f"# Comparison of {len(runs)} runs", ""]
    if summary["best"]:
        b = summary["best"]
        lines += [f"Best: run `{b['run']}`, trial {b['trial']} (search scalar {b['scalar']:.4f}); export it with "
                  f"`fuse-evo export {b['dir']} --pick trial:{b['trial']} --out DIR`.", ""]
    lines += [f"Evaluations to 95%: the first evaluation whose best so far reaches {_fmt(threshold)} "
              "(95% of the best search scalar of any run here)." if threshold is not None else
              "Evaluations to 95%: not defined (no positive best scalar).", ""]
    if has_hv:
        ref = summary["reference_point"]
        lines += ["Hypervolume against the reference point " + ", ".join(f"{n} {ref[n]:g}" for n in names if n in ref)
                  + " (search split" + (f"; {held}: the front members scored there" if has_held else "") + ").", ""]
    header = ["group", "runs", "best search scalar", "evaluations to 95% (runs reaching)"]
    if has_held:
        header += [f"{held} scalar of the best", *[f"{held} {n}" for n in names]]
    if has_hv:
        header += ["hypervolume"] + ([f"{held} hypervolume"] if has_held else [])
    lines += ["## Groups (mean ± sd over runs)", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for g in groups:
        e_mean, e_sd = g["evaluations_to_95"]
        cells = [g["group"], str(g["runs"]), _pm(*g["best_scalar"]),
                 f"{_pm(e_mean, e_sd, 0)} ({g['reached_95']}/{g['runs']})" if e_mean is not None else f"- (0/{g['runs']})"]
        if has_held:
            cells += [_pm(*g.get("heldout_scalar", (None, None)))]
            cells += [_pm(*g.get("heldout_objectives", {}).get(n, (None, None))) for n in names]
        if has_hv:
            cells += [_pm(*g["hypervolume"])] + ([_pm(*g.get("heldout_hypervolume", (None, None)))] if has_held else [])
        lines.append("| " + " | ".join(cells) + " |")
    header = ["run", "seed", "evaluations", "best search scalar (trial)", "evaluations to 95%"]
    if has_held:
        header += [f"{held} scalar", *[f"{held} {n}" for n in names]]
    if has_hv:
        header += ["front", "hypervolume"] + ([f"{held} hypervolume"] if has_held else [])
    lines += ["", "## Runs", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in runs:
        cells = [f"`{r['run']}`", str(r["seed"]), str(r["evaluations"]),
                 f"{_fmt(r['best_scalar'])} ({r['best_trial']})", str(r["evaluations_to_95"] or "not reached")]
        if has_held:
            h = r.get("heldout") or {}
            cells += [_fmt(h.get("scalar"))] + [_fmt((h.get("objectives") or {}).get(n)) for n in names]
        if has_hv:
            cells += [str(r.get("front_size")), _fmt(r.get("hypervolume"))]
            cells += [_fmt(r.get("heldout_hypervolume"))] if has_held else []
        lines.append("| " + " | ".join(cells) + " |")
    if summary["sources_heldout"]:
        lines += ["", f"## Source models, {held}", "", "| model | " + " | ".join(names) + " | scalar |",
                  "|" + " --- |" * (len(names) + 2)]
        for s in summary["sources_heldout"]:
            lines.append(f"| {s['model']} | " + " | ".join(_fmt(s["objectives"].get(n)) for n in names)
                         + f" | {_fmt(s['scalar'])} |")
    if summary.get("paired"):
        lines += ["", f"## The best against the others, {held}, paired by document", "",
                  f"Run `{summary['paired'][0]['best']}`'s best minus each: the scalar's difference with its 95% "
                  "paired-bootstrap interval (\"within noise\" when it covers 0).", "",
                  "| against | difference [95% interval] |", "| --- | --- |"]
        for p in summary["paired"]:
            lines.append(f"| {p['against']} | {Difference.from_dict(p['scalar']).text()} |")
    lines += ["", "## Figures", ""] + [f"![{t}]({png})" for t, png in figures]
    return "\n".join(lines) + "\n"

