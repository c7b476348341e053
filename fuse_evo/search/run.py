"""``fuse-evo search``: the single-machine search loop, with checkpoints and resume.

ask -> decode -> (a recipe scored before: tell its result) -> materialize + evaluate on a
worker -> objectives -> archive commit -> tell -> strategy state written atomically.

The run directory ``run.dir`` holds

- ``config.yaml``: the resolved config (with ``run.id``, the run's id in the database);
- ``archive.db``: the SQLite archive (``fuse_evo.search.archive``; absent with ``run.db_url``),
  with an Optuna study mirroring it for ``optuna-dashboard`` (``run.dashboard``);
- ``strategy.pkl``: a cache of the strategy's state (``Strategy.state_dict``), replaced
  atomically after every ask and every tell, its checksum recorded in the archive; losing it
  costs nothing but replay time (resume rebuilds the strategy from the archive);
- ``search.log``: the log, appended to by every start and resume.

Resume: the same command on the same run directory. The stored config must equal the new
one but for resume-safe keys (``run.budget`` and the like). The archive is the one truth:
every ask is committed before its candidate is dispatched and every evaluation before the
strategy is told, and resume replays those asks and tells into a fresh strategy seeded from
the run's seed (``Strategy.replay``), or loads the cache when the archive vouches for it.
Completed evaluations are read, never re-run; candidates that were in flight (asked, not
told) are re-dispatched. No crash loses or repeats one.

The budget counts archive rows: every candidate told (scored, failed, or a repeat of a
recipe already scored, which costs no evaluation but one ask). A run that reached it says so
and exits.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import OmegaConf

from ..config import check_limits
from ..device import check_device
from ..errors import ConfigError, FuseEvoError
from ..recipe import Recipe
from .archive import CONFIG_FILE, DB_FILE, Archive, Trial, default_url, schema_lock
from .pareto import Front
from .config import ModelsConfig, SearchCommand
from .scheduler import Job, Result, Scheduler, WorkerSpec, check_cluster, make_scheduler
from .space import SearchSpace, SpaceError
from .strategies import Candidate, Strategy, StrategyError, StudyMirror, make_strategy

log = logging.getLogger("fuse_evo.search")
trial_log = logging.getLogger("fuse_evo.search.trials")  # per-evaluation lines: the log file only

STRATEGY_FILE = "strategy.pkl"
LOG_FILE = "search.log"
LOCK_FILE = ".lock"
OUR_FILES = (CONFIG_FILE, DB_FILE, STRATEGY_FILE, LOG_FILE)
STAGES_DIR = "stages"  # a hybrid search's first stage runs in RUN_DIR/stages/NAME
CHECKPOINT_FORMAT = 2  # 2: a cache vouched for by the archive (fe_cache); 1 was the checkpoint
# keys that may change between a run and its resume without changing what is searched
RESUME_SAFE = ("run.budget", "strategy.budget", "run.overwrite", "run.progress", "run.id", "run.dir",
               "run.threads", "run.dashboard", "run.trust_checkpoint", "cluster", "strategy.num_workers")


class RunDirError(FuseEvoError):
    """A run directory that holds another experiment, or a checkpoint that cannot continue."""


@dataclass
class SearchResult:
    run_dir: Path
    run_id: str
    evaluations: int
    budget: int
    best: Trial | None
    resumed: bool
    already_done: bool
    front: str | None = None  # runs of several objectives: "front N, hv X"


# ---------------------------------------------------------------------------- config
def command_yaml(cmd: SearchCommand) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cmd), resolve=True)


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


# ---------------------------------------------------------------------------- models
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


def _base_config(base: str) -> dict[str, Any]:
    from ..models import resolve

    folder = resolve("base", base)
    path = folder / "config.json"
    if not path.exists():
        raise FuseEvoError(f"models.base: {folder} has no config.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- run directory
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_run_dir(cmd: SearchCommand) -> tuple[Path, str, bool, dict[str, Any] | None]:
    """(run dir, run id, resumed?, stored config) after refusing a directory that holds
    another experiment (unless run.overwrite) and clearing it when overwriting."""
    run_dir = Path(cmd.run.dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file")
    stored_path = run_dir / CONFIG_FILE
    new = yaml.safe_load(command_yaml(cmd))
    if stored_path.exists():
        try:
            stored = yaml.safe_load(stored_path.read_text())
            if not isinstance(stored, dict):
                raise yaml.YAMLError("not a mapping")
        except yaml.YAMLError as e:
            stored = None
            if not cmd.run.overwrite:
                raise RunDirError(f"run.dir {run_dir}: {CONFIG_FILE} is unreadable ({e}); "
                                  "pass run.overwrite=true to start afresh") from None
        if cmd.run.overwrite:
            _clear(run_dir, stored)
            return run_dir, cmd.run.id or uuid.uuid4().hex[:12], False, None
        diffs = config_differences(stored, new)
        if diffs and not _has_history(run_dir, stored):
            # nothing was ever asked (the first start stopped before its first candidate):
            # there is nothing to keep
            log.info("run.dir %s: the earlier start never asked a candidate; starting afresh", run_dir)
            _clear(run_dir, stored)
            return run_dir, cmd.run.id or uuid.uuid4().hex[:12], False, None
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > 8 else "")
            raise RunDirError(
                f"run.dir {run_dir} holds another experiment ({stored.get('name')!r}); it differs in {shown}. "
                "Resume it with its own config, choose another run.dir, or pass run.overwrite=true to start afresh"
            )
        run_id = (stored.get("run") or {}).get("id")
        if not run_id:
            raise RunDirError(f"run.dir {run_dir}: {CONFIG_FILE} has no run.id; pass run.overwrite=true to start afresh")
        if cmd.run.id and cmd.run.id != run_id:
            raise RunDirError(f"run.id: {cmd.run.id!r}, but {run_dir} holds run {run_id!r}")
        return run_dir, run_id, True, stored
    if run_dir.is_dir():
        ours = [n for n in (DB_FILE, STRATEGY_FILE) if (run_dir / n).exists()]
        others = sorted(p.name for p in run_dir.iterdir()
                        if p.name not in (*OUR_FILES, STAGES_DIR) and not p.name.startswith("."))
        if ours and not cmd.run.overwrite:
            raise RunDirError(f"run.dir {run_dir} holds {ours} but no {CONFIG_FILE}: not a run that can resume; "
                              "pass run.overwrite=true to start afresh")
        if others and not cmd.run.overwrite:
            raise RunDirError(f"run.dir {run_dir} is not empty and holds no search (found {others[:5]}); choose "
                              "another run.dir, or pass run.overwrite=true to write the run beside those files")
        if ours:
            _clear(run_dir, None)
    return run_dir, cmd.run.id or uuid.uuid4().hex[:12], False, None


def _has_history(run_dir: Path, stored: dict[str, Any]) -> bool:
    """Whether the run asked anything yet (True when that cannot be told: never clear a run
    that may hold work)."""
    run = stored.get("run") or {}
    if not run.get("db_url") and not (run_dir / DB_FILE).exists():
        return (run_dir / STRATEGY_FILE).exists()
    try:
        with Archive(run.get("db_url") or default_url(run_dir), run.get("id") or "", create=True) as archive:
            return bool(archive.count() or archive.count_asks())
    except FuseEvoError:
        return True


def _clear(run_dir: Path, stored: dict[str, Any] | None) -> None:
    """Remove a run's files (and its rows in a shared database)."""
    run = (stored or {}).get("run") or {}
    if run.get("db_url") and run.get("id"):
        try:
            with Archive(run["db_url"], run["id"], create=True) as old:
                old.delete_run()
        except FuseEvoError as e:
            log.warning("could not remove run %s from %s: %s", run["id"], run["db_url"], e)
    for name in OUR_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob(f".{STRATEGY_FILE}.tmp"):
        p.unlink()
    log.info("run.overwrite: cleared %s", run_dir)


@contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    """One search per run directory at a time (a requeued job while the old one still runs
    would tell the strategy twice): an exclusive lock on RUN_DIR/.lock, released at exit."""
    import fcntl

    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise RunDirError(f"run.dir {run_dir} is not writable: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise RunDirError(f"run.dir {run_dir} is in use by another fuse-evo search ({f.read().strip() or 'pid ?'})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


class _LogTo:
    """Log (fuse_evo's INFO and the per-trial lines) to RUN_DIR/search.log for the run."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        self.package = logging.getLogger("fuse_evo")

    def __enter__(self) -> "_LogTo":
        self._level = self.package.level
        if self.package.getEffectiveLevel() > logging.INFO:
            self.package.setLevel(logging.INFO)
        self.package.addHandler(self.handler)
        trial_log.propagate = False
        trial_log.setLevel(logging.INFO)
        trial_log.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.package.removeHandler(self.handler)
        trial_log.removeHandler(self.handler)
        self.package.setLevel(self._level)
        self.handler.close()


# ---------------------------------------------------------------------------- the strategy cache
def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def save_cache(run_dir: Path, run_id: str, strategy: Strategy, archive: Archive) -> None:
    """Write ``strategy.pkl`` (the strategy's state after ``n_asked`` asks and ``n_told``
    tells) atomically, then record its checksum in the archive. Raises what pickling raises
    (a backend whose state cannot be pickled: the run then replays the archive on resume)."""
    state = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "saved": time.time(), "asks": strategy.n_asked,
             "tells": strategy.n_told, "strategy": strategy.state_dict()}
    data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    _atomic_write(run_dir / STRATEGY_FILE, data)
    archive.set_cache(_sha256(data), strategy.n_asked, strategy.n_told)


def load_cache(run_dir: Path, run_id: str, strategy: Strategy, archive: Archive, trust: bool = False) -> str | None:
    """Continue ``strategy`` from ``strategy.pkl`` if it is this run's own cache of the
    archive's whole history: its SHA-256 is the one the archive recorded and it holds as many
    asks and tells as the archive. Returns None when loaded, else why not (the caller then
    replays the archive). Nothing is unpickled before the checksum matches; a file another
    user owns is not used unless ``trust`` (``run.trust_checkpoint``)."""
    path = run_dir / STRATEGY_FILE
    if not path.exists():
        return f"no {STRATEGY_FILE}"
    owner = path.stat().st_uid
    if owner != os.getuid() and not trust:
        return (f"{path} belongs to another user (uid {owner}); a pickle runs code when loaded "
                "(run.trust_checkpoint=true uses it)")
    data = path.read_bytes()
    recorded = archive.cache()
    position = (archive.count_asks(), archive.count())
    if recorded is None or recorded[0] != _sha256(data):
        return f"{STRATEGY_FILE} is not the cache the archive recorded (checksum differs: damaged, or not this run's)"
    if tuple(recorded[1:]) != position:
        return f"{STRATEGY_FILE} holds {recorded[1]} asks and {recorded[2]} tells, the archive {position[0]} and {position[1]}"
    if owner != os.getuid():
        log.warning("using %s, a pickle owned by uid %d (run.trust_checkpoint=true)", path, owner)
    try:
        state = pickle.loads(data)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("run_id") != run_id:
            return f"{STRATEGY_FILE} is not a cache of this run in format {CHECKPOINT_FORMAT}"
        strategy.load_state_dict(state["strategy"])
    except Exception as e:  # the archive rebuilds what the cache cannot give
        return f"{STRATEGY_FILE} could not be loaded ({type(e).__name__}: {e})"
    return None


# ---------------------------------------------------------------------------- the loop
class Search:
    """One run: prepared by the constructor (nothing evaluated yet), driven by ``run()``."""

    def __init__(self, cmd: SearchCommand, scheduler_factory=None):
        self.cmd = cmd
        self._scheduler_factory = scheduler_factory or (lambda spec: make_scheduler(spec, self.cmd.cluster))
        check_plan(cmd)
        self._stack = ExitStack()
        try:
            self._stack.enter_context(_lock(Path(cmd.run.dir).expanduser().resolve()))
            self.run_dir, self.run_id, self.resumed, stored = _prepare_run_dir(cmd)
            self._stack.enter_context(_LogTo(self.run_dir / LOG_FILE))
            self._setup(stored)
        except BaseException:
            self._stack.close()
            raise

    def _setup(self, stored: dict[str, Any] | None) -> None:
        cmd = self.cmd
        self.budget = int(cmd.run.budget)
        cluster = cmd.cluster
        if cluster.backend == "ray":  # joined or started now: its resources checked before any model loads
            from .ray_scheduler import prepare_cluster, release_cluster

            self._stack.callback(release_cluster)
            cluster = prepare_cluster(cluster)
        strategy = cmd.strategy
        if strategy.num_workers is None:  # the optimizer plans for as many candidates in flight as workers
            strategy = replace(strategy, num_workers=int(cluster.num_workers))
        run = replace(cmd.run, id=self.run_id)
        self.cmd = cmd = replace(cmd, run=run, strategy=strategy, cluster=cluster)
        self.config_yaml = command_yaml(cmd)
        log.info("%s run %s in %s (%s)", "resuming" if self.resumed else "starting", self.run_id, self.run_dir, cmd.name)

        self.models = resolve_models(cmd.models, progress=cmd.run.progress)
        space_cfg = cmd.space
        if not space_cfg.models:
            space_cfg = replace(space_cfg, models=list(self.models.sources))
        unknown = [m for m in space_cfg.models if m not in self.models.sources]
        if unknown:
            raise ConfigError(f"space.models: {unknown} are not source models (models: {list(self.models.sources)})")
        dataflow = None
        if space_cfg.method == "dataflow":
            self.space, dataflow = self._dataflow_space(space_cfg)
        else:
            self.space = SearchSpace(space_cfg, _base_config(self.models.base))

        from ..evaluate.objectives import Objectives

        self.objectives = Objectives(cmd.evaluator.objectives, prefix="evaluator.objectives")
        n_obj = cmd.strategy.num_objectives
        if n_obj not in (None, 1, len(self.objectives)):
            raise ConfigError(f"strategy.num_objectives: {n_obj}; use 1 (the weighted sum of the objectives), "
                              f"{len(self.objectives)} (each of {self.objectives.names}) or null (each of them)")
        evaluator = cmd.evaluator
        if not evaluator.include_path and self.models.task_dir:
            evaluator = replace(evaluator, include_path=[self.models.task_dir])
        if not evaluator.tasks:
            raise ConfigError("evaluator.tasks: name the lm-eval tasks that score a candidate")
        self.worker_spec = WorkerSpec(
            base=self.models.base, sources={m: self.models.sources[m] for m in space_cfg.models},
            evaluator=evaluator, base_name=space_cfg.base, allow_pickle=cmd.models.allow_pickle,
            trust_remote_code=cmd.models.trust_remote_code, device=cmd.run.device, dtype=cmd.run.dtype,
            threads=cmd.run.threads, dataflow=dataflow,
        )

        strategy_cfg = cmd.strategy
        if strategy_cfg.num_objectives is None:  # null: every objective (kept null in config.yaml)
            strategy_cfg = replace(strategy_cfg, num_objectives=len(self.objectives))
        if self.resumed and stored is not None:  # the optimizer planned for its first budget and workers
            first = stored.get("strategy") or {}
            strategy_cfg = replace(strategy_cfg, budget=int(first.get("budget", strategy_cfg.budget)),
                                   num_workers=int(first.get("num_workers") or strategy_cfg.num_workers))
        reference = [o.default_reference for o in self.objectives]
        self.reference = None if None in reference else self.objectives.losses(
            dict(zip(self.objectives.names, reference)))  # losses; None: some value is taken from the run
        self._strategy_cfg = strategy_cfg
        self.strategy = make_strategy(strategy_cfg, self.space, reference=self.reference)
        self._stack.callback(lambda: self.strategy.close())  # the strategy may be rebuilt below

        url = cmd.run.db_url or default_url(self.run_dir)
        self.archive = Archive(url, self.run_id, create=True)
        self._stack.callback(self.archive.close)
        self.archive.start_run(cmd.name, self.config_yaml, self._info())
        _atomic_write(self.run_dir / CONFIG_FILE, self.config_yaml.encode())

        self._cache_off: str | None = None  # why the strategy cannot be cached (then resume replays)
        self._restore_strategy()

        self.mirror = None
        if cmd.run.dashboard:
            directions = [(o.name, o.direction) for o in self.objectives] if self.strategy.multi_objective else None
            with schema_lock(self.archive.engine):  # Optuna's tables: one creator at a time on a shared database
                self.mirror = StudyMirror(url, f"{cmd.name}-{self.run_id}", self.space, directions)
            added = self.mirror.sync(self.archive.trials())
            if added:
                log.info("dashboard study caught up with %d archived evaluations", added)

    def _dataflow_space(self, space_cfg) -> tuple[Any, dict[str, Any]]:
        """The data-flow space over the laid-out models, and what its workers need to route."""
        from ..merge.dataflow import DataFlowError
        from .dataflow_space import DataFlowSpace, DataFlowSpaceConfig

        cfg = space_cfg.dataflow or DataFlowSpaceConfig()
        merged = None
        if cfg.merged_from:
            merged = self._merged_recipe(cfg.merged_from)
        names = list(cfg.models) or (["merged"] if merged else []) + list(space_cfg.models)
        allowed = {space_cfg.base, *space_cfg.models, *(["merged"] if merged else [])}
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ConfigError(f"space.dataflow.models: {unknown} are not the base, a source model"
                              f"{' or merged' if merged else ''} ({sorted(allowed)})")
        space = DataFlowSpace(replace(cfg, models=names), _base_config(self.models.base))
        try:
            initial = space.decode(space.initial())
        except (SpaceError, DataFlowError) as e:
            raise ConfigError(f"space.dataflow: the starting path is not valid ({e})") from None
        return space, {"io_model": space.io_model, "models": names, "initial": initial.to_dict(), "merged": merged,
                       "merged_from": cfg.merged_from}

    def _merged_recipe(self, run_dir: str) -> dict[str, Any]:
        """The best recipe of a finished parameter-space run over the same models."""
        where = "space.dataflow.merged_from"
        try:
            with Archive.open(Path(run_dir).expanduser()) as archive:
                best, info = archive.best(), archive.info
        except FuseEvoError as e:
            raise ConfigError(f"{where}: {e}") from None
        if best is None or best.recipe.get("method") == "dataflow":
            raise ConfigError(f"{where}: run {run_dir} has no completed parameter-space trial to merge")
        ours = {self.cmd.space.base: self.models.base, **self.models.sources}
        other = {n: p for n, p in info["sources"].items() if ours.get(n) != p}
        if other:
            raise ConfigError(f"{where}: run {run_dir} merged other models ({other}) than this search's {ours}")
        return best.recipe

    def _info(self) -> dict[str, Any]:
        s, m = self.cmd.strategy, self.models
        return {
            "name": self.cmd.name,
            "run_id": self.run_id,
            "base": self.worker_spec.base_name,
            "sources": {self.worker_spec.base_name: m.base, **self.worker_spec.sources},
            "zoo": None if m.zoo_dir is None else {"dir": m.zoo_dir, "manifest": str(Path(m.zoo_dir) / "zoo.json"),
                                                   "task_dir": m.task_dir},
            "method": self.space.method,
            "dataflow": None if self.worker_spec.dataflow is None else {
                k: self.worker_spec.dataflow[k] for k in ("io_model", "models", "initial", "merged_from", "merged")},
            "genes": self.space.names,
            "lower": self.space.lower.tolist(),
            "upper": self.space.upper.tolist(),
            "objectives": [{"name": o.name, "direction": o.direction, "weight": o.weight, "metric":
                            None if o.task is None else f"{o.task}/{o.metric}", "cost": o.cost,
                            "reference": o.reference} for o in self.objectives],
            "scalar": "sum of weight x objective (signed: larger is better)",
            "strategy": self.strategy.name,
            "multi_objective": self.strategy.multi_objective,
            "seed": self.cmd.seed,
            "budget": self.budget,
            "tasks": list(self.worker_spec.evaluator.tasks),
            "include_path": list(self.worker_spec.evaluator.include_path),
        }

    def _restore_strategy(self) -> None:
        """Bring the fresh strategy to the archive's history: from the cache when the archive
        vouches for it, else by replaying every archived ask and tell (a missing, damaged or
        stale ``strategy.pkl`` costs a line in the log and the replay time, nothing else)."""
        asks, trials = self.archive.asks(), self.archive.trials()
        if not asks and not trials:
            self.strategy.replay([], [])  # an RDB-stored Optuna study starts from the archive too
            return
        if trials and not asks:  # an archive of an earlier version: asks rebuilt, one at a time as it ran
            log.warning("the archive records no asks (written by an earlier fuse_evo); rebuilding them from its "
                        "%d trials", len(trials))
            for i, t in enumerate(sorted(trials, key=lambda t: t.candidate_id)):
                self.archive.record_ask(t.candidate_id, t.genome, i)
            asks = self.archive.asks()
        why = load_cache(self.run_dir, self.run_id, self.strategy, self.archive, trust=self.cmd.run.trust_checkpoint)
        if why is None:
            log.info("strategy restored from its cache (%d asks, %d tells)", len(asks), len(trials))
            return
        if (self.run_dir / STRATEGY_FILE).exists():
            log.warning("ignoring %s: %s; rebuilding the strategy from the archive", STRATEGY_FILE, why)
        self.strategy.close()
        self.strategy = make_strategy(self._strategy_cfg, self.space, reference=self.reference)
        started = time.time()
        try:
            diverged = self.strategy.replay([(a.candidate_id, a.genome, a.after_tells) for a in asks],
                                            [(t.candidate_id, t.losses if t.ok else None) for t in trials])
        except StrategyError as e:
            raise RunDirError(f"run.dir {self.run_dir}: the archive's history cannot be replayed ({e}); "
                              "pass run.overwrite=true to start afresh") from None
        log.info("strategy rebuilt from the archive: %d asks, %d tells replayed in %.1f s", len(asks), len(trials),
                 time.time() - started)
        if diverged:
            log.warning("%s proposed other genomes than the archive for %d of %d replayed asks; it continues from "
                        "the archived genomes and results (correct, not identical to an uninterrupted run)",
                        self.strategy.name, diverged, len(asks))
        self._save_cache()

    def _save_cache(self) -> None:
        if self._cache_off:
            return
        try:
            save_cache(self.run_dir, self.run_id, self.strategy, self.archive)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as e:
            self._cache_off = f"{type(e).__name__}: {e}"
            (self.run_dir / STRATEGY_FILE).unlink(missing_ok=True)
            log.info("%s's state cannot be cached (%s); a resume replays the archive instead", self.strategy.name,
                     self._cache_off)

    # ------------------------------------------------------------------ telling
    def _losses(self, objectives: dict[str, float]) -> list[float]:
        if self.strategy.multi_objective:
            return self.objectives.losses(objectives)
        return [-self.objectives.scalar(objectives)]

    def _tell(self, candidate: Candidate, trial: Trial) -> None:
        if trial.ok:
            self.strategy.tell(candidate, trial.losses)
        else:
            self.strategy.tell(candidate, failed=True)
        self._save_cache()

    def _ask(self) -> Candidate:
        """A new candidate, archived before anything else happens to it."""
        told = self.strategy.n_told
        candidate = self.strategy.ask()
        self.archive.record_ask(candidate.id, candidate.genome.tolist(), told)
        self._save_cache()
        return candidate

    def _record(self, candidate: Candidate, recipe: Recipe | None, status: str, *, result: Result | None = None,
                original: Trial | None = None, error: str | None = None) -> Trial:
        """Archive one candidate (one transaction), then tell the strategy and checkpoint."""
        now = time.time()
        trial = Trial(
            number=-1, candidate_id=candidate.id, status=status, genome=candidate.genome.tolist(),
            recipe={} if recipe is None else recipe.to_dict(), recipe_key="" if recipe is None else recipe.key,
            seed=self.cmd.space.seed if recipe is None else recipe.seed, started=now, finished=now, error=error,
        )
        if result is not None:
            trial.metrics, trial.objectives, trial.error = result.metrics, result.objectives, result.error
            trial.worker, trial.started, trial.finished, trial.timings = (result.worker, result.started,
                                                                           result.finished, result.timings)
            trial.attempts = result.attempts
        elif original is not None:
            trial.metrics, trial.objectives, trial.error = original.metrics, original.objectives, original.error
            trial.duplicate_of = original.number
            if original.status == "failed" or (original.status == "duplicate" and not original.ok):
                trial.objectives = {}
        if trial.objectives and status != "failed":
            trial.losses = self._losses(trial.objectives)
            trial.scalar = self.objectives.scalar(trial.objectives)
        self.archive.record(trial)
        self._tell(candidate, trial)
        if self.mirror is not None:
            try:
                self.mirror.add(trial)
            except Exception as e:  # the dashboard is a view: it catches up on resume
                log.warning("dashboard mirror: trial %d not mirrored (%s: %s)", trial.number, type(e).__name__, e)
        self._after(trial)
        return trial

    def _to_front(self, trial: Trial) -> bool:
        """Offer a completed trial to the live front (runs of several objectives)."""
        if self.front is None or trial.status != "complete" or not trial.ok:
            return False
        return self.front.add(self.objectives.losses(trial.objectives))

    def _front_text(self) -> str:
        if self.front is None:
            return ""
        return f"front {len(self.front)}" + (f", hv {self.front.hypervolume:.4g}" if self.reference else "")

    def _after(self, trial: Trial) -> None:
        if trial.ok and (self.best is None or trial.scalar > self.best.scalar):
            self.best = trial
        if trial.status == "failed":
            self.n_failed += 1
        joined = self._to_front(trial)
        trial_log.info("%s%s", _trial_line(trial), f" -> joins the front ({self._front_text()})" if joined else "")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def _log_missing_trials(self) -> None:
        """A kill between an evaluation's commit and its log line leaves search.log short of it:
        write the line from the archive (the archive, not the log, is the truth)."""
        path = self.run_dir / LOG_FILE
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        logged = {int(n) for n in re.findall(r"\btrial (\d+) \(candidate \d+\)", text)}
        missing = [t for t in self.archive.trials() if t.number not in logged]
        for trial in missing:
            trial_log.info("%s (written on resume: the run was killed before its log line)", _trial_line(trial))

    def _postfix(self) -> str:
        best = "-" if self.best is None else f"{self.best.scalar:.4f}"
        return (f"best {best}" + (f", {self._front_text()}" if self.front is not None else "")
                + (f", failed {self.n_failed}" if self.n_failed else ""))

    # ------------------------------------------------------------------ running
    def _decode(self, candidate: Candidate) -> tuple[Recipe | None, str | None]:
        try:
            return self.space.decode(candidate.genome), None
        except (SpaceError, FuseEvoError, ValueError) as e:
            return None, f"{type(e).__name__}: {e}"

    def run(self) -> SearchResult:
        try:
            return self._run()
        except KeyboardInterrupt:
            log.warning("interrupted at %d of %d evaluations; the same command resumes the run",
                        self.archive.count(), self.budget)
            raise
        finally:
            self._stack.close()

    def _run(self) -> SearchResult:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        done = self.archive.count()
        if self.resumed:
            self._log_missing_trials()
        self.best = self.archive.best()
        self.n_failed = self.archive.count("failed")
        self.front = Front(self.reference) if len(self.objectives) > 1 else None
        for trial in self.archive.trials("complete"):
            self._to_front(trial)
        self.bar = None
        if done >= self.budget:
            msg = (f"run {self.run_id} in {self.run_dir} reached its budget: {done} of {self.budget} evaluations "
                   "done; raise run.budget to continue it")
            log.info(msg)
            return self._result(done, already_done=True, message=msg)
        if self.resumed:
            pending = self.strategy.pending()
            log.info("resuming at %d of %d evaluations%s", done, self.budget,
                     f"; re-dispatching {len(pending)} candidate(s) that were in flight" if pending else "")

        scheduler: Scheduler = self._scheduler_factory(self.worker_spec)  # models and tasks checked here
        self._stack.callback(scheduler.close)
        redispatch = sorted(self.strategy.pending(), key=lambda c: c.id)
        in_flight: dict[int, tuple[Candidate, Recipe]] = {}
        held: dict[str, list[Candidate]] = {}  # same recipe as one in flight: told its result
        limit = scheduler.capacity
        if self.strategy.max_in_flight is not None and self.strategy.max_in_flight < limit:
            limit = self.strategy.max_in_flight
            log.warning("%s evaluates %d candidate(s) at a time: %d of %d workers will idle (set "
                        "strategy.num_workers to the workers, or pick another optimizer)", self.strategy.name,
                        limit, scheduler.capacity - limit, scheduler.capacity)
        busy, started = 0.0, time.time()

        def unanswered() -> int:  # asked and not yet told
            return len(in_flight) + sum(len(v) for v in held.values())

        with ExitStack() as ui:
            if self.cmd.run.progress:
                ui.enter_context(logging_redirect_tqdm())
                self.bar = ui.enter_context(tqdm(total=self.budget, initial=done, desc=self.cmd.name, unit="eval",
                                                 dynamic_ncols=True, file=sys.stderr))
                self.bar.set_postfix_str(self._postfix())
            while True:
                done = self.archive.count()
                if done >= self.budget and not unanswered():
                    break
                while scheduler.free() > 0 and unanswered() < limit and done + unanswered() < self.budget:
                    if redispatch:
                        candidate = redispatch.pop(0)
                    else:
                        candidate = self._ask()
                    recipe, error = self._decode(candidate)
                    if recipe is None:
                        self._record(candidate, None, "failed", error=error)
                        done += 1
                        continue
                    original = self.archive.by_recipe(recipe.key)
                    if original is not None:
                        self._record(candidate, recipe, "duplicate", original=original)
                        done += 1
                        continue
                    if any(r.key == recipe.key for _, r in in_flight.values()):
                        held.setdefault(recipe.key, []).append(candidate)
                        continue
                    in_flight[candidate.id] = (candidate, recipe)
                    scheduler.submit(Job(candidate.id, recipe.to_dict(), recipe.key))
                if not in_flight:
                    continue
                for result in scheduler.wait():
                    busy += max(0.0, result.finished - result.started)
                    candidate, recipe = in_flight.pop(result.candidate_id)
                    trial = self._record(candidate, recipe, result.status, result=result)
                    for twin in held.pop(recipe.key, []):
                        self._record(twin, recipe, "duplicate", original=trial)
        wall = time.time() - started
        if busy and wall > 0:
            log.info("workers: %d, busy %.1f%% of %.1f s (idle %.1f%%)", scheduler.capacity,
                     100 * busy / (scheduler.capacity * wall), wall, 100 - 100 * busy / (scheduler.capacity * wall))
        done = self.archive.count()
        log.info("run %s finished its budget: %d evaluations%s%s", self.run_id, done,
                 "" if self.best is None else f"; best trial {self.best.number}, scalar {self.best.scalar:.4f} "
                 f"{json.dumps({k: round(v, 4) for k, v in self.best.objectives.items()})}",
                 f"; {self._front_text()}" if self.front is not None else "")
        return self._result(done, already_done=False)

    def _result(self, done: int, already_done: bool, message: str | None = None) -> SearchResult:
        return SearchResult(self.run_dir, self.run_id, done, self.budget, self.archive.best(), self.resumed, already_done,
                            self._front_text() or None)


def _trial_line(trial: Trial) -> str:
    """The log line of one archived evaluation."""
    t = trial.timings
    return "trial %d (candidate %d) %s%s%s%s" % (
        trial.number, trial.candidate_id, trial.status,
        f" of trial {trial.duplicate_of}" if trial.duplicate_of is not None else "",
        f" scalar {trial.scalar:.4f} {json.dumps({k: round(v, 4) for k, v in trial.objectives.items()})}"
        if trial.scalar is not None else "",
        (f" merge {t.get('merge', 0):.3f}s score {t.get('score', 0):.3f}s" if t else "")
        + (f": {trial.error}" if trial.error else ""),
    )


def check_plan(cmd: SearchCommand) -> None:
    """The values that need no model to be judged, checked before the run directory is made."""
    for key, value in (("run.budget", cmd.run.budget), ("strategy.budget", cmd.strategy.budget),
                       ("run.threads", cmd.run.threads)):
        if value is not None and int(value) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    check_limits(cmd.evaluator)
    check_cluster(cmd.cluster)
    if cmd.cluster.backend == "serial" or not cmd.cluster.address:  # a joined cluster's GPUs are on its nodes
        check_device(cmd.run.device, "run.device")


def run_search(cmd: SearchCommand, scheduler_factory=None) -> SearchResult:
    """Start or resume the search ``cmd`` describes (its first stage first, for a hybrid
    search with ``space.dataflow.merge_stage``); returns when its budget is reached."""
    check_plan(cmd)
    cmd = run_first_stage(cmd, scheduler_factory)
    return Search(cmd, scheduler_factory).run()


def run_first_stage(cmd: SearchCommand, scheduler_factory=None) -> SearchCommand:
    """A hybrid search's parameter-space stage (``space.dataflow.merge_stage``: an experiment)
    run, resumed, or found finished in ``RUN_DIR/stages/NAME`` on the same models, seed and
    cluster; returns ``cmd`` with that directory as ``merged_from``."""
    df = cmd.space.dataflow if cmd.space.method == "dataflow" else None
    if df is None or not df.merge_stage:
        return cmd
    if df.merged_from:
        raise ConfigError("space.dataflow.merge_stage: give it or merged_from (a finished run), not both")
    stage_dir = Path(cmd.run.dir).expanduser().resolve() / STAGES_DIR / df.merge_stage
    try:
        from ..cli import compose

        stage = compose("search", [f"experiment={df.merge_stage}", f"run.dir={stage_dir}", f"seed={cmd.seed}"])
    except Exception as e:  # Hydra's errors name the missing experiment
        raise ConfigError(f"space.dataflow.merge_stage: {df.merge_stage!r}: {e}") from None
    if stage.space.method == "dataflow":
        raise ConfigError(f"space.dataflow.merge_stage: {df.merge_stage!r} is a data-flow experiment; the first "
                          "stage merges parameters")
    stage = replace(stage, models=cmd.models, cluster=cmd.cluster,
                    run=replace(stage.run, progress=cmd.run.progress, overwrite=cmd.run.overwrite,
                                db_url=cmd.run.db_url, dashboard=cmd.run.dashboard))
    log.info("stage 1 of 2: experiment %s in %s", df.merge_stage, stage_dir)
    result = Search(stage, scheduler_factory).run()
    if result.best is None:
        raise FuseEvoError(f"stage 1 ({df.merge_stage}, {stage_dir}): no candidate completed, nothing to merge")
    log.info("stage 2 of 2: data flow over stage 1's best (trial %d, scalar %.4f)", result.best.number,
             result.best.scalar)
    return replace(cmd, space=replace(cmd.space, dataflow=replace(df, merged_from=str(stage_dir))))


def nothing_scored(result: SearchResult) -> str:
    """Why a run has no scored candidate: its failures' most frequent error (the CLI exits non-zero with it)."""
    from collections import Counter

    with Archive.open(result.run_dir) as archive:
        trials = archive.trials()
    errors = Counter((t.error or "").splitlines()[0][:300] for t in trials if t.status == "failed" and t.error)
    common = "".join(f"; most often ({n} of {len(trials)}): {e}" for e, n in errors.most_common(1))
    return (f"run {result.run_id}: none of its {len(trials)} candidates could be scored "
            f"({sum(t.status == 'failed' for t in trials)} failed{common}); see {result.run_dir / LOG_FILE}")


def summary(result: SearchResult) -> str:
    """What the command prints when it ends."""
    lines = []
    if result.already_done:
        lines.append(f"run {result.run_id} already reached its budget ({result.evaluations} of {result.budget} "
                     "evaluations); raise run.budget to continue it")
    else:
        lines.append(f"run {result.run_id}: {result.evaluations} of {result.budget} evaluations"
                     + (" (resumed)" if result.resumed else ""))
    best = result.best
    if best is None:
        lines.append("no candidate scored (see search.log)")
    else:
        objectives = ", ".join(f"{k} {v:.4f}" for k, v in best.objectives.items())
        lines.append(f"best: trial {best.number}, scalar {best.scalar:.4f} ({objectives}); recipe {best.recipe_key}")
    if result.front:
        lines.append(f"pareto: {result.front} (fuse-evo export RUN_DIR --pick pareto writes every member)")
    held = ", ".join(f for f in OUR_FILES if (Path(result.run_dir) / f).exists())
    lines.append(f"run dir: {result.run_dir} ({held})")
    return "\n".join(lines)
