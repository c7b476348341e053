"""``fuse-evo report RUN_DIR``: what a search found, under ``RUN_DIR/report/``.

- ``summary.json``: evaluations completed, failed, deduplicated, the budget, the best trial
  and its search and held-out scores, and the held-out table's rows;
- ``summary.md``: the table (also printed): the best recipe vs every source model (and the
  base) vs the best uniform merge, on the held-out split (``fuse_evo.search.export``'s plan);
  the uniform merge comes from the zoo's ``zoo.json`` when the run used a zoo, else it is
  left out with a note; each ``--baseline RUN_DIR`` (another search over the same models
  with the same objectives, e.g. ``experiment=quickstart_uniform``: one global scale
  grid-searched at the same budget) adds its best recipe, scored on the same held-out split;
- ``convergence.png``: best-so-far scalar objective vs evaluations (every trial as a dot);
- ``coefficients.png``: the best recipe's per-layer coefficients, one line per source model
  and parameter; for a data-flow run, ``path.png``: the best path's layers and scales.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import FuseEvoError
from .archive import Archive, Trial
from .export import LiveMerge, heldout_plan

REPORT_DIR = "report"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def counts(archive: Archive) -> dict[str, int]:
    return {"evaluations": archive.count(), "completed": archive.count("complete"),
            "failed": archive.count("failed"), "deduplicated": archive.count("duplicate")}


def convergence_plot(trials: list[Trial], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, best, bx, by = [], [], None, [], []
    for t in trials:
        if t.ok:
            xs.append(t.number + 1)
            ys.append(t.scalar)
            best = t.scalar if best is None else max(best, t.scalar)
        if best is not None:
            bx.append(t.number + 1)
            by.append(best)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=10, alpha=0.4, label="trial")
    ax.step(bx, by, where="post", color="C3", label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("scalar objective (larger is better)")
    ax.set_title("convergence")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layer_coefficients(recipe, num_layers: int) -> tuple[list[str], dict[str, list[float]]]:
    """Positions (``embed``, ``0`` .. ``L-1``, ``norm``, ``head``) and a series per source model
    and parameter over them, ``{"MODEL weight": [...]}`` (the attention half of each layer;
    the MLP half as its own series where it differs)."""
    from ..models import TensorGroup
    from ..recipe import PER_MODEL_PARAMS

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


def coefficients_plot(labels: list[str], series: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_xlabel("tensor group (embedding, layers, final norm, head)")
    ax.set_ylabel("coefficient")
    ax.set_title(title)
    ax.set_xticks(range(len(labels)), labels)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def path_plot(path, title: str, path_png: Path) -> None:
    """A data-flow path: each step's layer index, coloured by its model, its scale written
    beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path_png, dpi=100)
    plt.close(fig)


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


def _table(rows: list[dict[str, Any]], names: list[str]) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = ["| model | " + " | ".join(names) + " | held-out scalar | search scalar |",
             "| --- |" + " --- |" * (len(names) + 2)]
    for r in rows:
        cells = [number(r["objectives"].get(n)) for n in names]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {number(r.get('scalar'))} | "
                     f"{number(r.get('search_scalar'))} |")
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
            if candidate.method == "dataflow" and not set(candidate.models) <= routable:
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


def make_report(run_dir: str | Path, heldout: bool = True, device: str | None = None,
                baselines: list[str | Path] = ()) -> dict[str, Any]:
    from .export import scalar_of

    run_dir = Path(run_dir).expanduser().resolve()
    out = run_dir / REPORT_DIR
    with Archive.open(run_dir) as archive:
        info = archive.info
        trials = archive.trials()
        best = archive.best()
        others = open_baselines(run_dir, info, list(baselines))
        if others and not heldout:
            raise ReportError("--baseline: baselines are compared on the held-out split; drop --no-heldout")
        summary: dict[str, Any] = {"run_id": archive.run_id, "name": info.get("name"), **counts(archive),
                                   "budget": info.get("budget"), "strategy": info.get("strategy"),
                                   "best": None, "heldout": None, "notes": []}
        out.mkdir(parents=True, exist_ok=True)
        convergence_plot(trials, out / "convergence.png")
        names = [o["name"] for o in info.get("objectives") or []]
        rows: list[dict[str, Any]] = []
        if best is None:
            summary["notes"].append("no trial completed: no best recipe, no held-out table")
        else:
            summary["best"] = {"trial": best.number, "recipe_key": best.recipe_key, "scalar": best.scalar,
                               "objectives": best.objectives, "metrics": best.metrics, "recipe": best.recipe}
            live = LiveMerge(archive, device=device) if heldout else None
            num_layers = live.pool.num_layers if live is not None else _num_layers(info)
            chosen = best.to_recipe()
            if chosen.method == "dataflow":
                path_plot(chosen, f"best path (trial {best.number}, {len(chosen.steps)} layers)", out / "path.png")
            else:
                coefficients_plot(*layer_coefficients(chosen, num_layers),
                                  f"best recipe (trial {best.number}, {chosen.method})", out / "coefficients.png")
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
                uniform, note = _uniform_row(info, names)
                if uniform is not None:
                    uniform["scalar"] = scalar_of(info, uniform["objectives"])
                    rows.append(uniform)
                if note:
                    summary["notes"].append(note)
                summary["heldout"] = {"how": heldout_plan(archive).to_dict(),
                                      "rows": [{k: r[k] for k in ("name", "objectives", "scalar", "search_scalar",
                                                                  "run_dir", "recipe") if r.get(k) is not None}
                                               for r in rows]}
            else:
                summary["notes"].append("held-out scoring skipped (--no-heldout)")
    table = _table(rows, names) if rows else "(no held-out table)"
    text = [f"# Search report: {summary['name']} ({summary['run_id']})", "",
            f"evaluations: {summary['evaluations']} of budget {summary['budget']} (completed {summary['completed']}, "
            f"failed {summary['failed']}, deduplicated {summary['deduplicated']})", ""]
    if summary["best"]:
        text.append(f"best: trial {summary['best']['trial']}, search scalar {summary['best']['scalar']:.4f}")
        text.append("")
    text += ["## Held-out", "", table, ""] + [f"- {n}" for n in summary["notes"]]
    _atomic_text(out / "summary.md", "\n".join(text) + "\n")
    _atomic_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
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
        description="Summarize a search under RUN_DIR/report/: summary.json, summary.md (best vs each "
        "source model vs the best uniform merge on the held-out split), convergence.png, coefficients.png "
        "(path.png for a data-flow run).",
    )
    parser.add_argument("run_dir", type=Path, help="the search's run directory")
    parser.add_argument("--no-heldout", dest="heldout", action="store_false",
                        help="skip held-out scoring (no models are loaded)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the run's device)")
    parser.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR",
                        help="another search over the same models and objectives (e.g. experiment="
                        "quickstart_uniform): its best recipe joins the held-out table (repeatable)")
    args = parser.parse_args(argv)
    summary = make_report(args.run_dir, heldout=args.heldout, device=args.device, baselines=args.baseline)
    print(summary["text"])
    print(f"\nreport written to {Path(args.run_dir).expanduser().resolve() / REPORT_DIR}")
    return 0
