"""``fuse-evo report RUN_DIR``: what a search found, under ``RUN_DIR/report/``.

- ``summary.json``: evaluations completed, failed, deduplicated, the budget, the best trial
  and its search and held-out scores, and the held-out table's rows;
- ``summary.md``: the table (also printed): the best recipe vs every source model (and the
  base) vs the best uniform merge, on the held-out split (``results.heldout``'s plan);
  the uniform merge comes from the zoo's ``zoo.json`` when the run used a zoo, else it is
  left out with a note; each ``--baseline RUN_DIR`` (another search over the same models
  with the same objectives, e.g. ``experiment=quickstart_uniform``: one global scale
  grid-searched at the same budget) adds its best recipe, scored on the same held-out split;
- ``convergence.png``: best-so-far scalar objective vs evaluations (every trial as a dot);
- ``coefficients.png`` / ``heatmap.png``: the best recipe's per-layer coefficients, one line
  (one heatmap) per source model and parameter; for a data-flow run, ``path.png``: the best
  path's layers and scales;
- runs of several objectives: ``front.png`` (the Pareto front among every trial for two
  objectives, parallel coordinates of its members for more), ``hypervolume.png`` (after each
  evaluation, against the run's reference point), ``front_heatmap.png`` (each member's
  coefficients), and a front table with K members scored on the held-out split.

``summary.md`` embeds the figures. Several runs at once: ``results.compare``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FuseEvoError
from ..files import atomic_write
from ..evaluate.objectives import scalar_of
from ..evaluate.outcomes import Difference
from ..registry import PER_MODEL_PARAMS
from ..recipe import LayerPath, TensorGroup
from ..search import pareto
from ..search.archive import CONFIG_FILE, Archive, Trial, scored
from ..search.rundir import SCAN_STAGE, STAGES_DIR
from . import plots
from .compare import compare_runs
from .heldout import HeldOutMerge, heldout_plan, heldout_spread, paired_difference

REPORT_DIR = "report"


def counts(archive: Archive) -> dict[str, int]:
    return {"evaluations": archive.count(), "completed": archive.count("complete"),
            "failed": archive.count("failed"), "deduplicated": archive.count("duplicate")}


def layer_coefficients(recipe, num_layers: int) -> tuple[list[str], dict[str, list[float]]]:
    """Positions (``embed``, ``0`` .. ``L-1``, ``norm``, ``head``) and a series per source model
    and parameter over them, ``{"MODEL weight": [...]}`` (the attention half of each layer;
    the MLP half as its own series where it differs)."""
    labels = ["embed", *map(str, range(num_layers)), "norm", "head"]
    series: dict[str, list[float]] = {}
    keys = PER_MODEL_PARAMS.get(recipe.method) or ()
    models = [(m, k) for m in recipe.models for k in keys] or [("*", "t")]
    for model, key in models:
        label = f"{model} {key}" if model != "*" else key
        for part in ("attn", "mlp"):
            groups = [TensorGroup("embed"), *(TensorGroup("layer", i, part) for i in range(num_layers)),
                      TensorGroup("norm"), TensorGroup("head")]
            values = [recipe.model_params(g, model).get(key) for g in groups]
            if any(v is None for v in values):
                continue
            if part == "mlp" and series.get(label) == values:
                continue
            series[label if part == "attn" else f"{label} (mlp)"] = [float(v) for v in values]
    return labels, series


def _uniform_row(info: dict[str, Any], names: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The zoo's best uniform task-arithmetic merge on its held-out split, keyed by the run's
    objective names."""
    zoo = info.get("zoo") or {}
    manifest_path = Path(zoo.get("manifest") or "")
    if not zoo or not manifest_path.is_file():
        return None, "no uniform-merge baseline: the run did not use a zoo"
    manifest = json.loads(manifest_path.read_text())
    best = manifest["uniform_merges"]["task_arithmetic"]
    skill_of = {v: skill for skill, tasks in manifest.get("tasks", {}).items() for v in tasks.values()}
    scores: dict[str, float] = {}
    for o in info.get("objectives") or []:
        task = (o.get("metric") or "").partition("/")[0]
        skill = skill_of.get(task)
        if skill is not None and skill in best["best"]["scores"]:
            scores[o["name"]] = best["best"]["scores"][skill]
    return ({"name": f"uniform task_arithmetic x{best['best_scale']:g} (zoo.json)", "objectives": scores},
            None if len(scores) == len(names) else "the zoo's uniform merge lacks some objectives")


class ReportError(FuseEvoError):
    """A baseline run that cannot be compared with the run reported (the message says why)."""


def _table(rows: list[dict[str, Any]], names: list[str], label: str) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    paired = any(r.get("paired") for r in rows)
    lines = ["| model | " + " | ".join(names) + f" | {label} scalar | search scalar |"
             + (" best - this, 95% paired interval |" if paired else ""),
             "| --- |" + " --- |" * (len(names) + 2 + paired)]
    for r in rows:
        cells = [number(r["objectives"].get(n)) for n in names]
        diff = r.get("paired")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {number(r.get('scalar'))} | "
                     f"{number(r.get('search_scalar'))} |"
                     + ((f" {Difference.from_dict(diff['scalar']).text()} |" if diff else " - |")
                        if paired else ""))
    return "\n".join(lines)


def _objective_keys(info: dict[str, Any]) -> list[tuple]:
    return [(o["name"], o.get("metric"), o.get("direction"), o.get("weight")) for o in info.get("objectives") or []]


def open_baselines(run_dir: Path, info: dict[str, Any], baselines: list[str | Path]) -> list[dict[str, Any]]:
    """Each baseline run's best trial, checked against the run before anything is scored:
    same base and source models (same paths), same objectives."""
    found = []
    for b in baselines:
        b = Path(b).expanduser().resolve()
        if b == run_dir:
            raise ReportError(f"--baseline {b}: that is the run being reported")
        with Archive.open(b) as archive:
            binfo, best = archive.info, archive.best()
            if best is None:
                raise ReportError(f"--baseline {b}: run {archive.run_id} has no completed trial")
            extra = {n: p for n, p in binfo["sources"].items() if info["sources"].get(n) != p}
            if binfo["base"] != info["base"] or extra:
                raise ReportError(f"--baseline {b}: merges other models than the run ({extra or binfo['base']} "
                                  f"not among its base {info['base']!r} and sources {info['sources']})")
            candidate = best.to_recipe()
            routable = set((info.get("dataflow") or {}).get("models") or [])
            if isinstance(candidate, LayerPath) and not set(candidate.models) <= routable:
                raise ReportError(f"--baseline {b}: its best is a layer path through {list(candidate.models)}; this "
                                  f"run routes through {sorted(routable) or 'no models (not a data-flow run)'}")
            if "merged" in getattr(candidate, "models", ()) and \
                    (binfo.get("dataflow") or {}).get("merged") != (info.get("dataflow") or {}).get("merged"):
                raise ReportError(f"--baseline {b}: routes through another 'merged' model than this run's")
            if _objective_keys(binfo) != _objective_keys(info):
                raise ReportError(f"--baseline {b}: scored with other objectives "
                                  f"({[o['name'] for o in binfo.get('objectives') or []]}, metrics or weights differ)")
            genes = binfo.get("genes") or []
            values = (", " + ", ".join(f"{g} {v:.3g}" for g, v in zip(genes, best.genome))) if len(genes) <= 3 else ""
            found.append({"dir": str(b), "name": f"{b.name}: best of {archive.count()} ({binfo.get('strategy')}, "
                          f"{binfo.get('method')}{values})",
                          "recipe": candidate, "search_scalar": best.scalar, "trial": best.number})
    return found


def _pareto_section(archive: Archive, trials: list[Trial], out: Path, live: HeldOutMerge | None, front_heldout: int,
                    num_layers: int, plots: Any) -> tuple[dict[str, Any], list[str]]:
    """A run of several objectives: its front (and K spread members scored held-out), the
    hypervolume over evaluations, the front plot and the front's coefficient heatmap."""
    directions = archive.directions()
    names = list(directions)
    front = archive.pareto_front()
    reference, source = archive.reference_point()
    history = archive.hypervolume_history(reference) if len(reference) == len(names) else []
    ref_text = ", ".join(f"{n} {reference[n]:g} ({source[n]})" for n in names if n in reference)
    section: dict[str, Any] = {"front_size": len(front), "reference_point": reference, "reference_source": source,
                               "hypervolume": history[-1] if history else None,
                               "members": [{"trial": t.number, "search": t.objectives} for t in front]}
    held = heldout_spread(live, front, directions, front_heldout) if live is not None else []
    label = live.plan.label if live is not None else "held-out"
    if held:
        by_trial = {t.number: h for t, h in held}
        for m in section["members"]:
            m["heldout"] = by_trial.get(m["trial"])
        if len(reference) == len(names) and all(set(names) <= set(h) for _, h in held):
            section["heldout_hypervolume"] = pareto.hypervolume(
                [pareto.to_losses(h, directions) for _, h in held], pareto.to_losses(reference, directions))
    done = scored(trials, directions)
    figures = []
    if len(names) == 2:
        plots.front_scatter(names, [[t.objectives[n] for n in names] for t in done],
                            [[t.objectives[n] for n in names] for t in front],
                            [reference[n] for n in names] if len(reference) == 2 else None, out / "front.png",
                            heldout=[[h[n] for n in names] for _, h in held if set(names) <= set(h)],
                            title=f"Pareto front ({len(front)} of {len(done)} completed)", heldout_label=label)
    elif front:
        plots.parallel_coordinates(names, [[t.objectives[n] for n in names] for t in front], out / "front.png",
                                   colour_by=[t.scalar for t in front])
    figures.append(("Pareto front", "front.png"))
    if history:
        plots.hypervolume_plot({archive.run_id: history}, out / "hypervolume.png", ref_text)
        figures.append(("Hypervolume over evaluations", "hypervolume.png"))
    recipes = [(f"trial {t.number}", t.to_recipe()) for t in
               sorted(front, key=lambda t: pareto.to_losses(t.objectives, directions))]
    rows = [(label, layer_coefficients(r, num_layers)[1]) for label, r in recipes if not isinstance(r, LayerPath)]
    if rows and any(series for _, series in rows):
        plots.coefficient_heatmaps(layer_coefficients(recipes[0][1], num_layers)[0], rows,
                                   f"front members' coefficients (sorted by {names[0]})", out / "front_heatmap.png")
        figures.append(("Coefficients along the front", "front_heatmap.png"))
    text = ["## Pareto front", "",
            f"{len(front)} non-dominated of {len(done)} completed evaluations; hypervolume "
            + (f"{section['hypervolume']:.4f}" if section["hypervolume"] is not None else "-")
            + (f" ({label}, the {len(held)} members below: {section['heldout_hypervolume']:.4f})"
               if section.get("heldout_hypervolume") is not None else "")
            + f" against the reference point {ref_text or '(none: no completed trial)'}.", ""]
    shown = held or [(t, {}) for t in front[:20]]
    text += ["| trial | " + " | ".join(f"search {n}" for n in names)
             + (" | " + " | ".join(f"{label} {n}" for n in names) if held else "") + " |",
             "| --- |" + " --- |" * (len(names) * (2 if held else 1))]
    for t, h in sorted(shown, key=lambda th: pareto.to_losses(th[0].objectives, directions)):
        cells = [f"{t.objectives[n]:.4f}" for n in names] + ([f"{h.get(n, float('nan')):.4f}" for n in names]
                                                             if held else [])
        text.append(f"| {t.number} | " + " | ".join(cells) + " |")
    if held and len(held) < len(front):
        text += ["", f"({label}: {len(held)} members spread over the front; --front-heldout K for more)"]
    return section, text + [""] + [f"![{title}]({png})" for title, png in figures] + [""]


def make_report(run_dir: str | Path, heldout: bool = True, device: str | None = None,
                baselines: list[str | Path] = (), front_heldout: int = 8) -> dict[str, Any]:

    run_dir = Path(run_dir).expanduser().resolve()
    out = run_dir / REPORT_DIR
    with Archive.open(run_dir) as archive:
        info = archive.info
        trials = archive.trials()
        best = archive.best()
        scan = run_dir / STAGES_DIR / SCAN_STAGE  # a per-layer search's global-scale scan: its baseline row
        others = open_baselines(run_dir, info, list(baselines) + ([scan] if (scan / CONFIG_FILE).exists() else []))
        if others and not heldout:
            raise ReportError("--baseline: baselines are compared on the held-out split; drop --no-heldout")
        summary: dict[str, Any] = {"run_id": archive.run_id, "name": info.get("name"), **counts(archive),
                                   "budget": info.get("budget"), "strategy": info.get("strategy"),
                                   "best": None, "heldout": None, "pareto": None, "notes": []}
        out.mkdir(parents=True, exist_ok=True)
        plots.convergence_plot(trials, out / "convergence.png")
        figures = [("Convergence", "convergence.png")]
        names = [o["name"] for o in info.get("objectives") or []]
        rows: list[dict[str, Any]] = []
        pareto_text: list[str] = []
        if best is None:
            summary["notes"].append("no trial completed: no best recipe, no held-out table")
        else:
            summary["best"] = {"trial": best.number, "recipe_key": best.recipe_key, "scalar": best.scalar,
                               "objectives": best.objectives, "metrics": best.metrics, "recipe": best.recipe}
            live = HeldOutMerge(archive, device=device) if heldout else None
            num_layers = live.pool.num_layers if live is not None else _num_layers(info)
            chosen = best.to_recipe()
            if isinstance(chosen, LayerPath):
                plots.path_plot(chosen, f"best path (trial {best.number}, {len(chosen.steps)} layers)",
                                out / "path.png")
                figures.append(("Best path", "path.png"))
            else:
                labels, series = layer_coefficients(chosen, num_layers)
                title = f"best recipe (trial {best.number}, {chosen.method})"
                plots.coefficients_plot(labels, series, title, out / "coefficients.png")
                plots.coefficient_heatmaps(labels, [(f"trial {best.number}", series)], title, out / "heatmap.png")
                figures += [("Best recipe's coefficients", "coefficients.png"), ("As a heatmap", "heatmap.png")]
            if len(names) > 1:  # a weighted-sum run's front is shown too; held-out only when it was the goal
                k = front_heldout if info.get("multi_objective") else 0
                summary["pareto"], pareto_text = _pareto_section(archive, trials, out, live, k, num_layers, plots)
            if live is not None:
                live.load(best.to_recipe())
                h = live.heldout()
                summary["best"]["heldout"] = h
                rows.append({"name": f"best (trial {best.number})", **h, "search_scalar": best.scalar})
                for other in others:
                    live.load(other["recipe"])
                    rows.append({"name": other["name"], **live.heldout(), "search_scalar": other["search_scalar"],
                                 "run_dir": other["dir"], "recipe": other["recipe"].to_dict()})
                for name in live.sources:
                    live.load(live.source_recipe(name))
                    rows.append({"name": name, **live.heldout()})
                plan = heldout_plan(archive)
                for r in rows[1:]:  # each against the best, document by document
                    r["paired"] = paired_difference(info, plan, h, r)
                uniform, note = _uniform_row(info, names)
                if uniform is not None:
                    uniform["scalar"] = scalar_of(info, uniform["objectives"])
                    rows.append(uniform)
                if note:
                    summary["notes"].append(note)
                summary["heldout"] = {"how": plan.to_dict(),
                                      "rows": [{k: r[k] for k in ("name", "objectives", "scalar", "search_scalar",
                                                                  "run_dir", "recipe", "paired")
                                                if r.get(k) is not None} for r in rows]}
                noise = [r["name"] for r in rows if (r.get("paired") or {}).get("scalar", {}).get("within_noise")]
                if noise:
                    summary["notes"].append(f"the best is within noise of {', '.join(noise)}: the 95% paired interval "
                                            f"of the {plan.label} difference covers 0")
            else:
                summary["notes"].append("held-out scoring skipped (--no-heldout)")
    how = (summary.get("heldout") or {}).get("how") or {}
    label = how.get("label", "held-out")
    table = _table(rows, names, label) if rows else "(no held-out table)"
    text = [f"# Search report: {summary['name']} ({summary['run_id']})", "",
            f"evaluations: {summary['evaluations']} of budget {summary['budget']} (completed {summary['completed']}, "
            f"failed {summary['failed']}, deduplicated {summary['deduplicated']}); strategy {summary['strategy']}", ""]
    if summary["best"]:
        text.append(f"best (largest weighted sum of the objectives): trial {summary['best']['trial']}, search "
                    f"scalar {summary['best']['scalar']:.4f}")
        text.append("")
    heading = "Held-out" if label == "held-out" else label[0].upper() + label[1:]
    if how.get("note"):
        summary["notes"].insert(0, f"scored on {how['note']}")
    text += [f"## {heading}", "", table, ""] + [f"- {n}" for n in summary["notes"]]
    text += ["", *pareto_text, "## Figures", ""] + [f"![{title}]({png})" for title, png in figures]
    atomic_write(out / "summary.md", "\n".join(text) + "\n")
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    summary["text"] = "\n".join(text)
    return summary


def _num_layers(info: dict[str, Any]) -> int:
    from ..models import resolve

    base = resolve("base", info["sources"][info["base"]])
    try:
        return int(json.loads((base / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError) as e:
        raise FuseEvoError(f"{base}: cannot read num_hidden_layers ({e})") from None


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fuse-evo report",
        description="One run: summarize it under RUN_DIR/report/ (summary.md with the held-out table of the best "
        "vs each source model vs the best uniform merge, convergence, coefficients, and for several objectives "
        "the Pareto front and its hypervolume). Several runs, or a folder of runs (a sweep, a study): compare "
        "them in OUT/compare.md (a table per run and per group of seeds, one plot).",
    )
    parser.add_argument("run_dir", type=Path, nargs="+", help="a run directory; several, or a folder of runs, compare")
    parser.add_argument("--no-heldout", dest="heldout", action="store_false",
                        help="skip held-out scoring (no models are loaded)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the run's device)")
    parser.add_argument("--front-heldout", type=int, default=8, metavar="K",
                        help="multi-objective runs: score K front members, spread over it, on the "
                        "held-out split (default 8; 0: none)")
    parser.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR",
                        help="one run: another search over the same models and objectives (e.g. experiment="
                        "quickstart_uniform) whose best recipe joins the held-out table (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="comparisons: where compare.md goes (default: the runs' common folder /report)")
    args = parser.parse_args(argv)

    if len(args.run_dir) == 1 and (args.run_dir[0] / CONFIG_FILE).is_file():
        if args.out is not None:
            raise ReportError("--out: a single run's report goes to RUN_DIR/report; --out is for comparisons")
        summary = make_report(args.run_dir[0], heldout=args.heldout, device=args.device, baselines=args.baseline,
                              front_heldout=args.front_heldout)
        print(summary["text"])
        print(f"\nreport written to {Path(args.run_dir[0]).expanduser().resolve() / REPORT_DIR}")
        return 0
    if args.baseline:
        raise ReportError("--baseline: for a single run's report; a comparison puts every run in its table")

    summary = compare_runs(args.run_dir, out=args.out, heldout=args.heldout, device=args.device,
                           front_heldout=args.front_heldout)
    print(summary["text"])
    print(f"comparison written to {summary['out']}")
    return 0
