"""The scheduler seam: jobs (a candidate's recipe) go to workers, results come back.

A ``Worker`` is what one device runs for the whole search: the source tensors resident in a
MergeEngine, one live model merged into in place, and an Evaluator whose lm-eval requests
were built once. ``Worker.run(job)`` never raises for a bad candidate: an exception in the
merge or the evaluation, or a non-finite objective, comes back as a ``failed`` result with
the error text.

A ``Scheduler`` hands jobs to workers: ``submit(job)`` while ``free()``, then ``wait()`` for
the results that are done. ``SerialScheduler`` runs one in-process worker;
``ray_scheduler.RayScheduler`` (one actor per worker slot, asynchronous dispatch, restarts)
plugs in behind the same three calls, building its actors from the same plain, picklable
``WorkerSpec``. ``make_scheduler`` picks one from the ``cluster`` config.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import EvaluatorConfig
from ..errors import ConfigError, FuseEvoError

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker builds itself from: plain data, so a remote actor can get it."""

    base: str
    sources: dict[str, str]
    evaluator: EvaluatorConfig
    base_name: str = "base"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    # data-flow searches: {"io_model", "models" (names laid out), "initial" (a LayerPath dict),
    # "merged" (a Recipe dict materialized as the model "merged", or None)}
    dataflow: dict[str, Any] | None = None


@dataclass
class Job:
    """One candidate to score: its strategy id and its recipe (``Recipe.to_dict()``)."""

    candidate_id: int
    recipe: dict[str, Any]
    key: str


@dataclass
class Result:
    """A scored (``complete``) or ``failed`` job. ``objectives``: objective name -> value in
    its own units; ``metrics``: every numeric metric (``task/metric,filter``)."""

    candidate_id: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    objectives: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: str = ""
    started: float = 0.0
    finished: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 1  # > 1: its worker died and it was retried on a restarted one


class Worker:
    """Engine, live model and evaluator for one device; ``run(job)`` scores one recipe.

    Building it loads the models (refusing models that cannot be merged, naming them),
    builds the evaluator (refusing unknown tasks) and checks that every objective names an
    evaluated task and metric: all before the first evaluation.
    """

    def __init__(self, spec: WorkerSpec):
        import torch

        from ..device import check_device
        from ..evaluate.evaluator import Evaluator
        from ..evaluate.objectives import Objectives
        from ..merge.engine import MergeEngine
        from ..models import ModelPool

        check_device(spec.device, "run.device")  # on this worker's node, before its models load
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        if spec.dtype is not None and spec.dtype not in _DTYPES:
            raise FuseEvoError(f"run.dtype: {spec.dtype!r} is not one of {', '.join(_DTYPES)}")
        t0 = time.perf_counter()
        self.spec = spec
        self.objectives = Objectives(spec.evaluator.objectives, prefix="evaluator.objectives")
        self.pool = ModelPool(spec.base, spec.sources, allow_pickle=spec.allow_pickle,
                              trust_remote_code=spec.trust_remote_code, base_name=spec.base_name)
        self.engine = MergeEngine(self.pool, device=spec.device)
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        self.model = self.pool.new_model(dtype=dtype, device=self.engine.device)
        tokenizer = self.pool.tokenizer()
        if tokenizer is None:
            raise FuseEvoError(f"models.base: {spec.base} has no tokenizer; the evaluator needs one")
        self.router = None
        if spec.dataflow is not None:
            from ..merge.dataflow import build_router

            self.router = build_router(self.pool, self.engine, self.model, spec.dataflow, dtype)
        live = self.model if self.router is None else self.router.model
        self.evaluator = Evaluator.from_config(live, tokenizer, spec.evaluator)
        self.objectives.check_tasks(self.evaluator.metric_names())
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.engine.device}"
        self.build_seconds = time.perf_counter() - t0
        log.info("worker %s ready in %.1f s (%d source models, %d tasks)", self.name, self.build_seconds,
                 len(spec.sources), len(self.evaluator.task_names))

    def run(self, job: Job) -> Result:
        import torch

        from ..evaluate.objectives import measure_costs
        from ..recipe import Recipe

        started = time.time()
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        result = Result(job.candidate_id, "failed", worker=self.name, started=started)
        try:
            path = None
            if job.recipe.get("method") == "dataflow":
                from ..merge.dataflow import LayerPath

                if self.router is None:
                    raise FuseEvoError("a data-flow candidate reached a parameter-space worker")
                path = LayerPath.from_dict(job.recipe)
                model = self.router.route(path)
            else:
                self.engine.materialize(Recipe.from_dict(job.recipe), into=self.model)
                model = self.model
            timings["merge"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            scores = self.evaluator.score()
            timings["score"] = time.perf_counter() - t1
            timings.update({f"score.{k}": v for k, v in scores.timings.items()})
            result.metrics = scores.flat()
            costs = None
            if any(o.cost for o in self.objectives):
                costs = measure_costs(model, scores)
                if path is not None:  # what the exported plain model holds: a copy of each step's layer
                    from ..merge.dataflow import plain_parameter_count

                    costs["params"] = float(plain_parameter_count(path, self.router.models))
            result.objectives = self.objectives.values(scores, costs)
            bad = [f"{n} = {v}" for n, v in result.objectives.items() if not math.isfinite(v)]
            if bad:
                result.error = f"non-finite objective: {', '.join(bad)}"
            else:
                result.status = "complete"
        except Exception as e:  # a bad candidate fails alone; the search goes on
            result.error = f"{type(e).__name__}: {e}".strip()
            if isinstance(e, torch.OutOfMemoryError):  # the next candidate gets the memory back
                torch.cuda.empty_cache()
            log.debug("candidate %d failed:\n%s", job.candidate_id, traceback.format_exc())
        timings["total"] = time.perf_counter() - t0
        result.timings = timings
        result.finished = time.time()
        return result


class Scheduler(ABC):
    """Where jobs run. ``capacity``: jobs in flight at once (the strategy plans for them)."""

    capacity: int = 1

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start (or queue) a job; only while ``free() > 0``."""

    @abstractmethod
    def wait(self) -> list[Result]:
        """Block until at least one submitted job is done; return every finished one."""

    @abstractmethod
    def in_flight(self) -> int:
        """Jobs submitted and not yet returned by ``wait``."""

    def free(self) -> int:
        return self.capacity - self.in_flight()

    def close(self) -> None:
        """Release workers."""

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialScheduler(Scheduler):
    """One in-process worker; a job runs when ``wait`` is called."""

    capacity = 1

    def __init__(self, spec: WorkerSpec, worker_class: type[Worker] = Worker):
        self.worker = worker_class(spec)
        self._queue: deque[Job] = deque()

    @property
    def workers(self) -> list[str]:
        return [self.worker.name]

    def submit(self, job: Job) -> None:
        if self.free() <= 0:
            raise RuntimeError("SerialScheduler.submit: a job is already waiting")
        self._queue.append(job)

    def wait(self) -> list[Result]:
        if not self._queue:
            raise RuntimeError("SerialScheduler.wait: nothing submitted")
        return [self.worker.run(self._queue.popleft())]

    def in_flight(self) -> int:
        return len(self._queue)


MODES = ("async", "generational")


def check_cluster(cluster: Any) -> None:
    """A ``cluster`` config (``search.config.ClusterConfig``) that makes sense, or a
    ConfigError naming the key: checked before any model is loaded or Ray started."""
    if cluster.backend not in ("serial", "ray"):
        raise ConfigError(f"cluster.backend: {cluster.backend!r} is not one of serial, ray")
    if cluster.mode not in MODES:
        raise ConfigError(f"cluster.mode: {cluster.mode!r} is not one of {', '.join(MODES)}")
    for key, least in (("num_workers", 1), ("cpus_per_worker", 0), ("gpus_per_worker", 0), ("max_retries", 0),
                       ("max_restarts", 0)):
        value = getattr(cluster, key)
        automatic = value is None and key in ("num_workers", "gpus_per_worker") and cluster.backend == "ray"
        if not automatic and (value is None or value < least):
            raise ConfigError(f"cluster.{key}: must be at least {least}, got {value}")
    if not cluster.start_timeout_s or cluster.start_timeout_s <= 0:
        raise ConfigError(f"cluster.start_timeout_s: must be > 0 seconds, got {cluster.start_timeout_s}")
    if cluster.backend == "serial" and cluster.num_workers != 1:
        raise ConfigError(f"cluster.num_workers: the serial backend runs 1 worker, got {cluster.num_workers}; "
                          "use cluster=ray for more")
    if cluster.num_cpus is not None and cluster.address is not None:
        raise ConfigError("cluster.num_cpus: only for a local Ray (no cluster.address); a joined cluster has its own")


def make_scheduler(spec: WorkerSpec, cluster: Any) -> Scheduler:
    """The scheduler a ``cluster`` config names (checked by ``check_cluster``)."""
    check_cluster(cluster)
    if cluster.backend == "ray":
        from .ray_scheduler import RayScheduler

        return RayScheduler(spec, cluster)
    return SerialScheduler(spec)
