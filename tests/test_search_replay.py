"""The archive is the one truth: for every strategy, a search killed mid-way and resumed with
its strategy.pkl deleted replays the archived asks and tells into a fresh strategy and ends
with the archive an uninterrupted run gives (genomes, scores, order). A damaged, stale or
foreign strategy.pkl is never fatal and never unpickled unless the archive vouches for it."""

from __future__ import annotations

import logging
import pickle
from collections import deque
from pathlib import Path

import pytest

from fuse_evo.search.archive import Archive
from fuse_evo.search.run import run_search
from fuse_evo.search.scheduler import SerialScheduler

from conftest import compose_command

TWO = ["evaluator=zoo_two_skills", "evaluator.limit=20", "++models.sources={ft_increment:null,ft_reverse:null}"]
# every strategy preset, with what it needs on the micro zoo
STRATEGIES = {
    "cma": [], "de": [], "ngopt": [], "tpe": [], "optuna_cmaes": ["strategy.population_size=3"],
    "nsga2": [*TWO, "strategy.population_size=4"], "motpe": TWO, "de_pareto": TWO, "random": [],
    "grid": ["space=ta_uniform"], "path_es": ["space=dfs"],
}
BUDGET = 9


class Crash(BaseException):
    """A kill: nothing after it runs (BaseException, so no handler in the search catches it)."""


class TwoSlots(SerialScheduler):
    """Two candidates in flight, run one per wait (oldest first): asks and tells interleave as
    on two workers. ``crash_at``: the wait that raises Crash instead (candidates in flight
    are then asked and archived as asks, never scored)."""

    capacity = 2
    crash_at: int | None = None

    def __init__(self, spec):
        super().__init__(spec)
        self._queue = deque()
        self.waits = 0

    def submit(self, job) -> None:
        self._queue.append(job)

    def free(self) -> int:
        return self.capacity - len(self._queue)

    def wait(self):
        self.waits += 1
        if self.waits == type(self).crash_at:
            raise Crash()
        return [self.worker.run(self._queue.popleft())]


def _command(micro_zoo, run_dir: Path, name: str, *extra: str):
    zoo = Path(micro_zoo["task_dir"]).parent
    return compose_command("search", ["experiment=micro", f"models.zoo.out_dir={zoo}", f"run.dir={run_dir}",
                                      f"run.budget={BUDGET}", "run.dashboard=false", f"strategy={name}",
                                      "strategy.num_workers=2", *STRATEGIES[name], *extra])


def _history(run_dir: Path) -> list[tuple]:
    with Archive.open(run_dir) as archive:
        return [(t.candidate_id, t.status, t.genome, t.scalar, t.objectives) for t in archive.trials()]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_without_the_cache_replays_the_archive_exactly(micro_zoo, tmp_path, name, monkeypatch, caplog):
    TwoSlots.crash_at = None
    straight = run_search(_command(micro_zoo, tmp_path / "straight", name), scheduler_factory=TwoSlots)
    assert straight.evaluations == BUDGET

    killed = tmp_path / "killed"
    TwoSlots.crash_at = 5  # 4 scored, 2 in flight (asked and archived as asks)
    with pytest.raises(Crash):
        run_search(_command(micro_zoo, killed, name), scheduler_factory=TwoSlots)
    with Archive.open(killed) as archive:
        assert archive.count() == 4 and archive.count_asks() >= 5
    (killed / "strategy.pkl").unlink(missing_ok=True)

    TwoSlots.crash_at = None
    with caplog.at_level(logging.INFO, logger="fuse_evo"):
        resumed = run_search(_command(micro_zoo, killed, name), scheduler_factory=TwoSlots)
    assert resumed.resumed and resumed.evaluations == BUDGET
    assert "strategy rebuilt from the archive" in caplog.text and "proposed other genomes" not in caplog.text
    assert _history(killed) == _history(tmp_path / "straight")


def test_a_crash_between_the_commit_and_the_tell_is_told_from_the_archive(micro_zoo, tmp_path, monkeypatch):
    """Killed after an evaluation was archived but before the strategy heard of it: the
    replay tells it, it is not re-run, and the run ends as an uninterrupted one."""
    from fuse_evo.search import run as run_module

    TwoSlots.crash_at = None
    run_search(_command(micro_zoo, tmp_path / "straight", "cma"), scheduler_factory=TwoSlots)
    calls = {"n": 0}
    tell = run_module.Search._tell

    def crashing_tell(self, candidate, trial):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash()
        return tell(self, candidate, trial)

    monkeypatch.setattr(run_module.Search, "_tell", crashing_tell)
    with pytest.raises(Crash):
        run_search(_command(micro_zoo, tmp_path / "killed", "cma"), scheduler_factory=TwoSlots)
    monkeypatch.setattr(run_module.Search, "_tell", tell)
    assert Archive.open(tmp_path / "killed").count() == 4  # the 4th was committed, never told
    run_search(_command(micro_zoo, tmp_path / "killed", "cma"), scheduler_factory=TwoSlots)
    assert _history(tmp_path / "killed") == _history(tmp_path / "straight")


class _Armed:
    """A pickle that leaves a mark when it is loaded (as a malicious file would run code)."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (Path.touch, (self.mark,))


@pytest.mark.parametrize("damage", ["garbled", "truncated", "foreign pickle", "stale"])
def test_a_bad_cache_is_ignored_and_never_unpickled(micro_zoo, tmp_path, damage, caplog):
    """Each damage costs one warning and a replay; the run then ends as an uninterrupted one."""
    TwoSlots.crash_at = None
    run_search(_command(micro_zoo, tmp_path / "straight", "tpe"), scheduler_factory=TwoSlots)
    killed, mark = tmp_path / "killed", tmp_path / "unpickled"
    TwoSlots.crash_at = 5
    with pytest.raises(Crash):
        run_search(_command(micro_zoo, killed, "tpe"), scheduler_factory=TwoSlots)
    cache = killed / "strategy.pkl"
    good = cache.read_bytes()
    if damage == "garbled":
        cache.write_bytes(good[:100] + bytes(b ^ 0x5A for b in good[100:200]) + good[200:])
    elif damage == "truncated":
        cache.write_bytes(good[: len(good) // 2])
    elif damage == "foreign pickle":
        cache.write_bytes(pickle.dumps(_Armed(mark)))
    else:  # a valid cache of an earlier point of this run: its checksum is not the one recorded
        with Archive.open(killed) as archive:
            archive.set_cache("0" * 64, 1, 0)
    TwoSlots.crash_at = None
    with caplog.at_level(logging.INFO, logger="fuse_evo"):
        run_search(_command(micro_zoo, killed, "tpe"), scheduler_factory=TwoSlots)
    assert not mark.exists()
    assert "ignoring strategy.pkl" in caplog.text and "rebuilding the strategy from the archive" in caplog.text
    assert _history(killed) == _history(tmp_path / "straight")


def test_the_cache_is_used_when_the_archive_vouches_for_it(micro_zoo, tmp_path, caplog):
    TwoSlots.crash_at = 5
    with pytest.raises(Crash):
        run_search(_command(micro_zoo, tmp_path / "run", "cma"), scheduler_factory=TwoSlots)
    TwoSlots.crash_at = None
    with caplog.at_level(logging.INFO, logger="fuse_evo"):
        run_search(_command(micro_zoo, tmp_path / "run", "cma"), scheduler_factory=TwoSlots)
    assert "strategy restored from its cache" in caplog.text and "rebuilt" not in caplog.text
