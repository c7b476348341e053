"""fuse-evo search on the micro zoo: every backend end to end, resume after a real SIGKILL,
recipe dedup, failures archived and told, and the bad inputs refused with a clear message."""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file, save_file

from fuse_evo.errors import FuseEvoError
from fuse_evo.models import IncompatibleModels
from fuse_evo.search import strategies
from fuse_evo.search.archive import Archive
from fuse_evo.search.run import RunDirError, run_search
from fuse_evo.search.scheduler import SerialScheduler

from conftest import compose_command

REPO = Path(__file__).resolve().parent.parent
SKILLS = ("increment", "reverse", "shift")


def zoo_dir(manifest: dict) -> Path:
    return Path(manifest["task_dir"]).parent


def command(manifest: dict, run_dir: Path, *overrides: str, zoo: bool = True):
    where = [f"models.zoo.out_dir={zoo_dir(manifest)}"] if zoo else []
    return compose_command("search", ["experiment=micro", *where, f"run.dir={run_dir}", *overrides])


def paths_command(manifest: dict, run_dir: Path, sources: dict[str, Path | str], *overrides: str):
    """A search over the zoo's base and ``sources`` given by path (``models=paths``)."""
    listed = ", ".join(f"{name}: {path}" for name, path in sources.items())
    return command(manifest, run_dir, "models=paths", f"models.base={manifest['models']['base']['path']}",
                   f"++models.sources={{{listed}}}", f"evaluator.include_path=[{manifest['task_dir']}]",
                   *overrides, zoo=False)


def check_archive(run_dir: Path, budget: int) -> Archive:
    """The archive holds ``budget`` evaluations numbered 0.., one per candidate, each sound."""
    archive = Archive.open(run_dir)
    trials = archive.trials()
    assert [t.number for t in trials] == list(range(budget))
    assert len({t.candidate_id for t in trials}) == budget
    info = archive.info
    for t in trials:
        assert t.status in ("complete", "duplicate") and t.error is None
        assert len(t.genome) == len(info["genes"])
        assert all(lo <= x <= hi for x, lo, hi in zip(t.genome, info["lower"], info["upper"]))
        assert set(t.objectives) == set(SKILLS)
        assert t.scalar == pytest.approx(sum(t.objectives.values()) / 3)
        assert t.losses == [pytest.approx(-t.scalar)]
        assert t.to_recipe().key == t.recipe_key and t.to_recipe().method == info["method"]
        if t.fidelity == 1.0:  # a raced-out trial's objectives are full-split estimates, its metrics its documents'
            assert t.metrics[f"zoo_{SKILLS[0]}_search/acc,none"] == t.objectives[SKILLS[0]]
        assert t.finished >= t.started
    return archive


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("strategy", ["cma", "tpe", "random"])
def test_end_to_end_each_backend(micro_zoo, tmp_path, strategy):
    run_dir = tmp_path / "run"
    result = run_search(command(micro_zoo, run_dir, f"strategy={strategy}", "run.budget=6"))
    assert result.evaluations == 6 and not result.resumed and not result.already_done
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "archive.db", "config.yaml", "search.log", "strategy.pkl"]

    archive = check_archive(run_dir, 6)
    first = archive.trials()
    info = archive.info
    assert info["sources"]["base"] == micro_zoo["models"]["base"]["path"]
    assert info["sources"]["ft_shift"] == micro_zoo["models"]["ft_shift"]["path"]
    assert info["zoo"]["dir"] == str(zoo_dir(micro_zoo)) and info["strategy"].startswith(
        {"cma": "nevergrad/CMA", "tpe": "optuna/tpe", "random": "random"}[strategy])
    best = archive.best()
    assert best.scalar == max(t.scalar for t in first if t.status == "complete") == result.best.scalar
    assert best.number in [t.number for t in archive.pareto_front()]
    assert archive.config["strategy"]["backend"] == {"cma": "nevergrad", "tpe": "optuna", "random": "random"}[strategy]
    # the first candidate is the uniform merge (weight 1/3 everywhere)
    np.testing.assert_allclose(first[0].genome, 1 / 3)
    log = (run_dir / "search.log").read_text()
    assert "trial 5 (candidate" in log and "finished its budget: 6 evaluations" in log
    assert "memory plan per worker" in log and "<- chosen" in log  # planned before the models loaded

    # the dashboard study mirrors the archive
    study = optuna.load_study(study_name=f"micro-{archive.run_id}", storage=archive.url)
    assert [t.values[0] for t in study.trials] == pytest.approx([t.scalar for t in first])
    assert set(study.trials[0].params) == set(info["genes"])

    # the same command again: the budget is reached, nothing runs
    again = run_search(command(micro_zoo, run_dir, f"strategy={strategy}", "run.budget=6"))
    assert again.already_done and again.evaluations == 6
    assert "reached its budget" in (run_dir / "search.log").read_text()

    # a larger budget continues the same run: earlier evaluations kept, none repeated
    more = run_search(command(micro_zoo, run_dir, f"strategy={strategy}", "run.budget=9"))
    assert more.resumed and more.evaluations == 9 and more.run_id == result.run_id
    archive = check_archive(run_dir, 9)
    assert [t.to_dict() for t in archive.trials()[:6]] == [t.to_dict() for t in first]
    assert len(optuna.load_study(study_name=f"micro-{archive.run_id}", storage=archive.url).trials) == 9


# ---------------------------------------------------------------------------- resume after SIGKILL
def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("select count(*) from fe_trials").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def kill_and_resume(args: list[str], run_dir: Path, budget: int, kill_after: int, timeout: float = 120,
                    check=check_archive) -> list:
    """Start ``fuse-evo search ARGS`` in a subprocess, SIGKILL it once ``kill_after``
    evaluations are archived, run the same command again; check the resumed run kept every
    archived evaluation exactly as it was and finished its budget (``check(run_dir, budget)``:
    the archive's checks, the micro zoo's by default). Returns its trials."""
    cmd = [sys.executable, "-m", "fuse_evo.cli", "search", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while _count(run_dir / "archive.db") < kill_after:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the search did not start evaluating"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert kill_after <= _count(run_dir / "archive.db") < budget
    before = {t.number: t.to_dict() for t in Archive.open(run_dir).trials()}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(300, timeout))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{budget} of {budget} evaluations (resumed)" in done.stdout
    trials = check(run_dir, budget).trials()
    assert all(trials[n].to_dict() == before[n] for n in before)  # kept as they were, exactly once
    return trials


def test_resume_after_sigkill(micro_zoo, tmp_path):
    """A search killed mid-run (a real process, SIGKILL) resumes with the same command:
    every completed evaluation is kept exactly once, the budget is reached, and the result
    is the one an uninterrupted run gives."""
    budget = 30
    run_dir = tmp_path / "killed"
    args = ["experiment=micro", f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run_dir}",
            f"run.budget={budget}", "space.scan=0"]  # no global-scale stage: the run alone
    trials = kill_and_resume(args, run_dir, budget, kill_after=5)
    assert "resuming at" in (run_dir / "search.log").read_text()

    # the interrupted run searched exactly as an uninterrupted one
    straight = run_search(compose_command("search", args[:2] + [f"run.dir={tmp_path / 'straight'}",
                                                                 f"run.budget={budget}", "space.scan=0"]))
    reference = Archive.open(straight.run_dir).trials()
    assert [t.genome for t in trials] == [t.genome for t in reference]
    assert [t.scalar for t in trials] == [t.scalar for t in reference]


# ---------------------------------------------------------------------------- dedup and failures
class _Counting(SerialScheduler):
    submitted: list[str] = []

    def submit(self, job):
        type(self).submitted.append(job.key)
        super().submit(job)


def test_identical_recipes_are_scored_once(micro_zoo, tmp_path, monkeypatch):
    """A strategy proposing the same genomes again: each recipe is evaluated once, the
    repeats are archived as duplicates of it and told its result."""
    two = {}

    def ask(self):
        if not two:
            two["a"], two["b"] = self.space.initial(), np.full(self.space.dimension, 0.5)
        return self._new_id(), (two["a"], two["b"])[self.n_asked % 2], None

    monkeypatch.setattr(strategies.RandomSearch, "_ask", ask)
    _Counting.submitted = []
    result = run_search(command(micro_zoo, tmp_path / "dup", "strategy=random", "run.budget=6"),
                        scheduler_factory=_Counting)
    assert result.evaluations == 6 and len(_Counting.submitted) == 2 == len(set(_Counting.submitted))
    trials = check_archive(tmp_path / "dup", 6).trials()
    assert [t.status for t in trials] == ["complete", "complete"] + ["duplicate"] * 4
    assert [t.duplicate_of for t in trials] == [None, None, 0, 1, 0, 1]
    assert all(t.scalar == trials[t.number % 2].scalar for t in trials)
    assert Archive.open(tmp_path / "dup").count("complete") == 2


def test_failed_candidates_are_archived_and_told(micro_zoo, tmp_path, monkeypatch):
    """An exception in the merge, or a NaN objective, fails that candidate alone."""
    from fuse_evo.evaluate.evaluator import Evaluator
    from fuse_evo.merge.engine import MergeEngine

    calls = {"merge": 0, "score": 0}
    materialize, score = MergeEngine.materialize, Evaluator.score

    def flaky_materialize(self, recipe, into):
        calls["merge"] += 1
        if calls["merge"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return materialize(self, recipe, into)

    def nan_score(self):
        calls["score"] += 1
        scores = score(self)
        if calls["score"] == 3:
            scores.results["zoo_reverse_search"]["acc,none"] = float("nan")
        return scores

    monkeypatch.setattr(MergeEngine, "materialize", flaky_materialize)
    monkeypatch.setattr(Evaluator, "score", nan_score)
    result = run_search(command(micro_zoo, tmp_path / "fail", "strategy=cma", "run.budget=6"))
    archive = Archive.open(tmp_path / "fail")
    trials = archive.trials()
    assert result.evaluations == 6 and [t.status for t in trials].count("failed") == 2
    assert trials[1].status == "failed" and trials[1].error == "RuntimeError: out of memory (simulated)"
    assert trials[1].scalar is None and trials[1].losses is None
    assert trials[3].status == "failed" and "non-finite objective: reverse = nan" in trials[3].error
    assert archive.best().status == "complete"
    state = pickle.loads((tmp_path / "fail" / "strategy.pkl").read_bytes())["strategy"]
    assert state["n_told"] == 6 and state["pending"] == []


# ---------------------------------------------------------------------------- bad input
def test_config_typos_fail_at_compose_naming_the_key(micro_zoo, tmp_path):
    with pytest.raises(ConfigCompositionException, match="budgt"):
        command(micro_zoo, tmp_path, "run.budgt=3")
    with pytest.raises(ConfigCompositionException, match="optimzer"):
        command(micro_zoo, tmp_path, "strategy.optimzer=DE")
    with pytest.raises(ConfigCompositionException, match="nosuch"):
        command(micro_zoo, tmp_path, "strategy=nosuch")


def test_a_run_dir_of_another_experiment_is_refused(micro_zoo, tmp_path):
    run_dir = tmp_path / "run"
    first = run_search(command(micro_zoo, run_dir, "run.budget=2"))
    with pytest.raises(RunDirError, match=r"holds another experiment \('micro'\).*strategy\.optimizer: 'CMA' -> "
                                          r"'TwoPointsDE'.*run\.overwrite=true"):
        run_search(command(micro_zoo, run_dir, "run.budget=2", "strategy=de"))
    with pytest.raises(RunDirError, match=r"seed: 0 -> 1"):
        run_search(command(micro_zoo, run_dir, "run.budget=2", "seed=1"))
    assert Archive.open(run_dir).count() == 2  # untouched
    fresh = run_search(command(micro_zoo, run_dir, "run.budget=3", "strategy=de", "run.overwrite=true"))
    assert fresh.run_id != first.run_id and not fresh.resumed and fresh.evaluations == 3
    assert Archive.open(run_dir).info["strategy"] == "nevergrad/TwoPointsDE"
    import fcntl

    with open(run_dir / ".lock", "a") as held:  # another search running on this directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirError, match="is in use by another fuse-evo search"):
            run_search(command(micro_zoo, run_dir, "run.budget=4", "strategy=de"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and holds no search"):
        run_search(command(micro_zoo, other, "run.budget=2"))


def test_incompatible_models_fail_before_the_first_evaluation(micro_zoo, tmp_path):
    models = micro_zoo["models"]
    broken = tmp_path / "ft_broken"
    broken.mkdir()
    src = Path(models["ft_shift"]["path"])
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    name = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, broken / "model.safetensors")
    cmd = paths_command(micro_zoo, tmp_path / "run", {"inc": models["ft_increment"]["path"], "bad": broken})
    with pytest.raises(IncompatibleModels, match=rf"model 'bad', tensor '{name}': shape"):
        run_search(cmd)
    assert Archive.open(tmp_path / "run").count() == 0
    with pytest.raises(FuseEvoError, match="models.base: name the base model"):
        run_search(command(micro_zoo, tmp_path / "run2", "models=paths", zoo=False))


def test_runs_share_a_database_url(micro_zoo, tmp_path):
    """run.db_url: the archive lives in that database (no archive.db in the run dir), one
    fe_runs row per run; overwriting one run removes only its rows."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = run_search(command(micro_zoo, tmp_path / "a", "strategy=random", "run.budget=2", f"run.db_url={url}"))
    b = run_search(command(micro_zoo, tmp_path / "b", "strategy=random", "run.budget=3", f"run.db_url={url}",
                           "seed=1"))
    assert not (tmp_path / "a" / "archive.db").exists() and a.run_id != b.run_id
    assert Archive.open(tmp_path / "a").count() == 2 and Archive.open(tmp_path / "b").count() == 3
    assert Archive.open(tmp_path / "b").url == url
    run_search(command(micro_zoo, tmp_path / "a", "strategy=random", "run.budget=1", f"run.db_url={url}",
                       "run.overwrite=true"))
    assert Archive.open(tmp_path / "a").count() == 1 and Archive.open(tmp_path / "b").count() == 3
    with sqlite3.connect(tmp_path / "shared.db") as c:
        assert c.execute("select count(*) from fe_runs").fetchone()[0] == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_cache_owned_by_another_user_is_not_unpickled_without_trust(micro_zoo, tmp_path, caplog):
    """strategy.pkl of another user is ignored (the archive is replayed) unless
    run.trust_checkpoint=true; either way the run continues."""
    run_dir = tmp_path / "run"
    run_search(command(micro_zoo, run_dir, "strategy=random", "run.budget=2"))
    os.chown(run_dir / "strategy.pkl", 12345, -1)
    with caplog.at_level(logging.INFO, logger="fuse_evo.search"):
        result = run_search(command(micro_zoo, run_dir, "strategy=random", "run.budget=3"))
    assert result.resumed and result.evaluations == 3
    assert re.search(r"ignoring strategy.pkl: .*belongs to another user \(uid 12345\).*run.trust_checkpoint=true",
                     caplog.text)
    assert "strategy rebuilt from the archive: 2 asks, 2 tells" in caplog.text
    os.chown(run_dir / "strategy.pkl", 12345, -1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fuse_evo.search"):
        result = run_search(command(micro_zoo, run_dir, "strategy=random", "run.budget=4",
                                    "run.trust_checkpoint=true"))
    assert result.resumed and result.evaluations == 4
    assert "a pickle owned by uid 12345 (run.trust_checkpoint=true)" in caplog.text
    assert "strategy restored from its cache" in caplog.text


# ---------------------------------------------------------------------------- racing
def _race_worker(micro_zoo, tmp_path):
    from fuse_evo.search.plan import make_plan
    from fuse_evo.search.worker import Worker

    cmd = command(micro_zoo, tmp_path / "race", "evaluator.fidelity=race", "evaluator.limit=40")
    return Worker(make_plan(cmd, "race", cmd.cluster, None).worker)


def test_racing_stops_the_hopeless_at_its_first_stage_and_lets_a_contender_finish(micro_zoo, tmp_path):
    from fuse_evo.recipe import Recipe
    from fuse_evo.search.worker import Job

    worker = _race_worker(micro_zoo, tmp_path)
    models = tuple(worker.spec.sources)

    def merge(weight):
        return Recipe("task_arithmetic", models, base=worker.spec.base_name,
                      groups={"*": {m: {"weight": weight} for m in models}})

    full = sum(worker.evaluator.n_docs.values())
    good = worker.run(Job(0, merge(0.4)))  # no reference yet: every document
    assert good.status == "complete" and good.fidelity == 1.0 and good.documents == full
    reference = {"objectives": good.objectives, "outcomes": good.outcomes}
    first = sum(len(p) for p in worker.stages[0].values())
    bad = worker.run(Job(1, merge(4.0), references=[reference]))  # four times each task vector: broken
    assert bad.status == "complete" and bad.documents == first and bad.fidelity == pytest.approx(first / full)
    # told the full split's estimate, paired with the incumbent: below it
    assert all(bad.objectives[n] < good.objectives[n] for n in good.objectives)
    assert sum(bad.objectives.values()) < sum(good.objectives.values())
    # a candidate as good as the incumbent (itself) is never stopped, nor one racing a weaker one
    assert worker.run(Job(2, merge(0.4), references=[reference])).fidelity == 1.0
    weak = {"objectives": bad.objectives, "outcomes": bad.outcomes}
    again = worker.run(Job(3, merge(0.4), references=[weak]))
    assert again.fidelity == 1.0 and again.objectives == good.objectives


def _check_raced_archive(run_dir, budget):
    archive = check_archive(run_dir, budget)
    trials = archive.trials("complete")
    assert any(t.fidelity < 1 for t in trials), [t.fidelity for t in trials]  # some were stopped early
    best = archive.best()
    assert best.fidelity == 1.0  # a stopped candidate's estimate never passes the incumbent it lost to
    full = max(t.documents for t in trials)
    assert sum(t.documents for t in trials) < len(trials) * full
    return archive


def test_a_raced_search_resumes_after_sigkill(micro_zoo, tmp_path):
    budget = 16
    run_dir = tmp_path / "raced"
    args = ["experiment=micro", f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run_dir}",
            f"run.budget={budget}", "space.scan=0", "strategy=random", "evaluator.fidelity=race",
            "evaluator.limit=40"]
    trials = kill_and_resume(args, run_dir, budget, kill_after=5, check=_check_raced_archive)
    straight = run_search(compose_command("search", [*args[:2], f"run.dir={tmp_path / 'straight'}", *args[3:]]))
    reference = Archive.open(straight.run_dir).trials()
    assert [(t.genome, t.scalar, t.fidelity) for t in trials] == [(t.genome, t.scalar, t.fidelity) for t in reference]

