"""``fuse-evo export RUN_DIR --pick best|trial:N|pareto[:K] --out DIR``: a searched recipe as a model.

The chosen trial's recipe is materialized as ``fuse-evo merge`` does it (same pool, engine and
dtype as the search's workers: a ``LiveMerge``), scored on the held-out split
(``heldout.py``), and written atomically as an
ordinary Hugging Face folder holding, beside the weights and the tokenizer:

- ``recipe.yaml``: sources + recipe (``fuse-evo merge OUT/recipe.yaml --out DIR2`` rebuilds it);
- ``scores.json``: the archived search scores and the held-out scores, with how each was made;
- ``mergekit.yaml``: the same merge as a mergekit config, when mergekit can express it;
- ``README.md``: a model card with the recipe, both scores and the run's provenance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..device import check_device
from ..errors import FuseEvoError
from ..merge import mergekit
from ..merge.save import check_out, default_permissions, model_card, replace_folder, save_live_model, staging_dir
from ..merge.dataflow import plain_model
from ..recipe import LayerPath, Recipe
from ..search import pareto
from ..search.archive import Archive, Trial
from .heldout import HeldOutMerge

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


# ---------------------------------------------------------------------------- export
def heldout_label(scores: dict[str, Any]) -> str:
    """What a scores.json's "heldout" scores are: "held-out", or "search split (no held-out
    set)" for a run whose tasks have none (``HeldOut.label``)."""
    return ((scores.get("heldout") or {}).get("how") or {}).get("label") or "held-out"


def _model_card(recipe: Recipe, sources: dict[str, str], scores: dict[str, Any], provenance: dict[str, Any]) -> str:
    flat = {f"search {k}": v for k, v in scores["search"]["objectives"].items()}
    if scores["search"].get("scalar") is not None:
        flat["search scalar"] = scores["search"]["scalar"]
    held = scores.get("heldout") or {}
    label = heldout_label(scores)
    flat.update({f"{label} {k}": v for k, v in (held.get("objectives") or {}).items()})
    if held.get("scalar") is not None:
        flat[f"{label} scalar"] = held["scalar"]
    card = model_card(recipe, sources, flat)
    lines = ["## Provenance", ""]
    lines += [f"- {k}: `{v}`" for k, v in provenance.items()]
    if held:
        lines += ["", f"{label[0].upper() + label[1:]} scores: {held.get('how', {}).get('note', '')}."]
    lines += ["", "Rebuild: `fuse-evo merge recipe.yaml --out DIR`; `scores.json` holds every metric.", ""]
    return card + "\n" + "\n".join(lines)


PATH_FILE = "path.yaml"


def _save_path_model(live: HeldOutMerge, path: Any, info: dict[str, Any], folder: Path, max_shard_size: str) -> Path:
    """A data-flow candidate as an ordinary model (scales folded into copies of its layers),
    its tokenizer, and ``path.yaml``: the path, the models it runs through, the hybrid's
    merged recipe."""
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
             "## Scores", "", f"| objective | search | {heldout_label(scores)} |", "| --- | --- | --- |",
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


def _write_trial(archive: Archive, run_dir: Path, live: HeldOutMerge, trial: Trial, folder: Path, heldout: bool,
                 max_shard_size: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One trial's merge as a model folder (weights, tokenizer, recipe.yaml or path.yaml,
    scores.json, mergekit.yaml when mergekit can express it, a card); returns its scores."""
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
    mk = None if is_path else mergekit.recipe_to_mergekit(recipe, live.sources, live.pool, dtype=live.dtype)
    sources = live.sources if is_path else {n: live.sources[n] for n in (recipe.base, *recipe.models)}
    if is_path:
        _save_path_model(live, recipe, info, folder, max_shard_size)
    else:
        # the scored weights, shard by shard from the live model: no whole copy, nothing moved
        save_live_model(live.model, live.pool, live.tokenizer, folder, recipe, sources, max_shard_size=max_shard_size)
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
    label = heldout_label(members[0][1]) if members else "held-out"
    index = {"run_id": archive.run_id, "front_size": total, "exported": len(members), "heldout_label": label,
             "reference_point": reference, "reference_source": source,
             "hypervolume": {"search": search_hv, "heldout": held_hv},
             "members": [{"folder": f"trial_{t.number}", "trial": t.number, "search": t.objectives,
                          "heldout": h or None} for (t, _), h in zip(members, held)]}
    lines = [f"# Pareto front of run {archive.run_id}", "",
             f"{len(members)} of the front's {total} members (objectives: "
             + ", ".join(f"{n} ({d})" for n, d in directions.items()) + "). Each folder is an ordinary model "
             "with its recipe, scores.json and a model card.", "",
             "| folder | " + " | ".join(f"search {n}" for n in names)
             + (" | " + " | ".join(f"{label} {n}" for n in names) if any(held) else "") + " |",
             "| --- |" + " --- |" * (len(names) * (2 if any(held) else 1))]
    for (t, _), h in zip(members, held):
        cells = [f"{t.objectives[n]:.4f}" for n in names]
        if any(held):
            cells += [f"{h[n]:.4f}" if n in h else "-" for n in names]
        lines.append(f"| trial_{t.number} | " + " | ".join(cells) + " |")
    if search_hv is not None:
        lines += ["", "Hypervolume of these members against the reference point "
                  + ", ".join(f"{n} {reference[n]:g} ({source[n]})" for n in names)
                  + f": search {search_hv:.4f}" + (f", {label} {held_hv:.4f}" if held_hv is not None else "") + "."]
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
    run_dir = Path(run_dir).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    check_out(out, overwrite, ExportError)
    check_device(device, "--device")
    with Archive.open(run_dir) as archive:
        front = pick_front(archive, pick)
        trials = front if front is not None else [pick_trial(archive, pick)]
        live = HeldOutMerge(archive, device=device)
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
        line += f", {heldout_label(scores)} scalar {held:.4f}"
    print(line)
    print(f"exported to {out}" + (" (with mergekit.yaml)" if (out / MERGEKIT_FILE).exists() else ""))
    return 0
