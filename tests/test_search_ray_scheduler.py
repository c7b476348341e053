"""The Ray backend on the micro zoo, with a real local Ray cluster: 2 workers in generational
mode archive what the serial backend archives; killing a worker's process mid-candidate
restarts it and retries the candidate (or records it failed once its retries are spent), and
the search finishes its budget; a worker killed while it loads the models is restarted, while
a load that raises fails fast; a search whose local Ray node dies (its raylet killed) stops
with a clear message instead of hanging, and the same command resumes it; a Ray search killed
with SIGKILL resumes; bad cluster configs and impossible resource requests fail fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from fuse_evo.errors import ConfigError, FuseEvoError
from fuse_evo.search.archive import Archive
from fuse_evo.search.ray_scheduler import RayScheduler, SchedulerError
from fuse_evo.search.run import run_search
from fuse_evo.search.worker import Worker

from test_search_run import REPO, _count, check_archive, command, kill_and_resume, zoo_dir

CMA4 = ["strategy.population_size=4", "run.dashboard=false"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (schedulers use a running Ray and leave it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _content(run_dir):
    with Archive.open(run_dir) as archive:
        return [(t.number, t.candidate_id, t.status, t.recipe_key, t.genome, t.objectives, t.duplicate_of)
                for t in archive.trials()]


def test_two_ray_workers_in_generational_mode_archive_what_serial_does(micro_zoo, tmp_path, local_ray):
    serial = run_search(command(micro_zoo, tmp_path / "serial", "run.budget=8", *CMA4))
    distributed = run_search(command(micro_zoo, tmp_path / "ray", "run.budget=8", *CMA4, "cluster=ray",
                                     "cluster.mode=generational"))  # workers: one per CPU of the 2-CPU Ray
    assert serial.evaluations == distributed.evaluations == 8
    assert _content(tmp_path / "ray") == _content(tmp_path / "serial")
    with Archive.open(tmp_path / "ray") as archive:
        workers = {t.worker for t in archive.trials("complete")}
        assert len(workers) == 2 and all(w.endswith(":cpu") for w in workers)  # both workers scored
        assert archive.config["cluster"]["num_workers"] == 2 and archive.config["cluster"]["gpus_per_worker"] == 0
        assert archive.config["strategy"]["num_workers"] == 2  # the optimizer planned for 2 in flight
    check_archive(tmp_path / "ray", 8)


class _Killing(RayScheduler):
    """Kills the worker process a job was just dispatched to (SIGKILL, by pid), for the
    candidates and attempts listed in ``kills``."""

    kills: dict[int, set[int]] = {}
    killed: list[tuple[int, int, int]] = []

    def _dispatch(self, slot, job, attempt):
        kill = attempt in self.kills.get(job.candidate_id, ())
        pid = ray.get(slot.actor.ready.remote())["pid"] if kill else None  # before the job: it queues behind
        super()._dispatch(slot, job, attempt)
        if kill:
            os.kill(pid, signal.SIGKILL)
            type(self).killed.append((job.candidate_id, attempt, pid))


def test_killed_workers_are_restarted_and_candidates_retried(micro_zoo, tmp_path, local_ray):
    cmd = command(micro_zoo, tmp_path / "run", "run.budget=8", *CMA4, "cluster=ray", "cluster.num_workers=2",
                  "cluster.max_retries=1")
    _Killing.kills, _Killing.killed = {2: {1}, 4: {1, 2}}, []  # 2: once (retried); 4: twice (spent)
    result = run_search(cmd, scheduler_factory=lambda spec: _Killing(spec, cmd.cluster))
    assert result.evaluations == 8 and [k[:2] for k in _Killing.killed] == [(2, 1), (4, 1), (4, 2)]
    with Archive.open(tmp_path / "run") as archive:
        trials = {t.candidate_id: t for t in archive.trials()}
    assert sorted(trials) == list(range(8))
    assert trials[2].status == "complete" and trials[2].attempts == 2
    assert str(_Killing.killed[0][2]) not in trials[2].worker  # scored by the restarted process
    assert trials[4].status == "failed" and trials[4].attempts == 2
    assert "worker died 2 time(s) running this candidate" in trials[4].error
    assert all(t.status == "complete" and t.attempts == 1 for c, t in trials.items() if c not in (2, 4))


def test_a_worker_killed_while_loading_is_restarted(micro_zoo, tmp_path, local_ray):
    """The first worker process to load the models is SIGKILLed mid-load (as the OOM killer
    would): it is replaced within cluster.max_restarts and the search runs its budget."""
    marker = tmp_path / "killed_once"

    class DiesOnceWhileLoading(Worker):  # a local class: Ray pickles it by value
        def __init__(self, spec):
            super().__init__(spec)
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    cmd = command(micro_zoo, tmp_path / "run", "run.budget=6", *CMA4, "cluster=ray", "cluster.num_workers=2",
                  "cluster.max_restarts=1")
    schedulers = []

    def factory(spec):
        schedulers.append(RayScheduler(spec, cmd.cluster, worker_class=DiesOnceWhileLoading))
        return schedulers[0]

    assert run_search(cmd, scheduler_factory=factory).evaluations == 6
    assert marker.exists() and schedulers[0].restarts == 1
    check_archive(tmp_path / "run", 6)


def test_a_load_that_raises_fails_fast_on_ray(micro_zoo, tmp_path, local_ray):
    class BadModels(Worker):
        def __init__(self, spec):
            raise FuseEvoError("model 'bad': cannot be merged (a test)")

    cmd = command(micro_zoo, tmp_path / "run", "run.budget=4", *CMA4, "cluster=ray", "cluster.num_workers=2")
    started = time.time()
    with pytest.raises(FuseEvoError, match="model 'bad': cannot be merged"):
        run_search(cmd, scheduler_factory=lambda spec: RayScheduler(spec, cmd.cluster, worker_class=BadModels))
    assert time.time() - started < 120 and _count(tmp_path / "run" / "archive.db") == 0


def _raylets_under(pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if p.name() == "raylet" or "/raylet/raylet" in " ".join(p.cmdline()[:1])]


def test_a_dead_ray_node_stops_the_search_and_the_same_command_resumes(micro_zoo, tmp_path):
    budget = 5000  # its workers go on for some seconds after the raylet dies: more than they can do
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "fuse_evo.cli", "search", "experiment=micro",
            f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run_dir}", f"run.budget={budget}", "cluster=ray",
            "cluster.num_workers=2", "run.dashboard=false", "space.scan=0"]  # the run alone, no scan stage
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while _count(run_dir / "archive.db") < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        raylets = _raylets_under(proc.pid)
        assert len(raylets) == 1
        raylets[0].kill()  # the node dies, as when the OS kills one of its agents for memory
        _, err = proc.communicate(timeout=180)  # it stops by itself: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (_count(run_dir / "archive.db"), err[-3000:])
    assert "fuse-evo: error: the local Ray died" in err and "the same command resumes the run" in err
    done_before = _count(run_dir / "archive.db")
    assert 3 <= done_before < budget
    resumed = [a for a in args if not a.startswith("run.budget=")] + [f"run.budget={done_before + 4}"]
    again = subprocess.run(resumed, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    check_archive(run_dir, done_before + 4)


def test_ray_search_resumes_after_sigkill(micro_zoo, tmp_path):
    budget = 16
    run_dir = tmp_path / "killed"
    args = ["experiment=micro", f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run_dir}",
            f"run.budget={budget}", "cluster=ray", "cluster.num_workers=2", "run.dashboard=false"]
    kill_and_resume(args, run_dir, budget, kill_after=4, timeout=180)


@pytest.mark.parametrize("overrides, error, message", [
    (["cluster.mode=steady"], ConfigError, r"cluster.mode: 'steady' is not one of async, generational"),
    (["cluster.num_workers=0"], ConfigError, r"cluster.num_workers: must be at least 1"),
    (["cluster.backend=dask"], ConfigError, r"cluster.backend: 'dask' is not one of serial, ray"),
    (["cluster.num_workers=2", "cluster.gpus_per_worker=1"], SchedulerError, r"cluster.gpus_per_worker: 2 workers x 1 GPU need 2 GPUs, "
                                                    r"the local Ray has 0"),
    (["cluster.num_workers=2", "cluster.cpus_per_worker=4"], SchedulerError, r"cluster.cpus_per_worker: 2 workers x 4 CPU need 8 CPUs"),
])
def test_bad_cluster_configs_fail_before_any_evaluation(micro_zoo, tmp_path, local_ray, overrides, error, message):
    cmd = command(micro_zoo, tmp_path / "run", "run.budget=2", "cluster=ray", *overrides)
    with pytest.raises(error, match=message):
        run_search(cmd)
    assert _count(tmp_path / "run" / "archive.db") == 0


def test_serial_backend_refuses_more_workers(micro_zoo, tmp_path):
    with pytest.raises(ConfigError, match="cluster.num_workers: the serial backend runs 1 worker, got 2"):
        run_search(command(micro_zoo, tmp_path / "run", "cluster.num_workers=2"))
