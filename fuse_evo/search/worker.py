"""The worker: what one device runs for the whole search.

A ``Worker`` holds a LiveMerge (the source tensors resident in a MergeEngine, one live model
merged into in place, a router for data-flow runs) and an Evaluator whose lm-eval requests
were built once on that live model (``evaluator.backend=vllm``: on a vLLM engine started once,
into which each merged candidate is written in place). ``Worker.run(job)`` never raises for a bad candidate: an
exception in the merge or the evaluation, or a non-finite objective, comes back as a
``failed`` result with the error text. It is built from a ``WorkerSpec``: plain, picklable
data, so a Ray actor on another node builds the same worker.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..config import EvaluatorConfig
from ..errors import FuseEvoError
from ..recipe import Candidate, LayerPath

log = logging.getLogger(__name__)


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
    placement: str | None = None  # the memory plan's choice (None: the sources on ``device``)
    # data-flow searches: {"io_model", "models" (names laid out), "initial" (a LayerPath dict),
    # "merged" (a Recipe dict materialized as the model "merged", or None)}
    dataflow: dict[str, Any] | None = None


@dataclass
class Job:
    """One candidate to score: its strategy id and the candidate (a Recipe or a LayerPath:
    plain, picklable data)."""

    candidate_id: int
    candidate: Candidate
    # evaluator.fidelity=race: what the candidate races against, each {"objectives": values,
    # "outcomes": per-document outcomes on the whole search split}; "scalar": the incumbent
    # (the weighted sum decides), "front": the front's members (beaten on every objective)
    references: list[dict[str, Any]] = field(default_factory=list)
    race_mode: str = "scalar"

    @property
    def key(self) -> str:
        return self.candidate.key


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
    outcomes: dict[str, Any] | None = None  # per-document outcomes (evaluate/outcomes.py)
    fidelity: float = 1.0  # the fraction of the search split's documents scored (racing stops early)
    documents: int = 0  # documents scored


class Worker:
    """Engine, live model and evaluator for one device; ``run(job)`` scores one recipe.

    Building it loads the models (refusing models that cannot be merged, naming them),
    builds the evaluator (refusing unknown tasks) and checks that every objective names an
    evaluated task and metric: all before the first evaluation.
    """

    def __init__(self, spec: WorkerSpec):
        # torch, lm-eval and the models are imported where a worker is built (a Ray driver
        # never builds one)
        import torch

        from ..device import check_device
        from ..evaluate.evaluator import Evaluator
        from ..evaluate.objectives import Objectives
        from ..merge.live import LiveMerge, torch_dtype
        from ..models import ModelPool

        check_device(spec.device, "run.device")  # on this worker's node, before its models load
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        torch_dtype(spec.dtype, "run.dtype")
        t0 = time.perf_counter()
        self.spec = spec
        self.objectives = Objectives(spec.evaluator.objectives, prefix="evaluator.objectives")
        pool = ModelPool(spec.base, spec.sources, allow_pickle=spec.allow_pickle,
                         trust_remote_code=spec.trust_remote_code, base_name=spec.base_name)
        self.merge = LiveMerge(pool, device=spec.device, dtype=spec.dtype, dataflow=spec.dataflow, route_only=True,
                               placement=spec.placement)
        if self.merge.tokenizer is None:
            raise FuseEvoError(f"models.base: {spec.base} has no tokenizer; the evaluator needs one")
        self.vllm = None  # evaluator.backend=vllm: each candidate is written from the live model into this engine
        if spec.evaluator.backend == "vllm":
            from ..evaluate.vllm_lm import VLLMEngine

            self.vllm = VLLMEngine.from_config(pool.base.path, spec.evaluator.vllm, dtype=spec.dtype,
                                               device=str(self.merge.device))
        self.evaluator = Evaluator.from_config(self.vllm or self.merge.live, self.merge.tokenizer, spec.evaluator)
        self.objectives.check_tasks(self.evaluator.metric_names())
        self.stages: list[dict[str, list[int]]] | None = None  # evaluator.fidelity=race: the documents each stage adds
        if spec.evaluator.fidelity == "race":
            from statistics import NormalDist

            from ..evaluate.outcomes import race_stages

            averaged = self.evaluator.averaged_metrics()
            for o in self.objectives:
                if o.task is not None and o.metric not in averaged.get(o.task, []):
                    raise FuseEvoError(f"evaluator.fidelity=race: objective {o.name!r} ({o.key}) has no per-document "
                                       "values (lm-eval does not average it over documents): racing needs them")
            self.stages = race_stages(self.evaluator.n_docs, spec.evaluator.race.stages, spec.evaluator.race.seed)
            self.z = NormalDist().inv_cdf(float(spec.evaluator.race.confidence))
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.merge.device}"
        self.build_seconds = time.perf_counter() - t0
        log.info("worker %s ready in %.1f s (%d source models, %d tasks)", self.name, self.build_seconds,
                 len(spec.sources), len(self.evaluator.task_names))

    def run(self, job: Job) -> Result:
        import torch

        from ..evaluate.objectives import measure_costs
        from ..evaluate.outcomes import outcomes_of
        from ..merge.dataflow import plain_parameter_count

        started = time.time()
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        result = Result(job.candidate_id, "failed", worker=self.name, started=started)
        try:
            model = self.merge.load(job.candidate)
            timings["merge"] = time.perf_counter() - t0
            if self.vllm is not None:
                timings["weights"] = self.vllm.write_model(model)
            t1 = time.perf_counter()

            def costs_of(scores):
                if not any(o.cost for o in self.objectives):
                    return None
                costs = measure_costs(model, scores)
                if isinstance(job.candidate, LayerPath):  # what the exported plain model holds: a copy of each step's layer
                    costs["params"] = float(plain_parameter_count(job.candidate, self.merge.router.models))
                return costs

            scores, costs, beaten_by = self._score(job, costs_of)
            timings["score"] = time.perf_counter() - t1
            timings.update({f"score.{k}": v for k, v in scores.timings.items()})
            result.metrics = scores.flat()
            result.outcomes = outcomes_of(scores)
            result.documents = sum(len(ids) for ids in scores.docs.values())
            result.fidelity = result.documents / max(sum(self.evaluator.n_docs.values()), 1)
            result.objectives = self.objectives.values(scores, costs)
            if beaten_by is not None:  # stopped early: the full split's estimate, paired with what beat it
                result.objectives.update(self._paired_estimate(result.outcomes, beaten_by))
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

    # ---------------------------------------------------------------- racing
    def _score(self, job: Job, costs_of) -> tuple[Any, dict[str, float] | None, dict[str, Any] | None]:
        """(scores, costs, the reference that beat it or None): every document, or racing's
        stages until a bound says the candidate cannot win (``evaluator.fidelity=race``)."""
        from ..evaluate.evaluator import combine_scores

        if self.stages is None:
            scores = self.evaluator.score()
            return scores, costs_of(scores), None
        parts = []
        for k, stage in enumerate(self.stages):
            parts.append(self.evaluator.score(stage))
            scores = combine_scores(parts)
            costs = costs_of(scores)
            if k < len(self.stages) - 1 and job.references:
                beaten_by = self._beaten_by(scores, costs, job)
                if beaten_by is not None:
                    return scores, costs, beaten_by
        return scores, costs, None

    def _beaten_by(self, scores, costs, job: Job) -> dict[str, Any] | None:
        """The first reference the candidate cannot beat with confidence, or None. ``scalar``:
        the upper bound of (candidate - incumbent)'s weighted sum is below 0; ``front``: a
        member is better on every objective (each upper bound below 0)."""
        from ..evaluate.outcomes import aligned, race_upper_bound

        mine = {"docs": scores.docs, "values": scores.outcomes}
        n_docs = self.evaluator.n_docs
        for ref in job.references:
            pairs, totals, signs, exact = {}, {}, {}, {}
            for o in self.objectives:
                if o.cost is not None:
                    exact[o.name] = o.sign * (float(costs[o.cost]) - float(ref["objectives"][o.name]))
                else:
                    pairs[o.name] = aligned(mine, ref["outcomes"], o.task, o.metric)
                    totals[o.name], signs[o.name] = n_docs[o.task], o.sign
            if job.race_mode == "front":
                uppers = [race_upper_bound({n: p}, totals, signs, self.z)[1] for n, p in pairs.items()]
                if all(u < 0 for u in uppers + list(exact.values())):
                    return ref
            else:
                weights = {o.name: o.weight * o.sign for o in self.objectives if o.cost is None}
                _, upper = race_upper_bound(pairs, totals, weights, self.z) if pairs else (0.0, 0.0)
                upper += sum(o.weight * exact[o.name] for o in self.objectives if o.cost is not None)
                if upper < 0:
                    return ref
        return None

    def _paired_estimate(self, outcomes: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
        """Each metric objective on the whole split, estimated from the documents scored: the
        reference's value plus the mean paired difference (the candidate's own mean on a
        subset would not be comparable with full-split values)."""
        from ..evaluate.outcomes import aligned

        out = {}
        for o in self.objectives:
            if o.cost is None:
                a, b = aligned(outcomes, ref["outcomes"], o.task, o.metric)
                out[o.name] = float(ref["objectives"][o.name]) + float((a - b).mean())
        return out
