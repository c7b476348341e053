"""Sweeps: `fuse-evo search -m` runs each combination in its own run directory named by its
overrides; a sweep killed mid-job and launched again skips the finished jobs and resumes the
killed one (no evaluation lost or repeated); hydra-submitit-launcher's local executor runs the
same jobs as processes; `fuse-evo report SWEEP_DIR` compares them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse_evo.cli import job_dir_name
from fuse_evo.search.archive import Archive

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_job_dir_names_come_from_the_overrides():
    a = job_dir_name(["seed=1", "strategy=cma", "run.budget=50", "experiment=micro"])
    assert a == "experiment=micro,seed=1,strategy=cma"  # sorted; the budget may change on a requeue
    assert job_dir_name(["experiment=micro", "strategy=cma", "seed=1", "run.budget=500", "run.progress=false",
                         "cluster=ray", "cluster.num_workers=4", "hydra.launcher.timeout_min=5"]) == a
    assert job_dir_name(["seed=2", "strategy=cma", "experiment=micro"]) != a
    odd = job_dir_name(["models.zoo.out_dir=/data/zoo 1", "seed=0"])
    assert "/" not in odd and " " not in odd and odd.startswith("models.zoo.out_dir=_data_zoo_1,seed=0-")
    assert odd != job_dir_name(["models.zoo.out_dir=/data/zoo_1", "seed=0"])  # escaping keeps them apart
    long = job_dir_name([f"space.genes.g{i}.low=0.{i}" for i in range(30)])
    assert len(long) <= 120 and long == job_dir_name([f"space.genes.g{i}.low=0.{i}" for i in range(30)])


def _sweep_command(zoo: Path, sweep: Path, budget: int, seeds: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fuse_evo.cli", "search", "-m", "experiment=micro", f"models.zoo.out_dir={zoo}",
            f"seed={seeds}", f"run.budget={budget}", "run.dashboard=false", f"hydra.sweep.dir={sweep}", *extra]


def _job_dir(sweep: Path, zoo: Path, seed: int, *extra: str) -> Path:
    return sweep / job_dir_name(["experiment=micro", f"models.zoo.out_dir={zoo}", f"seed={seed}", *extra])


def _check_archive(run: Path, budget: int) -> None:
    with Archive.open(run) as archive:
        trials = archive.trials()
    assert [t.number for t in trials] == list(range(budget))
    assert sorted(t.candidate_id for t in trials) == list(range(budget))  # none lost, none repeated


def test_local_sweep_and_its_report(micro_zoo, tmp_path, capsys):
    """experiments/sweep_micro.yaml: its sweeper params (2 strategies x 2 seeds) make 4 jobs."""
    from fuse_evo.cli import main

    zoo, sweep = Path(micro_zoo["task_dir"]).parent, tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fuse_evo.cli", "search", "-m", "experiment=sweep_micro", f"models.zoo.out_dir={zoo}",
           "run.budget=4", "run.dashboard=false", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for strategy in ("cma", "random"):
        for seed in (0, 1):
            run = sweep / job_dir_name(["experiment=sweep_micro", f"models.zoo.out_dir={zoo}", f"seed={seed}",
                                        f"strategy={strategy}"])
            _check_archive(run, 4)
    assert main(["report", str(sweep), "--no-heldout"]) == 0
    summary = json.loads((sweep / "report" / "compare.json").read_text())
    assert sorted(r["seed"] for r in summary["runs"]) == [0, 0, 1, 1]
    assert sorted(g["runs"] for g in summary["groups"]) == [2, 2]  # a group per strategy, over its seeds
    assert summary["best"]["run"] in {r["run"] for r in summary["runs"]}
    assert f"--pick trial:{summary['best']['trial']}" in capsys.readouterr().out


def test_killed_sweep_relaunched_resumes_and_skips_finished(micro_zoo, tmp_path):
    zoo, sweep, budget = Path(micro_zoo["task_dir"]).parent, tmp_path / "sweep", 40
    cmd = _sweep_command(zoo, sweep, budget, "0,1", "space.scan=0")  # the runs alone, no scan stage
    second = _job_dir(sweep, zoo, 1, "space.scan=0") / "search.log"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # job 0 finished, job 1 a few evaluations in: kill the whole sweep
        if second.exists() and "trial 4 " in second.read_text():
            break
        time.sleep(0.05)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the sweep's second job never got going")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with Archive.open(second.parent) as archive:
        killed_at = archive.count()
    assert killed_at < budget

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    first_log = (_job_dir(sweep, zoo, 0, "space.scan=0") / "search.log").read_text()
    assert "reached its budget" in first_log.split("starting run")[-1] or "already reached" in again.stdout
    assert f"resuming at {killed_at} of {budget}" in second.read_text() or "resuming at" in second.read_text()
    for seed in range(2):
        _check_archive(_job_dir(sweep, zoo, seed, "space.scan=0"), budget)


def test_submitit_local_launcher(micro_zoo, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    zoo, sweep = Path(micro_zoo["task_dir"]).parent, tmp_path / "sweep"
    done = subprocess.run(_sweep_command(zoo, sweep, 3, "0,1", "hydra/launcher=local"), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    assert (sweep / ".submitit").is_dir()
    for seed in range(2):
        _check_archive(_job_dir(sweep, zoo, seed), 3)


def test_sweep_jobs_on_an_existing_ray_cluster(micro_zoo, tmp_path):
    """The documented Ray path: sweep jobs as local processes (hydra/launcher=local), each
    search's workers Ray actors on a cluster started beforehand (here a one-node head),
    joined with cluster.address=auto (the head's address file and auth token are found
    that way; a bare IP:PORT needs the token too)."""
    import socket

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    ray = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              "--disable-usage-stats"], env=ENV, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        zoo, sweep = Path(micro_zoo["task_dir"]).parent, tmp_path / "sweep"
        done = subprocess.run(_sweep_command(zoo, sweep, 4, "0,1", "hydra/launcher=local", "cluster=ray",
                                             "cluster.address=auto", "cluster.num_workers=1"),
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        for seed in range(2):
            run = sweep / job_dir_name(["experiment=micro", f"models.zoo.out_dir={zoo}", f"seed={seed}", "run.budget=4",
                                        "cluster=ray", "cluster.address=auto", "cluster.num_workers=1"])
            assert run == _job_dir(sweep, zoo, seed)  # cluster keys do not name the run
            _check_archive(run, 4)
            log = (run / "search.log").read_text()
            assert "the Ray cluster at auto: 1 workers" in log
            with Archive.open(run) as archive:  # scored by an actor process, not by the job's own
                workers = {t.worker for t in archive.trials("complete")}
            assert workers and all(w.split(":")[1].isdigit() for w in workers)
    finally:
        subprocess.run([ray, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
