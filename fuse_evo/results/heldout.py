"""Held-out scores of a finished run: what the search never saw.

``heldout_plan`` says how a run's candidates are scored out of sample: each search task's
held-out task (``evaluator.heldout_tasks``; a zoo run's ``*_heldout`` counterpart), or the
held-out side of the run's document split (``evaluator.split``), every document. A task with
neither is scored on its search split with the run's limits, and every output calls those
scores "search split (no held-out set)" (``HeldOut.label``), never held-out.
``HeldOutMerge`` rebuilds a run's live merge from its archive and scores any candidate on that
plan; export, report and compare all score through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..device import check_device
from ..errors import FuseEvoError
from ..evaluate.objectives import parse_metric, scalar_of
from ..evaluate.outcomes import aligned, outcomes_of, paired_bootstrap
from ..merge.live import LiveMerge
from ..models import ModelPool
from ..recipe import Recipe
from ..search import pareto
from ..search.archive import Archive, Trial


class HeldOutError(FuseEvoError):
    """A run whose candidates cannot be scored out of sample (no tokenizer, ...)."""


SEARCH_ONLY = "search split (no held-out set)"  # the label of scores that are not held out


@dataclass
class HeldOut:
    """How held-out scores are made: tasks, their include path, limits, how each search
    objective's metric maps onto a held-out task, the held-out side of the run's document
    split (``split``: search_fraction, seed, the tasks it splits) and what to call the scores
    (``label``: "held-out", or ``SEARCH_ONLY`` where some task has no held-out set)."""

    tasks: list[str]
    include_path: list[str]
    limit: float | None
    limits: dict[str, float | None]
    num_fewshot: int | None
    batch_size: int
    rename: dict[str, str]  # search task -> held-out task
    note: str
    split: dict[str, Any] | None = None
    label: str = "held-out"

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "include_path": self.include_path, "limit": self.limit,
                "limits": self.limits, "num_fewshot": self.num_fewshot, "batch_size": self.batch_size,
                "from_search_tasks": self.rename, "split": self.split, "label": self.label, "note": self.note}


def heldout_plan(archive: Archive) -> HeldOut:
    """Each search task's held-out set: ``evaluator.heldout_tasks``, else (a zoo run) the zoo's
    ``*_heldout`` counterpart, else the held-out side of ``evaluator.split``; a task with none
    is scored on the search split itself, with the run's limits, and labelled so."""
    info, config = archive.info, archive.config
    ev = config.get("evaluator") or {}
    tasks = list(info.get("tasks") or ev.get("tasks") or [])
    include = [str(p) for p in (info.get("include_path") or ev.get("include_path") or [])]
    rename = {t: str(o) for t, o in (ev.get("heldout_tasks") or {}).items() if t in tasks}
    zoo_tasks = (info.get("zoo") or {}).get("task_dir")
    if zoo_tasks:
        for t in tasks:
            if t not in rename and t.endswith("_search") \
                    and (Path(zoo_tasks) / f"{t[:-len('_search')]}_heldout.yaml").exists():
                rename[t] = f"{t[:-len('_search')]}_heldout"
    split_cfg = ev.get("split") or {}
    fraction = split_cfg.get("search_fraction")
    split_tasks = [t for t in tasks if t not in rename] if fraction is not None else []
    uncovered = [t for t in tasks if t not in rename and t not in split_tasks]
    limits = {t: (ev.get("limits") or {}).get(t, ev.get("limit")) for t in uncovered}
    notes = []
    if rename:
        notes.append("held-out tasks " + ", ".join(f"{t} -> {o}" for t, o in rename.items()) + ", every document")
    if split_tasks:
        notes.append(f"the held-out side of the run's split of {', '.join(split_tasks)} "
                     f"(search fraction {fraction}, seed {split_cfg.get('seed', 0)}), every document")
    if uncovered:
        notes.append(f"no held-out set for {', '.join(uncovered)}: its search split, with the run's limits")
    if not uncovered:
        label = "held-out"
    elif len(uncovered) == len(tasks):
        label = SEARCH_ONLY
    else:
        label = f"held-out, except {', '.join(uncovered)}: {SEARCH_ONLY}"
    split = ({"search_fraction": float(fraction), "seed": int(split_cfg.get("seed", 0)), "tasks": split_tasks}
             if split_tasks else None)
    return HeldOut([rename.get(t, t) for t in tasks], include, None, {t: v for t, v in limits.items() if v is not None},
                   ev.get("num_fewshot"), int(ev.get("batch_size") or 64), {t: rename.get(t, t) for t in tasks},
                   "; ".join(notes), split, label)


def heldout_objectives(info: dict[str, Any], plan: HeldOut, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric objective of the run, read from the held-out task's metrics."""
    out: dict[str, float] = {}
    for o in info.get("objectives") or []:
        if not o.get("metric"):
            continue
        task, metric = parse_metric(o["metric"], "objective")
        key = f"{plan.rename.get(task, task)}/{metric}"
        if key in metrics:
            out[o["name"]] = metrics[key]
    return out


class HeldOutMerge(LiveMerge):
    """A run's LiveMerge (its models, device and dtype, as its workers built them) with the
    run's held-out evaluators, one per live model, built on first use."""

    def __init__(self, archive: Archive, device: str | None = None, allow_pickle: bool | None = None):
        info, config = archive.info, archive.config
        self.info = info
        run = config.get("run") or {}
        models_cfg = config.get("models") or {}
        base_name = info["base"]
        self.sources = dict(info["sources"])
        if device is None:  # the run's device, which this machine may lack
            check_device(run.get("device"), "the run's run.device", fix="pass --device cpu to export on this machine")
        pickle_ok = bool(models_cfg.get("allow_pickle")) if allow_pickle is None else allow_pickle
        pool = ModelPool(self.sources[base_name], {n: p for n, p in self.sources.items() if n != base_name},
                         allow_pickle=pickle_ok, trust_remote_code=bool(models_cfg.get("trust_remote_code")),
                         base_name=base_name)
        super().__init__(pool, device=device if device is not None else run.get("device"), dtype=run.get("dtype"),
                         dataflow=info.get("dataflow"))
        self.plan = heldout_plan(archive)
        self._evaluators: dict[int, Any] = {}

    def source_recipe(self, name: str) -> Recipe:
        """A recipe whose merge is the model ``name`` itself (the base: every weight 0)."""
        models = [n for n in self.sources if n != self.info["base"]]
        if name == self.info["base"]:
            return Recipe("task_arithmetic", (models[0],), base=name, groups={"*": {models[0]: {"weight": 0.0}}})
        return Recipe("task_arithmetic", (name,), base=self.info["base"], groups={"*": {name: {"weight": 1.0}}})

    def heldout(self) -> dict[str, Any]:
        """Held-out metrics, objectives and scalar of the live model as it is now."""
        from ..evaluate.evaluator import DocumentSplit, Evaluator

        if self.tokenizer is None:
            raise HeldOutError(f"{self.sources[self.info['base']]} has no tokenizer: held-out scoring needs one")
        evaluator = self._evaluators.get(id(self.live))
        if evaluator is None:  # one per live object: the merged model, the routed one
            p = self.plan
            split = None if p.split is None else DocumentSplit(p.split["search_fraction"], p.split["seed"], "heldout",
                                                                tuple(p.split["tasks"]))
            evaluator = self._evaluators[id(self.live)] = Evaluator(
                self.live, self.tokenizer, p.tasks, include_path=p.include_path or None, limit=p.limit,
                limits={k: v for k, v in p.limits.items() if k in p.tasks}, num_fewshot=p.num_fewshot,
                batch_size=p.batch_size, split=split)
        scores = evaluator.score()
        metrics = scores.flat()
        objectives = heldout_objectives(self.info, self.plan, metrics)
        return {"metrics": metrics, "objectives": objectives, "scalar": scalar_of(self.info, objectives),
                "outcomes": outcomes_of(scores)}


def paired_difference(info: dict[str, Any], plan: HeldOut, a: dict[str, Any], b: dict[str, Any],
                      iters: int = 10_000) -> dict[str, Any] | None:
    """``a - b`` on the held-out documents (``a``, ``b``: ``HeldOutMerge.heldout()`` results),
    paired document by document: per metric objective and for the run's scalar (weights and
    directions), each with a 95% paired-bootstrap interval (``Difference.to_dict``); None when
    either side has no per-document outcomes or the run has no metric objective."""
    if not a.get("outcomes") or not b.get("outcomes"):
        return None
    pairs, weights = {}, {}
    for o in info.get("objectives") or []:
        if not o.get("metric"):
            continue
        task, metric = parse_metric(o["metric"], "objective")
        task = plan.rename.get(task, task)
        if metric not in a["outcomes"]["values"].get(task, {}):
            return None  # a corpus-level metric: no per-document values to pair
        pairs[o["name"]] = aligned(a["outcomes"], b["outcomes"], task, metric)
        weights[o["name"]] = float(o["weight"]) * (1.0 if o["direction"] == "max" else -1.0)
    if not pairs:
        return None
    per, scalar = paired_bootstrap(pairs, weights, iters=iters)
    return {"objectives": {k: d.to_dict() for k, d in per.items()}, "scalar": scalar.to_dict()}


def heldout_spread(live: HeldOutMerge, front: list[Trial], directions: dict[str, str], k: int
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


