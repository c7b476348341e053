"""Study 2: the evolved front vs the front traced by uniform interpolation between the two
specialists, by hypervolume, on the search split and on the held-out split.

Reads the runs of `bash experiments/studies/run.sh pareto` (NSGA-II seeds and the uniform
per-model-weight grid, whose points with w_increment + w_reverse = 1 are the interpolation
(1 - t) ft_increment + t ft_reverse at t = 0, 1/17, ..., 1) and writes pareto.md, pareto.json
and two plots into --out. Every front member is scored on the held-out split.

    python experiments/studies/pareto_study.py --runs runs/studies/pareto --out experiments/studies/pareto
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fuse_evo.results import plots
from fuse_evo.search import pareto
from fuse_evo.search.archive import Archive
from fuse_evo.results.heldout import HeldOutMerge


def front_of(trials, names, directions):
    losses = [pareto.to_losses(t.objectives, directions) for t in trials]
    return [trials[i] for i in pareto.front_indices(losses)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/studies/pareto"))
    parser.add_argument("--out", type=Path, default=Path("experiments/studies/pareto"))
    args = parser.parse_args()
    grid_dir = args.runs / "uniform_grid"
    evolved_dirs = sorted(args.runs.glob("nsga2_s*")) + sorted(args.runs.glob("motpe_s*"))

    fronts = {}
    with Archive.open(grid_dir) as grid:
        directions = grid.directions()
        names = list(directions)
        reference, source = grid.reference_point()
        done = [t for t in grid.trials("complete")]
        line = [t for t in done if abs(sum(t.genome) - 1.0) < 1e-9]  # w_increment + w_reverse = 1
        fronts["uniform interpolation (18 points)"] = (grid_dir, front_of(line, names, directions), len(line))
        fronts["uniform per-model weights (18 x 18 grid)"] = (grid_dir, grid.pareto_front(), len(done))
    for d in evolved_dirs:
        with Archive.open(d) as a:
            label = {"optuna/nsga2": "NSGA-II", "optuna/tpe": "MOTPE"}.get(a.info["strategy"], a.info["strategy"])
            fronts[f"{label} per-layer, seed {a.info['seed']}"] = (d, a.pareto_front(), a.count("complete"))
    ref = pareto.to_losses(reference, directions)

    rows, heldout_points = [], {}
    with Archive.open(grid_dir) as grid:
        live = HeldOutMerge(grid)
        for label, (run, front, evaluations) in fronts.items():
            with Archive.open(run) as a:
                held = []
                for t in front:
                    live.load(a.trial(t.number).to_recipe())
                    held.append(live.heldout()["objectives"])
            heldout_points[label] = [[h[name] for name in names] for h in held]
            rows.append({
                "front": label, "run": str(run), "evaluations": evaluations, "members": len(front),
                "search_hypervolume": pareto.hypervolume([pareto.to_losses(t.objectives, directions) for t in front], ref),
                "heldout_hypervolume": pareto.hypervolume([pareto.to_losses(h, directions) for h in held], ref),
                "search_points": [[t.objectives[name] for name in names] for t in front],
                "heldout_points": heldout_points[label], "trials": [t.number for t in front],
            })
        sources = {}
        for name in live.sources:
            live.load(live.source_recipe(name))
            sources[name] = live.heldout()["objectives"]

    args.out.mkdir(parents=True, exist_ok=True)
    ref_xy = [reference[n] for n in names]
    plots.fronts_plot(names, {r["front"]: r["search_points"] for r in rows}, args.out / "fronts_search.png", ref_xy,
                      title="Fronts on the search split")
    plots.fronts_plot(names, heldout_points, args.out / "fronts_heldout.png", ref_xy,
                      title="The same members on the held-out split")
    lines = ["# Study 2: the evolved front vs uniform interpolation", "",
             f"Objectives: {', '.join(names)} accuracy (search split: 200 documents per skill; held-out: 500). "
             f"Hypervolume against the reference point ({', '.join(f'{n} {reference[n]:g} ({source[n]})' for n in names)}); "
             "held-out hypervolume: the same front members scored on the held-out split.", "",
             "| front | evaluations | members | search hypervolume | held-out hypervolume |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['front']} | {r['evaluations']} | {r['members']} | {r['search_hypervolume']:.4f} | "
                     f"{r['heldout_hypervolume']:.4f} |")
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    for strategy in ("NSGA-II", "MOTPE"):
        evolved = [r for r in rows if r["front"].startswith(f"{strategy} ")]
        if evolved:
            s_ = [r["search_hypervolume"] for r in evolved]
            h_ = [r["heldout_hypervolume"] for r in evolved]
            lines.append(f"| **{strategy}, mean ± sd over {len(evolved)} seeds** | {evolved[0]['evaluations']} | | "
                         f"**{statistics.fmean(s_):.4f} ± {sd(s_):.4f}** | **{statistics.fmean(h_):.4f} ± {sd(h_):.4f}** |")
    lines += ["", "Source models on the held-out split: "
              + "; ".join(f"{m}: " + ", ".join(f"{n} {v[n]:.3f}" for n in names) for m, v in sources.items()) + ".",
              "", "![fronts on the search split](fronts_search.png)", "",
              "![held-out](fronts_heldout.png)", ""]
    (args.out / "pareto.md").write_text("\n".join(lines))
    (args.out / "pareto.json").write_text(json.dumps({"reference_point": reference, "fronts": rows,
                                                      "sources_heldout": sources}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
