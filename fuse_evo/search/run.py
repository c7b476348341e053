"""``fuse-evo search``: the search loop, with checkpoints and resume.

plan (``plan.py``: the config judged and resolved once) -> ask -> decode -> (a recipe scored
before: tell its result) -> materialize + evaluate on a worker (``worker.py``, through a
scheduler) -> objectives -> archive commit -> tell -> strategy cache written atomically.

The run directory ``run.dir`` (``rundir.py``) holds

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
import pickle
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import GeneConfig, SearchCommand, compose
from ..errors import ConfigError, FuseEvoError
from ..files import atomic_write
from ..recipe import DATAFLOW, Candidate
from ..registry import spec
from .archive import CONFIG_FILE, Archive, Trial, default_url, schema_lock
from .mirror import StudyMirror
from .pareto import Front
from .plan import check_plan, command_yaml, make_plan
from .rundir import (LOG_FILE, OUR_FILES, SCAN_STAGE, STAGES_DIR, STRATEGY_FILE, LogTo, RunDirError, load_cache,
                     lock, prepare_run_dir, save_cache, trial_log)
from .scheduler import Scheduler, SerialScheduler
from .space import SpaceError
from .strategies import Proposal, StrategyError, make_strategy
from .worker import Job, Result, WorkerSpec

log = logging.getLogger("fuse_evo.search")


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



class Search:
    """One run: prepared by the constructor (nothing evaluated yet), driven by ``run()``."""

    def __init__(self, cmd: SearchCommand, scheduler_factory=None):
        check_plan(cmd)
        self._stack = ExitStack()
        try:
            self._stack.enter_context(lock(Path(cmd.run.dir).expanduser().resolve()))
            self.run_dir, self.run_id, self.resumed, stored = prepare_run_dir(cmd)
            self._stack.enter_context(LogTo(self.run_dir / LOG_FILE))
            cluster = cmd.cluster
            if cluster.backend == "ray":  # joined or started now: its resources checked before any model loads
                from .ray_scheduler import prepare_cluster, release_cluster

                self._stack.callback(release_cluster)
                cluster = prepare_cluster(cluster)
            log.info("%s run %s in %s (%s)", "resuming" if self.resumed else "starting", self.run_id, self.run_dir,
                     cmd.name)
            self.plan = make_plan(cmd, self.run_id, cluster, stored)
            if self.plan.memory is not None:
                log.info("%s", self.plan.memory.text())
            self._scheduler_factory = scheduler_factory or (lambda spec: make_scheduler(spec, self.plan.cmd.cluster))
            self._open()
        except BaseException:
            self._stack.close()
            raise

    # the plan's parts, as the loop reads them
    cmd = property(lambda self: self.plan.cmd)
    space = property(lambda self: self.plan.space)
    objectives = property(lambda self: self.plan.objectives)
    worker_spec = property(lambda self: self.plan.worker)
    budget = property(lambda self: self.plan.budget)
    reference = property(lambda self: self.plan.reference)
    models = property(lambda self: self.plan.models)

    def _open(self) -> None:
        """The strategy, the archive (the run recorded, config.yaml written), the strategy
        brought to the archive's history, and the dashboard mirror."""
        cmd = self.cmd
        config_yaml = command_yaml(cmd)
        self.strategy = make_strategy(self.plan.strategy, self.space, reference=self.reference)
        self._stack.callback(lambda: self.strategy.close())  # the strategy may be rebuilt below

        url = cmd.run.db_url or default_url(self.run_dir)
        self.archive = Archive(url, self.run_id, create=True)
        self._stack.callback(self.archive.close)
        self.archive.start_run(cmd.name, config_yaml, self._info())
        atomic_write(self.run_dir / CONFIG_FILE, config_yaml.encode())

        self._cache_off: str | None = None  # why the strategy cannot be cached (then resume replays)
        self._restore_strategy()

        self.mirror = None
        self._outcomes: dict[int, Any] = {}  # trial number -> per-document outcomes, for racing's references
        self._race_refs: tuple[list[dict[str, Any]], str] | None = None  # racing's references until the next record
        if cmd.run.dashboard:
            directions = [(o.name, o.direction) for o in self.objectives] if self.strategy.multi_objective else None
            with schema_lock(self.archive.engine):  # Optuna's tables: one creator at a time on a shared database
                self.mirror = StudyMirror(url, f"{cmd.name}-{self.run_id}", self.space, directions)
            added = self.mirror.sync(self.archive.trials())
            if added:
                log.info("dashboard study caught up with %d archived evaluations", added)

    def _info(self) -> dict[str, Any]:
        m = self.models
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
        self.strategy = make_strategy(self.plan.strategy, self.space, reference=self.reference)
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

    def _tell(self, candidate: Proposal, trial: Trial) -> None:
        if trial.ok:
            self.strategy.tell(candidate, trial.losses)
        else:
            self.strategy.tell(candidate, failed=True)
        self._save_cache()

    def _ask(self) -> Proposal:
        """A new candidate, archived before anything else happens to it."""
        told = self.strategy.n_told
        candidate = self.strategy.ask()
        self.archive.record_ask(candidate.id, candidate.genome.tolist(), told)
        self._save_cache()
        return candidate

    def _record(self, candidate: Proposal, recipe: Candidate | None, status: str, *, result: Result | None = None,
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
            trial.attempts, trial.fidelity, trial.documents = result.attempts, result.fidelity, result.documents
        elif original is not None:
            trial.metrics, trial.objectives, trial.error = original.metrics, original.objectives, original.error
            trial.duplicate_of, trial.fidelity, trial.documents = original.number, original.fidelity, 0
            if original.status == "failed" or (original.status == "duplicate" and not original.ok):
                trial.objectives = {}
        if trial.objectives and status != "failed":
            trial.losses = self._losses(trial.objectives)
            trial.scalar = self.objectives.scalar(trial.objectives)
        self.archive.record(trial, outcomes=result.outcomes if result is not None else None)
        self._race_refs = None  # the incumbent or front may have changed
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
    def _decode(self, candidate: Proposal) -> tuple[Candidate | None, str | None]:
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
        in_flight: dict[int, tuple[Proposal, Candidate]] = {}
        held: dict[str, list[Proposal]] = {}  # same recipe as one in flight: told its result
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
                    scheduler.submit(Job(candidate.id, recipe, *self._race_references()))
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

    def _race_references(self) -> tuple[list[dict[str, Any]], str]:
        """What the next candidate races against (``evaluator.fidelity=race``): the best trial
        scored on the whole split (one scalar), or the front's members scored on the whole
        split (a multi-objective strategy); with their per-document outcomes, from the archive."""
        if self.cmd.evaluator.fidelity != "race":
            return [], "scalar"
        if self._race_refs is not None:  # nothing recorded since: the same references, no archive read
            return self._race_refs
        mode = "front" if self.strategy.multi_objective else "scalar"
        if mode == "front":
            members = [t for t in self.archive.pareto_front() if t.fidelity == 1.0]
        else:
            full = [t for t in self.archive.trials("complete") if t.fidelity == 1.0 and t.scalar is not None]
            members = [max(full, key=lambda t: (t.scalar, -t.number))] if full else []
        refs = []
        for t in members:
            if t.number not in self._outcomes:
                self._outcomes[t.number] = self.archive.outcomes(t.number)
            if self._outcomes[t.number] is not None:
                refs.append({"objectives": t.objectives, "outcomes": self._outcomes[t.number]})
        self._race_refs = (refs, mode)
        return self._race_refs

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
        + (f" (raced out after {trial.documents} documents: an estimate)" if trial.fidelity < 1 else "")
        if trial.scalar is not None else "",
        (f" merge {t.get('merge', 0):.3f}s score {t.get('score', 0):.3f}s" if t else "")
        + (f": {trial.error}" if trial.error else ""),
    )


def run_search(cmd: SearchCommand, scheduler_factory=None) -> SearchResult:
    """Start or resume the search ``cmd`` describes (its first stage first, for a hybrid
    search with ``space.dataflow.merge_stage``); returns when its budget is reached."""
    check_plan(cmd)
    cmd = run_first_stage(cmd, scheduler_factory)
    cmd = run_scan_stage(cmd, scheduler_factory)
    return Search(cmd, scheduler_factory).run()


LAMBDA_SCAN = (0.0, 2.0)  # a normalizing method's global scale, scanned here when lambda is no gene


def scan_plan(cmd: SearchCommand) -> tuple[str, int]:
    """What a search's global-scale scan varies and at how many points (``("", 0)``: no scan).

    A space scans when its weight gene is per layer (scope ``group_model`` or ``group``) with
    its start left open: ``space.scan`` points, at most a tenth of the budget, and 3 or more.
    The scale is every weight at one value (``weight``) or, for a method that normalizes by
    the weights' sum (where a common weight cancels out), its ``lambda``; a method with
    neither (a plain weighted average) has no global scale to scan."""
    space = cmd.space
    gene = space.genes.get("weight") if space.method != DATAFLOW else None
    if gene is None or gene.init is not None or (gene.scope or "group_model") not in ("group_model", "group"):
        return "", 0
    method = spec(space.method)
    if method.resolved(space.fixed).get("normalize"):
        lam = space.genes.get("lambda")
        if "lambda" not in method.global_params or (lam is not None and lam.init is not None):
            return "", 0
        param = "lambda"
    else:
        param = "weight"
    points = min(int(space.scan), int(cmd.run.budget) // 10)
    return (param, points) if points >= 3 else ("", 0)


def run_scan_stage(cmd: SearchCommand, scheduler_factory=None) -> SearchCommand:
    """The global-scale scan of a per-layer search (``scan_plan``): one scale on an even grid
    over its bounds (the weight gene's, or lambda's), every other gene at its start, scored
    into ``RUN_DIR/stages/scan`` (resumed or found finished when the command runs again).
    Returns ``cmd`` starting from the best scale (its first candidate, as
    ``strategy.initial=uniform`` asks the start first) with the scan's evaluations taken from
    its budget, so a search never ends below the uniform merge it could have found, and costs
    what it says."""
    param, points = scan_plan(cmd)
    if not points:
        return cmd
    stage_dir = Path(cmd.run.dir).expanduser().resolve() / STAGES_DIR / SCAN_STAGE
    if (stage_dir / CONFIG_FILE).exists() and not cmd.run.overwrite:  # a resume (maybe to another budget): its scan
        try:
            points = int(yaml.safe_load((stage_dir / CONFIG_FILE).read_text())["run"]["budget"])
        except (yaml.YAMLError, KeyError, TypeError, ValueError):
            pass  # unreadable: the stage's own start refuses it, naming the file
    space = cmd.space
    genes = dict(space.genes)
    fixed = {**space.fixed, **{p: g.init for p, g in genes.items() if p != param and g.init is not None}}
    if param == "weight":
        scanned = replace(genes["weight"], scope="global")
    else:  # normalized: any common weight is the same merge
        fixed["weight"] = 1.0
        lam = genes.get("lambda")
        scanned = GeneConfig(*LAMBDA_SCAN) if lam is None else replace(lam, scope="global")
    stage = replace(
        cmd, name=f"{cmd.name}_scan",
        space=replace(space, genes={param: scanned}, fixed=fixed, scan=0),
        strategy=replace(cmd.strategy, backend="grid", optimizer=None, budget=points, num_objectives=1,
                         population_size=None, initial=None),
        run=replace(cmd.run, dir=str(stage_dir), budget=points, id=None))
    log.info("global-scale scan: %d values of %s in [%g, %g] in %s, then the search from the best", points,
             "every weight" if param == "weight" else "lambda", scanned.low, scanned.high, stage_dir)
    result = Search(stage, scheduler_factory).run()
    if result.best is None:
        raise FuseEvoError(f"the global-scale scan ({stage_dir}): no candidate completed ({nothing_scored(result)})")
    best = float(result.best.genome[0])
    log.info("global-scale scan: best %s %.4g (trial %d, scalar %.4f); the search starts there", param, best,
             result.best.number, result.best.scalar)
    if param in genes:
        space = replace(space, genes={**genes, param: replace(genes[param], init=best)})
    else:  # lambda, no gene: the scan tunes its fixed value
        space = replace(space, fixed={**space.fixed, param: best})
    budget = int(cmd.run.budget) - points
    return replace(cmd, space=space, run=replace(cmd.run, budget=budget), strategy=replace(cmd.strategy, budget=budget))


def run_first_stage(cmd: SearchCommand, scheduler_factory=None) -> SearchCommand:
    """A hybrid search's parameter-space stage (``space.dataflow.merge_stage``: an experiment)
    run, resumed, or found finished in ``RUN_DIR/stages/NAME`` on the same models, seed and
    cluster; returns ``cmd`` with that directory as ``merged_from``."""
    df = cmd.space.dataflow if cmd.space.method == DATAFLOW else None
    if df is None or not df.merge_stage:
        return cmd
    if df.merged_from:
        raise ConfigError("space.dataflow.merge_stage: give it or merged_from (a finished run), not both")
    stage_dir = Path(cmd.run.dir).expanduser().resolve() / STAGES_DIR / df.merge_stage
    try:
        stage = compose("search", [f"experiment={df.merge_stage}", f"run.dir={stage_dir}", f"seed={cmd.seed}"])
    except Exception as e:  # Hydra's errors name the missing experiment
        raise ConfigError(f"space.dataflow.merge_stage: {df.merge_stage!r}: {e}") from None
    if stage.space.method == DATAFLOW:
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


def make_scheduler(spec: WorkerSpec, cluster: Any) -> Scheduler:
    """The scheduler a ``cluster`` config names (judged by ``check_plan``)."""
    if cluster.backend == "ray":
        from .ray_scheduler import RayScheduler

        return RayScheduler(spec, cluster)
    return SerialScheduler(spec)
