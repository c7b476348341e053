"""``fuse-evo export RUN_DIR --pick best|trial:N --out DIR``: a searched recipe as a model.

The chosen trial's recipe is materialized as ``fuse-evo merge`` does it (same pool, engine and
dtype as the search's workers), scored on the held-out split, and written atomically as an
ordinary Hugging Face folder holding, beside the weights and the tokenizer:

- ``recipe.yaml``: sources + recipe (``fuse-evo merge OUT/recipe.yaml --out DIR2`` rebuilds it);
- ``scores.json``: the archived search scores and the held-out scores, with how each was made;
- ``mergekit.yaml``: the same merge as a mergekit config, when mergekit can express it;
- ``README.md``: a model card with the recipe, both scores and the run's provenance.

Held-out scoring uses the run's evaluator tasks with each ``*_search`` task swapped for its
``*_heldout`` counterpart when the run used zoo tasks (scored on the whole held-out split, as
the zoo's own table is); otherwise the search tasks themselves, with the run's limits.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..device import check_device
from ..errors import FuseEvoError
from ..recipe import Recipe
from . import pareto
from .archive import Archive, Trial

SCORES_FILE = "scores.json"
MERGEKIT_FILE = "mergekit.yaml"


class ExportError(FuseEvoError):
    """A pick that names no exportable trial, or an output that cannot be written."""


# ---------------------------------------------------------------------------- picking
def pick_trial(archive: Archive, pick: str) -> Trial:
    """``best`` (the completed trial with the largest scalar) or ``trial:N``; a duplicate
    resolves to the trial it repeats. Clear errors for an empty archive, an unknown or a
    failed trial."""
    pick = (pick or "best").strip()
    total = archive.count()
    if total == 0:
        raise ExportError(f"run {archive.run_id}: the archive holds no evaluations yet; nothing to export")
    if pick == "best":
        best = archive.best()
        if best is None:
            raise ExportError(f"run {archive.run_id}: none of its {total} evaluations completed "
                              f"({archive.count('failed')} failed); nothing to export")
        return best
    kind, _, number = pick.partition(":")
    if kind != "trial" or not number.strip().lstrip("-").isdigit():
        raise ExportError(f"--pick {pick!r}: expected 'best' or 'trial:N' (N a trial number, 0..{total - 1})")
    n = int(number)
    if not 0 <= n < total:
        raise ExportError(f"--pick {pick}: run {archive.run_id} has no trial {n} (trials are 0..{total - 1})")
    trial = archive.trial(n)
    if trial.status == "duplicate" and trial.duplicate_of is not None:
        original = archive.trial(trial.duplicate_of)
        if original.status == "complete":
            return original
        trial = original
    if trial.status == "failed" or not trial.recipe:
        raise ExportError(f"--pick {pick}: trial {trial.number} failed ({trial.error or 'no recipe'}); "
                          "pick a completed trial (--pick best)")
    return trial


# ---------------------------------------------------------------------------- held-out split
@dataclass
class HeldOut:
    """How held-out scores are made: tasks, their include path, limits, and how each search
    objective's metric maps onto a held-out task."""

    tasks: list[str]
    include_path: list[str]
    limit: float | None
    limits: dict[str, float | None]
    num_fewshot: int | None
    batch_size: int
    rename: dict[str, str]  # search task -> held-out task
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "include_path": self.include_path, "limit": self.limit,
                "limits": self.limits, "num_fewshot": self.num_fewshot, "batch_size": self.batch_size,
                "from_search_tasks": self.rename, "note": self.note}


def heldout_plan(archive: Archive) -> HeldOut:
    info, config = archive.info, archive.config
    ev = config.get("evaluator") or {}
    tasks = list(info.get("tasks") or ev.get("tasks") or [])
    include = [str(p) for p in (info.get("include_path") or ev.get("include_path") or [])]
    zoo_tasks = (info.get("zoo") or {}).get("task_dir")
    rename: dict[str, str] = {}
    if zoo_tasks:
        for t in tasks:
            if t.endswith("_search") and (Path(zoo_tasks) / f"{t[:-len('_search')]}_heldout.yaml").exists():
                rename[t] = f"{t[:-len('_search')]}_heldout"
    if rename:
        return HeldOut([rename.get(t, t) for t in tasks], include, None, {}, ev.get("num_fewshot"),
                       int(ev.get("batch_size") or 64), rename,
                       "the zoo's held-out split (each *_search task's *_heldout counterpart), every document")
    return HeldOut(tasks, include, ev.get("limit"), dict(ev.get("limits") or {}), ev.get("num_fewshot"),
                   int(ev.get("batch_size") or 64), {t: t for t in tasks},
                   "no held-out split known for these tasks: the search tasks, with the run's limits")


def heldout_objectives(info: dict[str, Any], plan: HeldOut, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric objective of the run, read from the held-out task's metrics."""
    from ..evaluate.objectives import parse_metric

    out: dict[str, float] = {}
    for o in info.get("objectives") or []:
        if not o.get("metric"):
            continue
        task, metric = parse_metric(o["metric"], "objective")
        key = f"{plan.rename.get(task, task)}/{metric}"
        if key in metrics:
            out[o["name"]] = metrics[key]
    return out


def scalar_of(info: dict[str, Any], objectives: dict[str, float]) -> float | None:
    """The run's weighted sum (larger is better), when every objective has a value."""
    total = 0.0
    for o in info.get("objectives") or []:
        if o["name"] not in objectives:
            return None
        total += float(o["weight"]) * (1.0 if o["direction"] == "max" else -1.0) * objectives[o["name"]]
    return total


# ---------------------------------------------------------------------------- a live merge
class LiveMerge:
    """The run's pool, engine and one live model, as the search's workers build them; an
    evaluator on the held-out plan, built on first use. ``load(recipe)`` merges in place."""

    def __init__(self, archive: Archive, device: str | None = None, allow_pickle: bool | None = None):
        import torch

        from ..merge.engine import MergeEngine
        from ..models import ModelPool

        info, config = archive.info, archive.config
        self.info = info
        run = config.get("run") or {}
        models_cfg = config.get("models") or {}
        base_name = info["base"]
        self.sources = dict(info["sources"])
        self.dtype = run.get("dtype")
        if device is None:  # the run's device, which this machine may lack
            check_device(run.get("device"), "the run's run.device", fix="pass --device cpu to export on this machine")
        pickle_ok = bool(models_cfg.get("allow_pickle")) if allow_pickle is None else allow_pickle
        self.pool = ModelPool(self.sources[base_name], {n: p for n, p in self.sources.items() if n != base_name},
                              allow_pickle=pickle_ok, trust_remote_code=bool(models_cfg.get("trust_remote_code")),
                              base_name=base_name)
        self.engine = MergeEngine(self.pool, device=device if device is not None else run.get("device"))
        self.model = self.pool.new_model(dtype=getattr(torch, self.dtype) if self.dtype else None,
                                         device=self.engine.device)
        self.tokenizer = self.pool.tokenizer()
        self.plan = heldout_plan(archive)
        self._evaluators: dict[int, Any] = {}
        self.router = None
        dataflow = info.get("dataflow")
        if dataflow:  # its own live model for "merged", so self.model stays free for recipes
            from ..merge.dataflow import build_router

            dtype = getattr(torch, self.dtype) if self.dtype else None
            merged = self.pool.new_model(dtype=dtype, device=self.engine.device) if dataflow.get("merged") else None
            self.router = build_router(self.pool, self.engine, merged, dataflow, dtype)
        self.live = self.model

    def load(self, recipe: Any) -> None:
        """Merge a Recipe into the live model, or route a LayerPath (data-flow runs)."""
        from ..merge.dataflow import LayerPath

        if isinstance(recipe, LayerPath):
            if self.router is None:
                raise ExportError("a layer path, but this run is not a data-flow search")
            self.live = self.router.route(recipe)
            return
        self.engine.check(recipe)
        self.engine.materialize(recipe, into=self.model)
        self.live = self.model

    def source_recipe(self, name: str) -> Recipe:
        """A recipe whose merge is the model ``name`` itself (the base: every weight 0)."""
        models = [n for n in self.sources if n != self.info["base"]]
        if name == self.info["base"]:
            return Recipe("task_arithmetic", (models[0],), base=name, groups={"*": {models[0]: {"weight": 0.0}}})
        return Recipe("task_arithmetic", (name,), base=self.info["base"], groups={"*": {name: {"weight": 1.0}}})

    def heldout(self) -> dict[str, Any]:
        """Held-out metrics, objectives and scalar of the live model as it is now."""
        from ..evaluate.evaluator import Evaluator

        if self.tokenizer is None:
            raise ExportError(f"{self.sources[self.info['base']]} has no tokenizer: held-out scoring needs one")
        evaluator = self._evaluators.get(id(self.live))
        if evaluator is None:  # one per live object: the merged model, the routed one
            p = self.plan
            evaluator = self._evaluators[id(self.live)] = Evaluator(
                self.live, self.tokenizer, p.tasks, include_path=p.include_path or None, limit=p.limit,
                limits={k: v for k, v in p.limits.items() if k in p.tasks}, num_fewshot=p.num_fewshot,
                batch_size=p.batch_size)
        metrics = evaluator.score().flat()
        objectives = heldout_objectives(self.info, self.plan, metrics)
        return {"metrics": metrics, "objectives": objectives, "scalar": scalar_of(self.info, objectives)}


def heldout_spread(live: LiveMerge, front: list[Trial], directions: dict[str, str], k: int
                   ) -> list[tuple[Trial, dict[str, float]]]:
    """``k`` members spread over a front (``pareto.spread``), each scored on the held-out
    split: ``[(trial, held-out objectives)]``."""
    if not front or k < 1:
        return []
    losses = [pareto.to_losses(t.objectives, directions) for t in front]
    scored = []
    for i in pareto.spread(losses, k):
        live.load(front[i].to_recipe())
        scored.append((front[i], live.heldout()["objectives"]))
    return scored


# ---------------------------------------------------------------------------- export
def _model_card(recipe: Recipe, sources: dict[str, str], scores: dict[str, Any], provenance: dict[str, Any]) -> str:
    from ..export import _model_card as base_card

    flat = {f"search {k}": v for k, v in scores["search"]["objectives"].items()}
    if scores["search"].get("scalar") is not None:
        flat["search scalar"] = scores["search"]["scalar"]
    held = scores.get("heldout") or {}
    flat.update({f"held-out {k}": v for k, v in (held.get("objectives") or {}).items()})
    if held.get("scalar") is not None:
        flat["held-out scalar"] = held["scalar"]
    card = base_card(recipe, sources, flat)
    lines = ["## Provenance", ""]
    lines += [f"- {k}: `{v}`" for k, v in provenance.items()]
    if held:
        lines += ["", f"Held-out scores: {held.get('how', {}).get('note', '')}."]
    lines += ["", "Rebuild: `fuse-evo merge recipe.yaml --out DIR`; `scores.json` holds every metric.", ""]
    return card + "\n" + "\n".join(lines)


PATH_FILE = "path.yaml"


def _save_path_model(live: LiveMerge, path: Any, info: dict[str, Any], folder: Path, max_shard_size: str) -> Path:
    """A data-flow candidate as an ordinary model (scales folded into copies of its layers),
    its tokenizer, and ``path.yaml``: the path, the models it runs through, the hybrid's
    merged recipe."""
    from ..merge.dataflow import plain_model

    model = plain_model(path, live.router.models).cpu()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if live.tokenizer is not None:
        live.tokenizer.save_pretrained(folder)
    dataflow = info.get("dataflow") or {}
    (folder / PATH_FILE).write_text(yaml.safe_dump({
        "path": path.to_dict(), "sources": live.sources, "merged": dataflow.get("merged"),
        "merged_from": dataflow.get("merged_from")}, sort_keys=False))
    return folder


def _path_card(path: Any, sources: dict[str, str], scores: dict[str, Any], provenance: dict[str, Any]) -> str:
    held = (scores.get("heldout") or {}).get("objectives") or {}
    lines = ["---", "library_name: transformers", "tags: [merge, data-flow, fuse_evo]", "---",
             "# Data-flow merge (a path through the layers of several models)", "",
             "Made with fuse_evo: no training. Each layer below is a copy of a source model's layer; the "
             "hidden-state scales of the path are folded into them, so this is an ordinary model.", "",
             f"- embedding, final norm, head: `{path.io_model}`", *[f"- {n}: `{p}`" for n, p in sources.items()], "",
             "| # | model | layer | scale |", "| --- | --- | --- | --- |",
             *[f"| {k} | {m} | {i} | {s:.4f} |" for k, ((m, i), s) in enumerate(zip(path.steps, path.scales))], "",
             "## Scores", "", "| objective | search | held-out |", "| --- | --- | --- |",
             *[f"| {k} | {v:.4f} | {held.get(k, float('nan')):.4f} |" for k, v in scores["search"]["objectives"].items()],
             "", "## Provenance", "", *[f"- {k}: `{v}`" for k, v in provenance.items()], "",
             f"`{PATH_FILE}` holds the path; `scores.json` every metric.", ""]
    return "\n".join(lines)


FRONT_FILE = "front.json"


def pick_front(archive: Archive, pick: str) -> list[Trial] | None:
    """``pareto`` (every member of the run's Pareto front) or ``pareto:K`` (K members spread
    over it, the best of each objective first), ordered by the first objective; None for a
    pick of one trial (``best``, ``trial:N``)."""
    kind, sep, k = (pick or "").strip().partition(":")
    if kind != "pareto":
        return None
    if sep and not (k.strip().isdigit() and int(k) >= 1):
        raise ExportError(f"--pick {pick!r}: expected pareto or pareto:K with K a whole number >= 1")
    if len(archive.info.get("objectives") or []) < 2:
        raise ExportError(f"--pick {pick}: run {archive.run_id} has one objective; its front is its best "
                          "(--pick best)")
    front = archive.pareto_front()
    if not front:
        raise ExportError(f"run {archive.run_id}: no completed trial, so no Pareto front to export")
    directions = archive.directions()
    losses = [pareto.to_losses(t.objectives, directions) for t in front]
    chosen = pareto.spread(losses, int(k)) if sep else range(len(front))
    return sorted((front[i] for i in chosen), key=lambda t: pareto.to_losses(t.objectives, directions))


def _write_trial(archive: Archive, run_dir: Path, live: LiveMerge, trial: Trial, folder: Path, heldout: bool,
                 max_shard_size: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One trial's merge as a model folder (weights, tokenizer, recipe.yaml or path.yaml,
    scores.json, mergekit.yaml when mergekit can express it, a card); returns its scores."""
    from .. import mergekit_yaml
    from ..export import save_merged
    from ..merge.dataflow import LayerPath

    recipe = trial.to_recipe()
    live.load(recipe)
    info, config = archive.info, archive.config
    scores: dict[str, Any] = {
        "run_id": archive.run_id,
        "trial": trial.number,
        "recipe_key": trial.recipe_key,
        "search": {"metrics": trial.metrics, "objectives": trial.objectives, "scalar": trial.scalar,
                   "how": {k: (config.get("evaluator") or {}).get(k) for k in
                           ("tasks", "include_path", "limit", "limits", "samples", "num_fewshot", "batch_size")}},
    }
    if heldout:
        scores["heldout"] = {**live.heldout(), "how": live.plan.to_dict()}
    provenance = {
        "run": f"{info.get('name')} ({archive.run_id})", "run dir": str(run_dir), "trial": trial.number,
        "strategy": info.get("strategy"), "seed": info.get("seed"), "budget": info.get("budget"),
        "evaluations": archive.count(), "zoo": (info.get("zoo") or {}).get("dir"), **(extra or {}),
    }
    is_path = isinstance(recipe, LayerPath)
    mk = None if is_path else mergekit_yaml.recipe_to_mergekit(recipe, live.sources, live.pool, dtype=live.dtype)
    sources = live.sources if is_path else {n: live.sources[n] for n in (recipe.base, *recipe.models)}
    if is_path:
        _save_path_model(live, recipe, info, folder, max_shard_size)
    else:
        save_merged(live.model.cpu(), live.tokenizer, folder, recipe, sources, max_shard_size=max_shard_size)
        live.model.to(live.engine.device)
        if live.dtype:  # `fuse-evo merge recipe.yaml` rebuilds in the run's dtype
            data = yaml.safe_load((folder / "recipe.yaml").read_text())
            data["dtype"] = live.dtype
            (folder / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / SCORES_FILE).write_text(json.dumps(scores, indent=2, sort_keys=True))
    if mk is not None:
        (folder / MERGEKIT_FILE).write_text(yaml.safe_dump(mk, sort_keys=False))
    card = _path_card if is_path else _model_card
    (folder / "README.md").write_text(card(recipe, sources, scores, provenance))
    return scores


def _front_index(archive: Archive, members: list[tuple[Trial, dict[str, Any]]], total: int) -> tuple[dict, str]:
    """front.json and the folder's README: each member's folder, search and held-out scores,
    and the hypervolume of what was exported."""
    directions = archive.directions()
    reference, source = archive.reference_point()
    ref = pareto.to_losses(reference, directions) if len(reference) == len(directions) else None
    search_hv = None if ref is None else pareto.hypervolume(
        [pareto.to_losses(t.objectives, directions) for t, _ in members], ref)
    held = [(s.get("heldout") or {}).get("objectives") or {} for _, s in members]
    held_hv = None
    if ref is not None and held and all(set(directions) <= set(h) for h in held):
        held_hv = pareto.hypervolume([pareto.to_losses(h, directions) for h in held], ref)
    names = list(directions)
    index = {"run_id": archive.run_id, "front_size": total, "exported": len(members),
             "reference_point": reference, "reference_source": source,
             "hypervolume": {"search": search_hv, "heldout": held_hv},
             "members": [{"folder": f"trial_{t.number}", "trial": t.number, "search": t.objectives,
                          "heldout": h or None} for (t, _), h in zip(members, held)]}
    lines = [f"# Pareto front of run {archive.run_id}", "",
             f"{len(members)} of the front's {total} members (objectives: "
             + ", ".join(f"{n} ({d})" for n, d in directions.items()) + "). Each folder is an ordinary model "
             "with its recipe, scores.json and a model card.", "",
             "| folder | " + " | ".join(f"search {n}" for n in names)
             + (" | " + " | ".join(f"held-out {n}" for n in names) if any(held) else "") + " |",
             "| --- |" + " --- |" * (len(names) * (2 if any(held) else 1))]
    for (t, _), h in zip(members, held):
        cells = [f"{t.objectives[n]:.4f}" for n in names]
        if any(held):
            cells += [f"{h[n]:.4f}" if n in h else "-" for n in names]
        lines.append(f"| trial_{t.number} | " + " | ".join(cells) + " |")
    if search_hv is not None:
        lines += ["", "Hypervolume of these members against the reference point "
                  + ", ".join(f"{n} {reference[n]:g} ({source[n]})" for n in names)
                  + f": search {search_hv:.4f}" + (f", held-out {held_hv:.4f}" if held_hv is not None else "") + "."]
    return index, "\n".join(lines) + "\n"


def export_run(
    run_dir: str | Path,
    out: str | Path,
    pick: str = "best",
    overwrite: bool = False,
    heldout: bool = True,
    device: str | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Export one trial (``best``, ``trial:N``) as a model folder at ``out``, or Pareto front
    members (``pareto``, ``pareto:K``) as ``out/trial_N/`` folders with ``front.json`` and a
    README table. Written in a staging folder and moved into place when complete."""
    from ..export import check_out, default_permissions, replace_folder, staging_dir

    run_dir = Path(run_dir).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    check_out(out, overwrite, ExportError)
    check_device(device, "--device")
    with Archive.open(run_dir) as archive:
        front = pick_front(archive, pick)
        trials = front if front is not None else [pick_trial(archive, pick)]
        live = LiveMerge(archive, device=device)
        staging = staging_dir(out, ExportError)
        try:
            if front is None:
                folder = staging / "model"
                _write_trial(archive, run_dir, live, trials[0], folder, heldout, max_shard_size)
            else:
                folder = staging / "front"
                total = len(archive.pareto_front())
                members = []
                for i, trial in enumerate(trials):
                    extra = {"pareto front": f"member {i + 1} of {len(trials)} exported ({total} on the front)"}
                    members.append((trial, _write_trial(archive, run_dir, live, trial, folder / f"trial_{trial.number}",
                                                        heldout, max_shard_size, extra)))
                index, readme = _front_index(archive, members, total)
                (folder / FRONT_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
                (folder / "README.md").write_text(readme)
            default_permissions(folder)
            replace_folder(folder, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fuse-evo export",
        description="Write a searched recipe (the best, or trial N) as a Hugging Face folder with its "
        "recipe.yaml, scores.json (search and held-out scores), a model card, and mergekit.yaml when "
        "mergekit can express the recipe.",
    )
    parser.add_argument("run_dir", type=Path, help="the search's run directory")
    parser.add_argument("--pick", default="best",
                        help="best (default), trial:N, pareto (every front member) or pareto:K (K spread over it)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output model folder (for pareto picks: a folder of trial_N model folders)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-heldout", dest="heldout", action="store_false", help="skip held-out scoring")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the run's device)")
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.out, pick=args.pick, overwrite=args.overwrite, heldout=args.heldout,
                     device=args.device, max_shard_size=args.max_shard_size)
    if (out / FRONT_FILE).exists():
        print((out / "README.md").read_text())
        print(f"exported to {out}")
        return 0
    scores = json.loads((out / SCORES_FILE).read_text())
    line = f"trial {scores['trial']}: search scalar {scores['search']['scalar']:.4f}"
    held = (scores.get("heldout") or {}).get("scalar")
    if held is not None:
        line += f", held-out scalar {held:.4f}"
    print(line)
    print(f"exported to {out}" + (" (with mergekit.yaml)" if (out / MERGEKIT_FILE).exists() else ""))
    return 0
