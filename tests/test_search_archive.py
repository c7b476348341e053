"""One results database for many runs: a real PostgreSQL server (started by the test setup)
and a shared SQLite file. Concurrent writers, as processes, lose or corrupt nothing: every
record of every run is there, numbered 0..n-1 per run; two whole searches running at once
into one PostgreSQL database each finish their budget, readable from their run dirs."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from fuse_evo.search.archive import Archive, Trial

WRITERS, RECORDS = 4, 40


def _writer(url: str, run_id: str, n: int) -> None:
    archive = Archive(url, run_id, create=True)
    archive.start_run(run_id, "{}", {"objectives": [{"name": "a", "direction": "max", "metric": "t/acc",
                                                     "weight": 1.0}]})
    for i in range(n):
        archive.record(Trial(number=-1, candidate_id=i, status="complete", genome=[i / n], recipe={"i": i},
                             recipe_key=f"{run_id}-{i}", objectives={"a": i / n}, scalar=i / n))
    archive.close()


def _hammer(url: str) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, f"run{w}", RECORDS)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for w in range(WRITERS):
        with Archive(url, f"run{w}") as archive:
            trials = archive.trials()
            assert [t.number for t in trials] == list(range(RECORDS))
            assert sorted(t.candidate_id for t in trials) == list(range(RECORDS))
            assert all(t.recipe == {"i": t.candidate_id} for t in trials)
            assert archive.best().candidate_id == RECORDS - 1


def test_concurrent_writers_postgres(postgres_url):
    _hammer(postgres_url)
    engine = sa.create_engine(postgres_url)
    with engine.connect() as c:
        assert c.execute(sa.text("select count(*) from fe_runs")).scalar_one() == WRITERS
        assert c.execute(sa.text("select count(*) from fe_trials")).scalar_one() == WRITERS * RECORDS
    engine.dispose()


def test_concurrent_writers_sqlite(tmp_path):
    _hammer(f"sqlite:///{tmp_path / 'shared.db'}")


def _open(url: str, go) -> None:
    go.wait()
    Archive(url, "run", create=True).close()


def test_writers_racing_to_create_the_sqlite_tables_all_open_it(tmp_path):
    """Writers released at once onto a new SQLite file: each may find a table made between its
    check and its create (SQLite creates one table per statement); none fails for it."""
    ctx = mp.get_context("fork")
    for attempt in range(10):
        go = ctx.Event()
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        procs = [ctx.Process(target=_open, args=(url, go)) for _ in range(6)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6, f"round {attempt}"


def _search(micro_zoo, run: Path, url: str, seed: int) -> subprocess.Popen:
    zoo = Path(micro_zoo["task_dir"]).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fuse_evo.cli", "search", "experiment=micro", f"models.zoo.out_dir={zoo}",
         f"run.dir={run}", f"run.db_url={url}", "run.budget=6", f"seed={seed}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_searches_into_one_postgres_database(micro_zoo, postgres_url, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [_search(micro_zoo, run, postgres_url, seed) for seed, run in enumerate(runs)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    ids = set()
    for run in runs:
        assert not (run / "archive.db").exists()  # the archive lives in PostgreSQL
        with Archive.open(run) as archive:
            assert archive.url == postgres_url
            assert [t.number for t in archive.trials()] == list(range(6))
            ids.add(archive.run_id)
    assert len(ids) == 2
    # the same command again: finished, nothing re-run, nothing added
    p = _search(micro_zoo, runs[0], postgres_url, 0)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "already reached its budget" in out
    with Archive.open(runs[0]) as archive:
        assert archive.count() == 6
