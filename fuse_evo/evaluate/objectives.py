"""Objectives: named numbers the search optimizes, from task metrics and from costs.

A config (``ObjectiveConfig`` in ``fuse_evo.config``) maps a metric of one task
(``zoo_increment_search/acc``, ``zoo_reverse_mc_search/acc_norm,none``) or a cost to a named
objective with a direction and a weight. Costs are what a merge costs to run, for the search to
trade against quality: its parameter count, the number of decoder layers on its path (a
data-flow merge may repeat or skip layers; a plain model's path is its ``num_hidden_layers``)
and the tokens per second it was scored at.

Multi-objective strategies take ``losses()`` (every objective as a value to minimize);
single-objective ones take ``scalar()``, the weighted sum of the objectives, signed so that
larger is better. No lm-eval here: scores arrive as ``Scores`` objects (or any mapping
``{"task/metric,filter": value}``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import ObjectiveConfig

COSTS = {"params": "min", "layers": "min", "tokens_per_s": "max"}
DIRECTIONS = ("max", "min")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "max" or "min"
    weight: float = 1.0
    task: str | None = None  # a metric objective: task and "metric,filter"
    metric: str | None = None
    cost: str | None = None  # or a cost: params | layers | tokens_per_s
    reference: float | None = None  # the hypervolume's reference value (None: see ``default_reference``)

    @property
    def key(self) -> str:
        """``task/metric,filter`` or ``cost/NAME``: where the value comes from."""
        return f"{self.task}/{self.metric}" if self.cost is None else f"cost/{self.cost}"

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "max" else -1.0

    @property
    def default_reference(self) -> float | None:
        return default_reference(self.reference, self.cost is None, self.direction)


def default_reference(reference: float | None, is_metric: bool, direction: str) -> float | None:
    """An objective's hypervolume reference: the stated one, else 0 for a maximized metric
    (an accuracy's floor), else None (a reader takes the worst value the run has seen)."""
    if reference is not None:
        return float(reference)
    return 0.0 if is_metric and direction == "max" else None


def parse_metric(spec: str, where: str) -> tuple[str, str]:
    """``"task/acc"`` -> ``("task", "acc,none")``; ``"task/em,strict"`` keeps its filter."""
    task, sep, metric = spec.partition("/")
    if not sep or not task or not metric or "/" in metric:
        raise ConfigError(f"{where}.metric: {spec!r} is not TASK/METRIC or TASK/METRIC,FILTER")
    name, comma, filt = metric.partition(",")
    if not name or (comma and not filt):
        raise ConfigError(f"{where}.metric: {spec!r} has an empty metric or filter name")
    return task, f"{name},{filt or 'none'}"


def _field(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def objective(cfg: ObjectiveConfig | Mapping[str, Any], where: str = "objectives[0]") -> Objective:
    """Validate one objective config; every error names the key at fault."""
    if isinstance(cfg, Mapping):
        unknown = set(cfg) - {"name", "metric", "cost", "direction", "weight", "reference"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: name, metric, cost, direction, "
                              "weight, reference)")
    name = _field(cfg, "name")
    if not isinstance(name, str) or not name or name == "???":
        raise ConfigError(f"{where}.name: every objective needs a name")
    metric, cost = _field(cfg, "metric"), _field(cfg, "cost")
    if (metric is None) == (cost is None):
        raise ConfigError(f"{where} ({name}): give exactly one of metric (TASK/METRIC) or cost ({', '.join(COSTS)})")
    if cost is not None and cost not in COSTS:
        raise ConfigError(f"{where}.cost: {cost!r} is not one of {', '.join(COSTS)}")
    direction = _field(cfg, "direction") or (COSTS[cost] if cost is not None else "max")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction: {direction!r} is not one of max, min")
    weight = _field(cfg, "weight", 1.0)
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.weight: {weight!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where}.weight: must be a finite number >= 0, got {weight}")
    reference = _field(cfg, "reference")
    if reference is not None:
        try:
            reference = float(reference)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.reference: {reference!r} is not a number") from None
        if not math.isfinite(reference):
            raise ConfigError(f"{where}.reference: must be finite, got {reference}")
    task = metric_key = None
    if metric is not None:
        task, metric_key = parse_metric(str(metric), where)
    return Objective(name, direction, weight, task, metric_key, cost, reference)


def short_names(tasks: Sequence[str]) -> list[str]:
    """Each task's name without the words every name shares at its start and end
    (``zoo_increment_search``, ``zoo_reverse_search`` -> ``increment``, ``reverse``; words
    split at ``_``, ``-`` and ``.``); a single task keeps its whole name."""
    words = [re.split(r"(?<=[_.-])", t) for t in tasks]
    if len(tasks) < 2:
        return list(tasks)
    head = 0
    while all(len(w) > head + 1 and w[head] == words[0][head] for w in words):
        head += 1
    tail = 0
    while all(len(w) > head + tail + 1 and w[-1 - tail] == words[0][-1 - tail] for w in words):
        tail += 1
    names = ["".join(w[head:len(w) - tail]).strip("_.-") for w in words]
    return names if len(set(names)) == len(names) and all(names) else list(tasks)


def default_objectives(primary: Mapping[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """One objective per task, its primary metric (``{task: ("metric,filter", direction)}``,
    what ``Evaluator.primary_metrics`` reads), equally weighted."""
    tasks = list(primary)
    return [{"name": name, "metric": f"{task}/{primary[task][0]}", "direction": primary[task][1],
             "weight": 1.0 / len(tasks)} for name, task in zip(short_names(tasks), tasks)]


class Objectives:
    """A validated list of objectives, and their values for one scored model."""

    def __init__(self, configs: Iterable[ObjectiveConfig | Mapping[str, Any]], prefix: str = "objectives"):
        self.items = [objective(c, f"{prefix}[{i}]") for i, c in enumerate(configs)]
        if not self.items:
            raise ConfigError(f"{prefix}: give at least one objective")
        seen: set[str] = set()
        for i, o in enumerate(self.items):
            if o.name in seen:
                raise ConfigError(f"{prefix}[{i}].name: {o.name!r} is used twice")
            seen.add(o.name)
        self.prefix = prefix

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.items]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(o.task for o in self.items if o.task is not None))

    def check_tasks(self, available: Mapping[str, Sequence[str]]) -> None:
        """Every metric objective names an evaluated task and one of its metrics.

        ``available``: ``{task: ["acc,none", ...]}`` (what ``Evaluator.metric_names`` gives).
        """
        for i, o in enumerate(self.items):
            if o.task is None:
                continue
            if o.task not in available:
                raise ConfigError(
                    f"{self.prefix}[{i}].metric: task {o.task!r} is not evaluated (tasks: {sorted(available)})"
                )
            if available[o.task] and o.metric not in available[o.task]:
                raise ConfigError(
                    f"{self.prefix}[{i}].metric: task {o.task!r} has no metric {o.metric!r} "
                    f"(it reports {sorted(available[o.task])})"
                )

    def values(self, scores: Any, costs: Mapping[str, float] | None = None) -> dict[str, float]:
        """``{objective name: value}`` in the objective's own units (accuracy, parameters...).

        ``scores``: a ``Scores`` (or ``{"task/metric,filter": value}``); ``costs``: measured
        costs by name (``measure_costs``), needed only when a cost objective is configured.
        """
        flat = scores.flat() if hasattr(scores, "flat") else dict(scores)
        out: dict[str, float] = {}
        for o in self.items:
            if o.cost is not None:
                if not costs or o.cost not in costs:
                    raise KeyError(f"objective {o.name!r}: cost {o.cost!r} was not measured")
                out[o.name] = float(costs[o.cost])
            else:
                if o.key not in flat:
                    raise KeyError(f"objective {o.name!r}: {o.key} is not in the scores")
                out[o.name] = float(flat[o.key])
        return out

    def losses(self, values: Mapping[str, float]) -> list[float]:
        """Every objective as a value to minimize, in order (maximized ones negated)."""
        return [-o.sign * values[o.name] for o in self.items]

    def scalar(self, values: Mapping[str, float]) -> float:
        """The weighted sum of the objectives, signed so that larger is better."""
        return sum(o.weight * o.sign * values[o.name] for o in self.items)


def scalar_of(info: Mapping[str, Any], objectives: Mapping[str, float]) -> float | None:
    """A run's weighted sum (larger is better) from its archived ``info`` (each objective's
    name, weight and direction), when every objective has a value: ``Objectives.scalar`` for
    readers that have the archive, not the config."""
    total = 0.0
    for o in info.get("objectives") or []:
        if o["name"] not in objectives:
            return None
        total += float(o["weight"]) * (1.0 if o["direction"] == "max" else -1.0) * objectives[o["name"]]
    return total


# ---------------------------------------------------------------------------- costs
def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def path_layers(model: Any, path: Sequence[Any] | None = None) -> int:
    """Decoder layers a forward pass runs through: the routing path's length when there is
    one (data-flow merges), else the model's ``num_hidden_layers``."""
    if path is not None:
        return len(path)
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{type(model).__name__}: its config has no num_hidden_layers")
    return int(n)


def measure_costs(model: Any, scores: Any = None, path: Sequence[Any] | None = None) -> dict[str, float]:
    """``params``, ``layers`` and, from a scored call, ``tokens_per_s`` (tokens the model
    read and generated during ``score()``, over that call's wall time)."""
    costs = {"params": float(parameter_count(model)), "layers": float(path_layers(model, path))}
    tokens, seconds = getattr(scores, "tokens", None), getattr(scores, "seconds", None)
    if tokens and seconds:
        costs["tokens_per_s"] = tokens / seconds
    return costs
