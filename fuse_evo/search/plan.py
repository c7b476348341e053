"""The search's plan: its configuration judged and resolved once, before anything runs.

``check_plan`` judges what needs no model (budgets, limits, the cluster, the device) before a
run directory is made. ``make_plan`` then resolves the rest once, in one place, into a frozen
``Plan``: the models (a zoo built if missing), the search space, the objectives, what every
worker builds itself from (``WorkerSpec``) and the strategy's config, with every value the
config left to be found (``run.id``, ``strategy.num_workers``, the cluster's workers, the
zoo's task folder) filled in. The loop (``run.py``) only reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import (RESUME_SAFE, ClusterConfig, DataFlowSpaceConfig, ModelsConfig, ObjectiveConfig, SearchCommand,
                      StrategyConfig, check_backend, check_fidelity, check_heldout, check_limits, to_yaml)
from ..device import check_device
from ..errors import ConfigError, FuseEvoError
from ..evaluate.objectives import Objectives, default_objectives
from ..merge.placement import Machine, MemoryPlan, memory_plan, read_model_bytes
from ..registry import spec
from ..recipe import DATAFLOW, DataFlowError, is_path
from .archive import Archive
from .dataflow_space import DataFlowSpace
from .scheduler import check_cluster
from .space import GenomeSpace, SearchSpace, SpaceError
from .worker import WorkerSpec


def command_yaml(cmd: SearchCommand) -> str:
    """The config a run directory's config.yaml holds."""
    return to_yaml(cmd)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not data and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: data}


def config_differences(stored: dict[str, Any], new: dict[str, Any], ignore=RESUME_SAFE) -> list[str]:
    """``key: stored -> new`` for every key that differs, resume-safe keys left out."""
    a, b = _flatten(stored), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or any(key.startswith(f"{k}.") for k in ignore):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


@dataclass
class Models:
    base: str
    sources: dict[str, str]
    zoo_dir: str | None = None
    task_dir: str | None = None


def resolve_models(cfg: ModelsConfig, progress: bool) -> Models:
    """The base and source folders: from the zoo (built if missing) or given explicitly."""
    if cfg.zoo is not None:
        if cfg.base is not None:
            raise ConfigError("models: give a zoo (models.zoo) or a base (models.base), not both")
        from ..zoo.build import build_zoo

        manifest = build_zoo(cfg.zoo, progress=progress)
        zoo_models = manifest["models"]
        specialists = [n for n, m in zoo_models.items() if m.get("skill")]
        sources: dict[str, str] = {}
        for name, path in (cfg.sources or {n: None for n in specialists}).items():
            if path is None:
                if name not in zoo_models or name == manifest["base"]:
                    raise ConfigError(f"models.sources.{name}: the zoo has no such specialist ({specialists})")
                path = zoo_models[name]["path"]
            sources[name] = str(path)
        return Models(zoo_models[manifest["base"]]["path"], sources,
                      str(Path(manifest["task_dir"]).parent), manifest["task_dir"])
    if not cfg.base:
        raise ConfigError("models.base: name the base model (a folder or hub id), or use a zoo (models=zoo_tiny)")
    if not cfg.sources:
        raise ConfigError("models.sources: name the fine-tuned models to merge ({name: folder or hub id})")
    missing = [n for n, p in cfg.sources.items() if not p]
    if missing:
        raise ConfigError(f"models.sources.{missing[0]}: no path given (only a zoo fills paths in)")
    return Models(str(cfg.base), {n: str(p) for n, p in cfg.sources.items()})


def base_config(base: str) -> dict[str, Any]:
    from ..models import resolve

    folder = resolve("base", base)
    path = folder / "config.json"
    if not path.exists():
        raise FuseEvoError(f"models.base: {folder} has no config.json")
    return json.loads(path.read_text())


def check_plan(cmd: SearchCommand) -> None:
    """The values that need no model to be judged, checked before the run directory is made."""
    for key, value in (("run.budget", cmd.run.budget), ("strategy.budget", cmd.strategy.budget),
                       ("run.threads", cmd.run.threads)):
        if value is not None and int(value) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    check_limits(cmd.evaluator)
    check_heldout(cmd.evaluator)
    check_backend(cmd.evaluator)
    check_fidelity(cmd.evaluator)
    check_cluster(cmd.cluster)
    if cmd.cluster.backend == "serial" or not cmd.cluster.address:  # a joined cluster's GPUs are on its nodes
        check_device(cmd.run.device, "run.device")




@dataclass(frozen=True)
class Plan:
    """One run's resolved configuration. ``cmd``: the command as config.yaml records it
    (``run.id``, ``strategy.num_workers`` and the cluster resolved); ``strategy``: what the
    strategy is built from (``num_objectives`` resolved; on resume, the first start's budget
    and workers, which the optimizer planned for); ``reference``: the hypervolume's reference
    point as losses (None: some objective takes it from the run)."""

    cmd: SearchCommand
    models: Models
    space: GenomeSpace
    objectives: Objectives
    worker: WorkerSpec
    strategy: StrategyConfig
    reference: list[float] | None
    memory: MemoryPlan | None = None

    @property
    def budget(self) -> int:
        return int(self.cmd.run.budget)


def make_plan(cmd: SearchCommand, run_id: str, cluster: ClusterConfig, stored: dict[str, Any] | None) -> Plan:
    """The plan of ``cmd`` (checked by ``check_plan``) for run ``run_id`` on ``cluster``
    (resolved: a Ray cluster joined or started knows its workers); ``stored``: the config
    of the run being resumed. Every error names its config key."""
    strategy = cmd.strategy
    if strategy.num_workers is None:  # the optimizer plans for as many candidates in flight as workers
        strategy = replace(strategy, num_workers=int(cluster.num_workers))
    cmd = replace(cmd, run=replace(cmd.run, id=run_id), strategy=strategy, cluster=cluster)

    models = resolve_models(cmd.models, progress=cmd.run.progress)
    space_cfg = space_models(cmd.space, models)
    dataflow = None
    if space_cfg.method == DATAFLOW:
        if cmd.evaluator.backend == "vllm":  # a routed path changes the layer count the engine was built with
            raise ConfigError("evaluator.backend=vllm scores parameter-space merges only: a data-flow candidate "
                              "changes the number of layers, and a vLLM engine serves one architecture; use "
                              "evaluator.backend=hf for space.method=dataflow")
        space, dataflow = _dataflow_space(cmd, space_cfg, models)
    else:
        space = SearchSpace(space_cfg, base_config(models.base))

    evaluator = cmd.evaluator
    if not evaluator.include_path and models.task_dir:
        evaluator = replace(evaluator, include_path=[models.task_dir])
    if not evaluator.tasks:
        raise ConfigError("evaluator.tasks: name the lm-eval tasks that score a candidate")
    if not any(_field(o, "metric") for o in evaluator.objectives):  # each task's primary metric, equally weighted
        evaluator = replace(evaluator, objectives=[*(ObjectiveConfig(**o) for o in task_objectives(evaluator)),
                                                   *evaluator.objectives])
    objectives = Objectives(evaluator.objectives, prefix="evaluator.objectives")
    n_obj = cmd.strategy.num_objectives
    if n_obj not in (None, 1, len(objectives)):
        raise ConfigError(f"strategy.num_objectives: {n_obj}; use 1 (the weighted sum of the objectives), "
                          f"{len(objectives)} (each of {objectives.names}) or null (each of them)")
    memory = plan_memory(cmd, models, space_cfg, cluster)
    if memory is not None and memory.kv_cache_bytes is not None and evaluator.vllm.kv_cache_gb is None:
        # the engine's KV cache is what the plan gave it (vLLM then ignores gpu_memory_utilization)
        evaluator = replace(evaluator, vllm=replace(evaluator.vllm, kv_cache_gb=memory.kv_cache_bytes / 2**30))
    worker = WorkerSpec(
        base=models.base, sources={m: models.sources[m] for m in space_cfg.models},
        evaluator=evaluator, base_name=space_cfg.base, allow_pickle=cmd.models.allow_pickle,
        trust_remote_code=cmd.models.trust_remote_code, device=cmd.run.device, dtype=cmd.run.dtype,
        threads=cmd.run.threads, dataflow=dataflow, placement=memory.chosen if memory else None,
    )

    first = (stored or {}).get("strategy") or {}  # a resume: the optimizer planned for its first budget and workers
    strategy_cfg = replace(
        cmd.strategy,
        num_objectives=len(objectives) if cmd.strategy.num_objectives is None else cmd.strategy.num_objectives,
        budget=int(first.get("budget", cmd.strategy.budget)),
        num_workers=int(first.get("num_workers") or cmd.strategy.num_workers))
    reference = [o.default_reference for o in objectives]
    losses = None if None in reference else objectives.losses(dict(zip(objectives.names, reference)))
    return Plan(cmd, models, space, objectives, worker, strategy_cfg, losses, memory)


def _field(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def task_objectives(evaluator: Any) -> list[dict[str, Any]]:
    """The default objectives of ``evaluator``'s tasks, read from their task files."""
    from ..evaluate.evaluator import TaskError, primary_metrics

    try:
        return default_objectives(primary_metrics(evaluator.tasks, evaluator.include_path))
    except TaskError as e:
        raise ConfigError(f"evaluator.tasks: {e}") from None


def space_models(space_cfg: Any, models: Models) -> Any:
    """``space`` with its models filled in (default: every source), each checked a source."""
    if not space_cfg.models:
        space_cfg = replace(space_cfg, models=list(models.sources))
    unknown = [m for m in space_cfg.models if m not in models.sources]
    if unknown:
        raise ConfigError(f"space.models: {unknown} are not source models (models: {list(models.sources)})")
    return space_cfg


def plan_memory(cmd: SearchCommand, models: Models, space_cfg: Any, cluster: ClusterConfig) -> MemoryPlan | None:
    """Each worker's bytes per placement, from the models' headers (no tensor data), for
    ``cmd.plan``'s node (its unset fields: this machine) and the chosen placement; a
    PlacementError (exit 2, naming the bytes) when nothing fits. None for a model that is no
    local folder (a hub id: planned by the worker once downloaded)."""
    folders = {space_cfg.base: models.base, **{m: models.sources[m] for m in space_cfg.models}}
    if not all(Path(f).is_dir() for f in folders.values()):
        return None
    base = read_model_bytes(space_cfg.base, models.base)
    sources = [read_model_bytes(m, models.sources[m]) for m in space_cfg.models]
    sparsify = None if space_cfg.method == DATAFLOW else spec(space_cfg.method).sparsify
    p = cmd.plan
    workers = p.workers_per_node or (int(cluster.num_workers or 1) if not cluster.address else 1)
    here = Machine.here(workers, cmd.run.device)
    machine = Machine(int(p.gpu_memory_gb * 1e9) if p.gpu_memory_gb is not None else here.gpu_bytes,
                      int(p.host_memory_gb * 1e9) if p.host_memory_gb is not None else here.host_bytes, workers)
    return memory_plan(base, sources, machine, live_dtype=cmd.run.dtype,
                       thresholds=sparsify in ("magnitude", "outliers"), ranks=sparsify == "ranked",
                       batch_size=cmd.evaluator.batch_size, sequence_length=p.sequence_length,
                       scored_tokens=p.scored_tokens, force=cmd.cluster.placement,
                       vllm=cmd.evaluator.backend == "vllm", max_model_len=int(cmd.evaluator.vllm.max_model_len or
                                                                               p.sequence_length),
                       kv_cache_bytes=None if cmd.evaluator.vllm.kv_cache_gb is None
                       else int(cmd.evaluator.vllm.kv_cache_gb * 2**30))


def _dataflow_space(cmd: SearchCommand, space_cfg: Any, models: Models) -> tuple[DataFlowSpace, dict[str, Any]]:
    """The data-flow space over the laid-out models, and what its workers need to route."""
    cfg = space_cfg.dataflow or DataFlowSpaceConfig()
    merged = None
    if cfg.merged_from:
        merged = _merged_recipe(cfg.merged_from, {space_cfg.base: models.base, **models.sources})
    names = list(cfg.models) or (["merged"] if merged else []) + list(space_cfg.models)
    allowed = {space_cfg.base, *space_cfg.models, *(["merged"] if merged else [])}
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ConfigError(f"space.dataflow.models: {unknown} are not the base, a source model"
                          f"{' or merged' if merged else ''} ({sorted(allowed)})")
    space = DataFlowSpace(replace(cfg, models=names), base_config(models.base))
    try:
        initial = space.decode(space.initial())
    except (SpaceError, DataFlowError) as e:
        raise ConfigError(f"space.dataflow: the starting path is not valid ({e})") from None
    return space, {"io_model": space.io_model, "models": names, "initial": initial.to_dict(), "merged": merged,
                   "merged_from": cfg.merged_from}


def _merged_recipe(run_dir: str, ours: dict[str, str]) -> dict[str, Any]:
    """The best recipe of a finished parameter-space run over the same models (``ours``:
    name -> path, the base included)."""
    where = "space.dataflow.merged_from"
    try:
        with Archive.open(Path(run_dir).expanduser()) as archive:
            best, info = archive.best(), archive.info
    except FuseEvoError as e:
        raise ConfigError(f"{where}: {e}") from None
    if best is None or is_path(best.recipe):
        raise ConfigError(f"{where}: run {run_dir} has no completed parameter-space trial to merge")
    other = {n: p for n, p in info["sources"].items() if ours.get(n) != p}
    if other:
        raise ConfigError(f"{where}: run {run_dir} merged other models ({other}) than this search's {ours}")
    return best.recipe
