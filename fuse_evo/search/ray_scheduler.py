"""The Ray backend of the scheduler seam: one actor per worker slot, asynchronous dispatch,
restarts and retries. The only module that imports ray.

Each actor builds a ``Worker`` from the run's ``WorkerSpec`` (the source models loaded from
their paths, resident on the actor's device; one live model; one evaluator) and scores jobs
one at a time. Sources reach the actors by path, not through the object store: every actor
loads its own copy of the safetensors files (memory-mapped, from the page cache on a node
once one actor has read them), which costs no driver memory, no object-store copy, and
makes a restarted actor self-sufficient (see README "Distributed").

Dispatch: ``submit`` gives a job to a free slot at once; ``wait`` returns as soon as any job
is done (``ray.wait``), so one slow candidate never idles the others (``async``), or, in
``generational`` mode, when every job in flight is done, in candidate order (a barrier).

Faults: an actor process that dies mid-job (killed, segfault, Ray's OOM killer) is replaced
by a fresh actor (sources reloaded) and the job retried on it, up to ``max_retries`` times per
job; then the job comes back ``failed`` with the cause, and the search goes on. A job killed
for memory is not retried (it would be killed again): it fails alone. Worker restarts are
capped by ``max_restarts`` for the whole run, beyond which the run stops (and resumes later).
An actor killed while it loads the models is restarted the same way; an exception raised by
the load itself (a bad path, models that cannot be merged) fails the run at once with its own
message. No wait is unbounded: every ``_POLL_S`` seconds a wait looks at the cluster, and a
run whose Ray nodes all died, or whose (re)started worker has not loaded within
``cluster.start_timeout_s``, stops with a SchedulerError (everything is archived; the same
command resumes) instead of waiting for an actor that can never be placed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.exceptions import OutOfMemoryError, RayActorError, RayError

from ..errors import FuseEvoError
from ..config import ClusterConfig
from .scheduler import Scheduler, check_cluster
from .worker import Job, Result, Worker, WorkerSpec

log = logging.getLogger(__name__)

# what a local Ray's workers inherit from the search's environment (a joined cluster's
# workers get them through the job's runtime_env)
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
               "TOKENIZERS_PARALLELISM")


class SchedulerError(FuseEvoError):
    """The cluster cannot run the workers asked for, or they keep dying."""


_started: list[bool] = []  # [True] while a Ray this module started is up
_POLL_S = 2.0  # how often a wait looks at the cluster's health
_RESUMES = "Every result so far is archived: the same command resumes the run"


def prepare_cluster(cluster: ClusterConfig) -> ClusterConfig:
    """Connect to Ray (start a local one, join ``cluster.address``, or use the one this
    process already runs), resolve the automatic values (``num_workers`` null: one per GPU,
    or one per ``cpus_per_worker`` CPUs without GPUs; ``gpus_per_worker`` null: 1 if the
    cluster has GPUs, else 0), and check the cluster has the resources asked for: a
    SchedulerError naming the key instead of Ray waiting forever. Returns the resolved config.
    Idempotent; ``release_cluster`` stops a Ray started here."""
    check_cluster(cluster)
    c = cluster
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        runtime_env = {"env_vars": env} if env else None
        if c.address is None:
            num_cpus = c.num_cpus
            if num_cpus is None and c.num_workers is not None:
                num_cpus = c.num_workers * c.cpus_per_worker
            ray.init(address="local", num_cpus=None if num_cpus is None else max(1, math.ceil(num_cpus)),
                     include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=runtime_env)
        else:
            try:
                ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False,
                         runtime_env=runtime_env)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise SchedulerError(f"cluster.address: cannot join the Ray cluster at {c.address!r} ({e})") from None
        _started[:] = [True]
    total = ray.cluster_resources()
    where = f"the Ray cluster at {c.address}" if c.address else "the local Ray"
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    per_gpu = c.gpus_per_worker if c.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    workers = c.num_workers
    if workers is None:
        workers = int(gpus // per_gpu) if per_gpu > 0 else int(cpus // c.cpus_per_worker) if c.cpus_per_worker else 1
        workers = max(1, workers)
    for key, per, resource, have in (("gpus_per_worker", per_gpu, "GPU", gpus),
                                     ("cpus_per_worker", c.cpus_per_worker, "CPU", cpus)):
        need = per * workers
        if need > have + 1e-9:
            hint = "; Ray found no GPU on this machine" if resource == "GPU" and have == 0 and not c.address else ""
            raise SchedulerError(f"cluster.{key}: {workers} workers x {per:g} {resource} need {need:g} "
                                 f"{resource}s, {where} has {have:g}{hint}")
    resolved = replace(c, num_workers=workers, gpus_per_worker=per_gpu)
    if resolved != c:
        log.info("%s: %d workers, %g GPU and %g CPU each", where, workers, per_gpu, c.cpus_per_worker)
    return resolved


def release_cluster() -> None:
    """Stop the Ray that ``prepare_cluster`` started (a Ray started by the caller stays)."""
    if _started and ray.is_initialized():
        ray.shutdown()
    _started.clear()


class _WorkerActor:
    """The actor around a Worker. A Worker that cannot be built (models that cannot be merged,
    unknown tasks) is reported by ``ready()`` instead of raised, so Ray does not count a
    configuration error as a crash."""

    def __init__(self, spec: WorkerSpec, worker_class: type[Worker]):
        self.worker: Worker | None = None
        self.error: str | None = None
        try:
            self.worker = worker_class(spec)
        except Exception as e:  # noqa: BLE001 - reported by ready()
            self.error = f"{type(e).__name__}: {e}"

    def ready(self) -> dict[str, Any]:
        w = self.worker
        return {"pid": os.getpid(), "error": self.error, "name": None if w is None else w.name,
                "build_seconds": None if w is None else w.build_seconds}

    def run(self, job: Job) -> Result:
        if self.worker is None:
            raise FuseEvoError(f"worker not built: {self.error}")
        return self.worker.run(job)


@dataclass
class _Slot:
    index: int
    actor: Any = None
    pid: int | None = None
    name: str = ""
    job: Job | None = None
    ref: Any = None
    attempt: int = 1  # of the job it runs
    ready_ref: Any = None  # the (re)started actor's ready(), until it has answered
    started: float = 0.0  # when the actor was (re)started


class RayScheduler(Scheduler):
    """``num_workers`` Ray actors behind submit / wait / in_flight (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, cluster: ClusterConfig, worker_class: type[Worker] = Worker):
        self._slots: list[_Slot] = []
        try:
            self.cluster = cluster = prepare_cluster(cluster)
            self.capacity = int(cluster.num_workers)
            self.generational = cluster.mode == "generational"
            self.restarts = 0
            self._worker_class = worker_class
            if spec.threads is None and cluster.cpus_per_worker >= 1:
                spec = replace(spec, threads=int(cluster.cpus_per_worker))  # no more torch threads than CPUs
            self._spec = spec
            self._actor_class = ray.remote(_WorkerActor).options(
                num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker, max_restarts=0,
                max_task_retries=0)
            self._slots = [_Slot(i) for i in range(self.capacity)]
            for slot in self._slots:
                self._start(slot)
            self._await_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ actors
    def _start(self, slot: _Slot) -> None:
        slot.actor = self._actor_class.remote(self._spec, self._worker_class)
        slot.pid, slot.name = None, f"ray worker {slot.index}"
        slot.ready_ref, slot.started = slot.actor.ready.remote(), time.time()

    def _await_ready(self) -> None:
        """Every worker built. One killed while it loads (a signal, the OOM killer) is
        restarted within ``cluster.max_restarts``; a load that raised fails the run with its
        own message; dead nodes or ``cluster.start_timeout_s`` stop it (``_check_health``)."""
        while True:
            pending = {s.ready_ref: s for s in self._slots if s.ready_ref is not None}
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_POLL_S)
            for ref in done:
                slot = pending[ref]
                try:
                    self._became_ready(slot)
                except RayActorError as e:
                    cause = _cause(e)
                    self._restart(slot, f"died while loading the models: {cause}")
                    log.warning("worker %d died while loading the models (%s); restarted (%d of at most %d "
                                "restarts)", slot.index, cause, self.restarts, self.cluster.max_restarts)
            self._check_health()

    def _became_ready(self, slot: _Slot) -> None:
        """Read a done ``ready()``: RayActorError if the actor died, FuseEvoError if its load raised."""
        ref, slot.ready_ref = slot.ready_ref, None
        info = ray.get(ref)
        if info["error"]:
            raise FuseEvoError(info["error"])  # the worker's own message (models, tasks), as the serial one
        slot.pid, slot.name = info["pid"], info["name"]
        log.info("worker %d (%s) ready in %.1f s", slot.index, slot.name, info["build_seconds"])

    def _check_health(self) -> None:
        """Stop, rather than wait for ever, when no worker can run: every Ray node dead (the
        raylet exits when one of its agent processes is killed, by hand or by the OS for
        memory), or a worker not started within ``cluster.start_timeout_s``."""
        nodes = ray.nodes()
        alive = sum(bool(n.get("Alive")) for n in nodes)
        where = f"the Ray cluster at {self.cluster.address}" if self.cluster.address else "the local Ray"
        if not alive:
            raise SchedulerError(f"{where} died ({len(nodes)} of {len(nodes)} node(s) dead; a node stops when its "
                                 f"raylet or one of its agent processes is killed, e.g. by the OOM killer), so no "
                                 f"worker can run. {_RESUMES}")
        now = time.time()
        for slot in self._slots:
            if slot.ready_ref is not None and now - slot.started > self.cluster.start_timeout_s:
                raise SchedulerError(f"worker {slot.index} did not start within cluster.start_timeout_s="
                                     f"{self.cluster.start_timeout_s:g} s ({where}: {alive} of {len(nodes)} node(s) "
                                     f"alive, free resources {ray.available_resources()}). {_RESUMES}")

    def _poll_starts(self) -> None:
        """While jobs run: note restarted workers that became ready; check the cluster."""
        for slot in self._slots:
            if slot.ready_ref is not None and ray.wait([slot.ready_ref], timeout=0)[0]:
                try:
                    self._became_ready(slot)
                except RayActorError:
                    pass  # its job's own result reports the death (and restarts it)
        self._check_health()

    def _restart(self, slot: _Slot, why: str) -> None:
        if self.restarts >= self.cluster.max_restarts:
            raise SchedulerError(f"workers died {self.restarts + 1} times (cluster.max_restarts "
                                 f"{self.cluster.max_restarts}); last: worker {slot.index}: {why}. {_RESUMES}")
        self.restarts += 1
        try:
            ray.kill(slot.actor, no_restart=True)
        except RayError:
            pass
        self._start(slot)  # the next job queues behind its constructor

    @property
    def workers(self) -> list[str]:
        return [slot.name for slot in self._slots]

    # ------------------------------------------------------------------ the seam
    def submit(self, job: Job) -> None:
        slot = next((s for s in self._slots if s.job is None), None)
        if slot is None:
            raise RuntimeError("RayScheduler.submit: every worker is busy")
        self._dispatch(slot, job, attempt=1)

    def _dispatch(self, slot: _Slot, job: Job, attempt: int) -> None:
        slot.job, slot.attempt = job, attempt
        slot.ref = slot.actor.run.remote(job)

    def in_flight(self) -> int:
        return sum(s.job is not None for s in self._slots)

    def wait(self) -> list[Result]:
        busy = [s for s in self._slots if s.job is not None]
        if not busy:
            raise RuntimeError("RayScheduler.wait: nothing submitted")
        results: list[Result] = []
        while True:
            busy = [s for s in self._slots if s.job is not None]
            if not busy or (results and not self.generational):
                break
            by_ref = {s.ref: s for s in busy}
            ready, rest = ray.wait(list(by_ref), num_returns=1, timeout=_POLL_S)
            if not ready:
                self._poll_starts()
                continue
            if rest:  # and whatever else is done by now
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                result = self._collect(by_ref[ref])
                if result is not None:
                    results.append(result)
        return sorted(results, key=lambda r: r.candidate_id) if self.generational else results

    def _collect(self, slot: _Slot) -> Result | None:
        """The finished job's result; or, if its worker died, a retry (None) or a failure."""
        job, attempt = slot.job, slot.attempt
        try:
            result = ray.get(slot.ref)
            slot.job = slot.ref = None
            result.attempts = attempt
            return result
        except OutOfMemoryError as e:
            cause, retry = f"killed for memory: {_cause(e)}", False
        except RayActorError as e:
            cause = _cause(e)
            retry = attempt <= self.cluster.max_retries
        except RayError as e:  # the task failed in Ray itself, not in the worker's code
            slot.job = slot.ref = None
            return Result(job.candidate_id, "failed", error=f"{type(e).__name__}: {_cause(e)}", worker=slot.name,
                          attempts=attempt)
        died = slot.name
        slot.job = slot.ref = None
        self._restart(slot, cause)
        if retry:
            log.warning("worker %d (%s) died running candidate %d (%s); restarted, retrying the candidate "
                        "(attempt %d of %d)", slot.index, died, job.candidate_id, cause, attempt + 1,
                        self.cluster.max_retries + 1)
            self._dispatch(slot, job, attempt + 1)
            return None
        log.warning("worker %d (%s) died running candidate %d (%s); restarted; the candidate failed after %d "
                    "attempt(s)", slot.index, died, job.candidate_id, cause, attempt)
        now = time.time()
        return Result(job.candidate_id, "failed", worker=died, started=now, finished=now, attempts=attempt,
                      error=f"worker died {attempt} time(s) running this candidate; last: {cause}")

    def close(self) -> None:
        for slot in self._slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except RayError:
                    pass
        self._slots = []
        release_cluster()


def _cause(error: BaseException) -> str:
    """The first informative line of a Ray error (they run to a screen of text)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if "exit detail" in ln.lower() or "killed" in ln.lower():
            return ln[:300]
    return (lines[0] if lines else type(error).__name__)[:300]
