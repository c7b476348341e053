"""Search throughput with Ray workers: 1 vs 2 workers, asynchronous vs generational dispatch.

What it measures: whole searches (``fuse_evo.search.run.run_search``, archive and checkpoints
included) of ``--candidates`` random-search candidates over the quickstart's space on a built
zoo (``--zoo``), one torch thread per worker, each schedule on its own run directory:

* ``serial``: the in-process worker (no Ray), the reference;
* ``ray x1``: one Ray worker, asynchronous;
* ``ray x2 async``: two Ray workers, a free worker gets the next candidate at once;
* ``ray x2 generational``: two Ray workers, a barrier after every pair (the slower one
  idles the other).

Unequal candidate costs: each candidate is scored ``1 + (id mod 3)`` times over (the real
evaluator, real CPU), so costs vary 1x to 3x in a fixed, schedule-independent pattern, as
generation lengths or methods make them vary in real searches.

Figures from the archive's worker timestamps: candidates per minute over the span from the
first candidate's start to the last one's finish (worker start-up reported apart), and the
idle fraction of the workers over that span, ``1 - sum(job seconds) / (workers x span)``.
Ratios are against ``ray x1`` measured in the same run; every schedule runs ``--rounds``
times, interleaved, and the median round is reported (a shared 2-core machine is noisy).

Sources: ``--sources-probe`` also times the two ways a worker can get the source models:
loading them from their paths (what the workers do) vs receiving them from Ray's object
store (``ray.put`` once, ``ray.get`` in the actor).

    python bench/scheduler_bench.py --zoo runs/zoo-tiny --candidates 60 --sources-probe \
        --probe-models /tmp/mb_full/base /tmp/mb_full/expert0 /tmp/mb_full/expert1 /tmp/mb_full/expert2

(the 134M models from ``python bench/merge_bench.py --workdir /tmp/mb_full``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuse_evo.search.archive import Archive  # noqa: E402
from fuse_evo.search.scheduler import SerialScheduler  # noqa: E402
from fuse_evo.search.worker import Job, Result, Worker  # noqa: E402


class UnequalWorker(Worker):
    """The real worker, scoring candidate ``id`` ``1 + id % 3`` times (costs 1x, 2x, 3x)."""

    def run(self, job: Job) -> Result:
        result = super().run(job)
        for _ in range(job.candidate_id % 3):
            self.evaluator.score()
        result.finished = time.time()
        return result


def compose(overrides: list[str]):
    from fuse_evo.config import compose as compose_command

    return compose_command("search", overrides)


def measure(name: str, overrides: list[str], workdir: Path, factory) -> dict:
    from fuse_evo.search.run import run_search

    run_dir = workdir / name.replace(" ", "_")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = compose(overrides + [f"run.dir={run_dir}"])
    t0 = time.perf_counter()
    run_search(cmd, scheduler_factory=(lambda spec: factory(spec, cmd)))
    wall = time.perf_counter() - t0
    with Archive.open(run_dir) as archive:
        trials = [t for t in archive.trials() if t.status == "complete"]
    start, end = min(t.started for t in trials), max(t.finished for t in trials)
    span = end - start
    workers = sorted({t.worker for t in trials})
    job = sum(t.finished - t.started for t in trials)
    n_workers = cmd.cluster.num_workers
    return {"schedule": name, "workers": n_workers, "candidates": len(trials), "span_s": round(span, 2),
            "wall_s": round(wall, 2), "startup_s": round(wall - span, 2),
            "per_minute": round(60 * len(trials) / span, 1), "idle_fraction": round(1 - job / (n_workers * span), 4),
            "mean_job_s": round(job / len(trials), 3), "distinct_workers": len(workers)}


def sources_probe(zoo_models: dict) -> dict:
    """Seconds for an actor to get the sources: from their paths vs from the object store."""
    import ray
    import torch

    @ray.remote(num_cpus=1)
    class Probe:
        def from_paths(self, folders):
            from safetensors.torch import load_file

            t0 = time.perf_counter()
            tensors = [t for f in folders for p in sorted(Path(f).glob("*.safetensors")) for t in load_file(p).values()]
            return time.perf_counter() - t0, sum(t.numel() for t in tensors)

        def from_store(self, refs):
            t0 = time.perf_counter()
            arrays = ray.get(refs[0])  # numpy views of the store's shared memory (bf16 travels as int16)
            tensors = {k: torch.from_numpy(v).view(torch.bfloat16) if v.dtype.name == "int16" else torch.from_numpy(v)
                       for k, v in arrays.items()}
            return time.perf_counter() - t0, sum(t.numel() for t in tensors.values())

    from safetensors.torch import load_file

    base, sources = zoo_models["base"], zoo_models["sources"]
    probe = Probe.remote()
    paths_s, n = ray.get(probe.from_paths.remote([base, *sources.values()]))
    arrays = {}
    for i, folder in enumerate([base, *sources.values()]):
        for f in sorted(Path(folder).glob("*.safetensors")):
            arrays.update({f"{i}.{k}": (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy()
                           for k, v in load_file(f).items()})
    t0 = time.perf_counter()
    ref = ray.put(arrays)
    put_s = time.perf_counter() - t0
    store_s, m = ray.get(probe.from_store.remote([ref]))
    return {"from_paths_s": round(paths_s, 3), "object_store_put_s": round(put_s, 3),
            "object_store_get_s": round(store_s, 3), "same_numel": n == m,
            "bytes": int(sum(a.nbytes for a in arrays.values()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, required=True, help="a built zoo (fuse-evo zoo zoo=tiny zoo.out_dir=DIR)")
    parser.add_argument("--zoo-config", default="zoo_tiny", help="the models group the zoo was built with")
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3,
                        help="each schedule runs this many times, interleaved; the median round is reported")
    parser.add_argument("--sources-probe", action="store_true")
    parser.add_argument("--probe-models", type=Path, nargs="+", default=None,
                        help="model folders for the sources probe (default: the zoo's base and specialists), "
                        "e.g. bench/merge_bench.py's 134M models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scheduler_bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from fuse_evo.search.ray_scheduler import RayScheduler

    base = [f"models={args.zoo_config}", f"models.zoo.out_dir={args.zoo.resolve()}", "space=ta_per_layer",
            "strategy=random", f"run.budget={args.candidates}", "run.progress=false", "run.dashboard=false",
            "run.threads=1"]
    workdir = Path(tempfile.mkdtemp(prefix="scheduler_bench."))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)  # shared by the Ray schedules
    rows = []
    try:
        def ray_factory(spec, cmd):
            return RayScheduler(spec, cmd.cluster, worker_class=UnequalWorker)

        schedules = [
            ("serial", [], lambda spec, cmd: SerialScheduler(spec, UnequalWorker)),
            ("ray x1", ["cluster=ray", "cluster.num_workers=1"], ray_factory),
            ("ray x2 async", ["cluster=ray", "cluster.num_workers=2"], ray_factory),
            ("ray x2 generational", ["cluster=ray", "cluster.num_workers=2", "cluster.mode=generational"], ray_factory),
        ]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in schedules}
        for r in range(args.rounds):  # interleaved, so a change of machine load hits every schedule
            for name, extra, factory in schedules:
                runs[name].append(measure(name, base + extra, workdir / f"round{r}", factory))
        for name, measured in runs.items():
            measured.sort(key=lambda row: row["per_minute"])
            rows.append({**measured[len(measured) // 2], "rounds_per_minute": [m["per_minute"] for m in measured]})
        probe = None
        if args.sources_probe:
            cmd = compose(base + [f"run.dir={workdir / 'probe'}"])
            from fuse_evo.search.plan import resolve_models

            if args.probe_models:
                folders = [str(p) for p in args.probe_models]
                probe = sources_probe({"base": folders[0], "sources": {str(i): f for i, f in enumerate(folders[1:])}})
            else:
                m = resolve_models(cmd.models, progress=False)
                probe = sources_probe({"base": m.base, "sources": m.sources})
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    one = next(r for r in rows if r["schedule"] == "ray x1")
    print(f"{args.candidates} candidates (costs 1x/2x/3x), {os.cpu_count()} CPUs, one torch thread per worker, "
          f"median of {args.rounds} rounds\n")
    print(f"{'schedule':<22}{'cand/min':>10}{'vs ray x1':>11}{'idle':>8}{'mean job s':>12}{'start-up s':>12}")
    for r in rows:
        r["vs_ray_x1"] = round(r["per_minute"] / one["per_minute"], 2)
        print(f"{r['schedule']:<22}{r['per_minute']:>10.1f}{r['vs_ray_x1']:>10.2f}x{100 * r['idle_fraction']:>7.1f}%"
              f"{r['mean_job_s']:>12.3f}{r['startup_s']:>12.1f}")
    if probe:
        print(f"\nsources to a worker ({probe['bytes'] / 2**20:.1f} MiB): from paths {probe['from_paths_s']:.3f} s; "
              f"object store put {probe['object_store_put_s']:.3f} s + get {probe['object_store_get_s']:.3f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "sources_probe": probe, "candidates": args.candidates, "rounds": args.rounds,
                                    "cpus": os.cpu_count(), "machine": platform.platform(),
                                    "load_average": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
