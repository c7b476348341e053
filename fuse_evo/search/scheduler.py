"""The scheduler seam: jobs (a candidate) go to workers (``worker.py``), results come back.

A ``Scheduler`` hands jobs to workers: ``submit(job)`` while ``free()``, then ``wait()`` for
the results that are done. ``SerialScheduler`` runs one in-process worker;
``ray_scheduler.RayScheduler`` (one actor per worker slot, asynchronous dispatch, restarts)
plugs in behind the same three calls, building its actors from the same plain, picklable
``WorkerSpec``; ``run.make_scheduler`` picks one from the ``cluster`` config, which
``check_cluster`` judges before anything starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from ..config import PLACEMENTS
from ..errors import ConfigError
from .worker import Job, Result, Worker, WorkerSpec


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
    """A ``cluster`` config (``fuse_evo.config.ClusterConfig``) that makes sense, or a
    ConfigError naming the key: checked before any model is loaded or Ray started."""
    if cluster.backend not in ("serial", "ray"):
        raise ConfigError(f"cluster.backend: {cluster.backend!r} is not one of serial, ray")
    if cluster.mode not in MODES:
        raise ConfigError(f"cluster.mode: {cluster.mode!r} is not one of {', '.join(MODES)}")
    if cluster.placement not in ("auto", *PLACEMENTS):
        raise ConfigError(f"cluster.placement: {cluster.placement!r} is not one of auto, {', '.join(PLACEMENTS)}")
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
