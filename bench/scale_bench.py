"""LLM scale on one small machine: whole searches at 1.1B parameters, their peak memory, and
what a second worker costs.

What it measures (issue 17), on a TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers,
intermediate 5632, 32 heads, 4 KV heads, vocab 32000, bf16, random init) as base and 3
perturbed experts (``bench/merge_bench.py``'s builder; a ``--workdir`` with them is reused):

* ``search``: a whole ``fuse-evo search models=paths`` per space (a per-layer TIES space, then
  DARE-TIES; ``--candidates`` each) scored by the micro zoo's local lm-eval tasks
  (``--limit`` documents per task: these random models score ~0; the point is the memory and
  that the run completes). Peak RSS is the OS's accounting of the search process
  (``/usr/bin/time -v``: its maximum resident set, the memory-mapped sources' pages
  included), against the bound 1.15 x (N + 2) x the model's bytes (sources + base + live model).
* ``workers``: the same TIES search on ``cluster=ray`` with 1 and then 2 CPU workers; the sum of
  the workers' PSS (``/proc/PID/smaps_rollup``, shared pages split between the processes that
  map them), sampled every 0.5 s: the second worker should add at most the live model plus 10%.
  What it adds beyond the live model is set against a bare interpreter that has imported what
  a worker imports (its private bytes): the floor of any worker process.
* ``--merge``: ``bench/merge_bench.py`` at the same shape (per-candidate materialize time of
  task_arithmetic, ties, dare_ties, slerp against the bf16 roofline, first-use setup) and
  ``mergekit-yaml`` on the TIES config (time and peak RSS), as its own process.

    python bench/scale_bench.py --workdir /tmp/scale                  # ~30 min on 2 cores
    python bench/scale_bench.py --workdir /tmp/scale --merge          # + merge_bench at 1.1B

Prints a table and writes ``--out`` (JSON) with every figure and command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPE = ["--hidden", "2048", "--layers", "22", "--intermediate", "5632", "--heads", "32", "--kv-heads", "4",
         "--vocab", "32000"]
SPACES = {  # a per-layer TIES space, then DARE-TIES (per layer, density shared by the models)
    "ties": ["space=ties_per_block", "space.granularity.layers_per_block=1"],
    "dare_ties": ["space=dare_ties"],
}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def build(workdir: Path) -> tuple[dict[str, Path], Path]:
    """The 1.1B base and experts (merge_bench's builder) and the micro zoo's task folder."""
    import merge_bench

    args = merge_bench.parse_args(SHAPE + ["--workdir", str(workdir)])
    folders = merge_bench.build_models(args, workdir)
    from fuse_evo.config import compose
    from fuse_evo.zoo.build import build_zoo

    zoo = compose("zoo", ["zoo=micro", f"zoo.out_dir={workdir / 'zoo'}"]).zoo
    manifest = build_zoo(zoo, progress=False)
    return folders, Path(manifest["task_dir"])


def search_args(folders: dict[str, Path], tasks: Path, space: list[str], run_dir: Path, candidates: int,
                limit: int, extra: list[str]) -> list[str]:
    sources = [f"+models.sources.{n}={p}" for n, p in folders.items() if n != "base"]
    return [sys.executable, "-m", "fuse_evo.cli", "search", "models=paths", f"models.base={folders['base']}",
            *sources, *space, "strategy=random", f"run.budget={candidates}", f"run.dir={run_dir}",
            "run.overwrite=true", "run.dashboard=false", "run.progress=false", f"evaluator.include_path=[{tasks}]",
            f"evaluator.limit={limit}", "evaluator.batch_size=8", *extra]


def timed_search(cmd: list[str], log: Path) -> dict:
    """The command under /usr/bin/time -v: wall seconds, exit status, peak RSS (bytes)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, **ENV}, cwd=ROOT).returncode
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
            "cmd": cmd, "log": str(log)}


def _pss(pid: int, field: str = "Pss") -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


IMPORTS = ("import torch, transformers, ray, lm_eval, lm_eval.tasks, lm_eval.models.huggingface; "
           "import fuse_evo.search.worker, fuse_evo.evaluate.evaluator, fuse_evo.merge.live, fuse_evo.models")


def import_floor() -> int:
    """Private (anonymous) bytes of a bare interpreter that has imported what a worker imports:
    what any worker process holds before its first model byte."""
    code = f"{IMPORTS}; import os, re; print(open(f'/proc/{{os.getpid()}}/smaps_rollup').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **ENV}).stdout
    m = re.search(r"^Pss_Anon:\s+(\d+) kB", out, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def _workers() -> list[int]:
    """PIDs of Ray worker processes running our actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "_WorkerActor" in cmdline:
                pids.append(int(entry.name))
    return pids


def workers_pss(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (a Ray search) and sample the summed PSS of its worker actors every 0.5 s."""
    peak = {"sum": 0, "per_worker": {}, "anon_per_worker": {}}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = _workers()
            values = {pid: _pss(pid) for pid in pids}
            if sum(values.values()) > peak["sum"]:
                peak["sum"] = sum(values.values())
                peak["per_worker"] = {str(k): v for k, v in values.items()}
                peak["anon_per_worker"] = {str(k): _pss(k, "Pss_Anon") for k in pids}
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = timed_search(cmd, log)
    done.set()
    thread.join()
    return {**result, "peak_pss_sum_bytes": peak["sum"], "peak_pss_per_worker": peak["per_worker"],
            "peak_anon_per_worker": peak["anon_per_worker"]}


def trials(run_dir: Path) -> dict:
    from fuse_evo.search.archive import Archive

    with Archive.open(run_dir) as archive:
        rows = archive.trials()
    return {"trials": len(rows), "complete": sum(t.status == "complete" for t in rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/scale")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--limit", type=int, default=4, help="documents per task per candidate")
    p.add_argument("--worker-candidates", type=int, default=4)
    p.add_argument("--parts", default="search,workers", help="search, workers (comma separated)")
    p.add_argument("--merge", action="store_true", help="also run merge_bench.py at this shape (+ mergekit-yaml)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_bench.json"))
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folders, tasks = build(workdir)
    model_bytes = sum(f.stat().st_size for f in folders["base"].glob("*.safetensors"))
    n = len(folders) - 1
    bound = 1.15 * (n + 2) * model_bytes
    results: dict = {"model_bytes": model_bytes, "experts": n, "rss_bound_bytes": bound, "searches": {},
                     "workers": {}}
    parts = set(args.parts.split(","))
    if "search" in parts:
        for name, space in SPACES.items():
            run = workdir / f"run_{name}"
            r = timed_search(search_args(folders, tasks, space, run, args.candidates, args.limit, []),
                             workdir / f"search_{name}.log")
            r.update(trials(run) if r["rc"] == 0 else {})
            results["searches"][name] = r
            print(f"[search] {name}: rc {r['rc']}, {r.get('complete')} of {r.get('trials')} complete, "
                  f"{r['wall_s']:.0f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"(bound {bound / 1e9:.2f} GB: {'ok' if r['peak_rss_bytes'] <= bound else 'OVER'})", flush=True)
    if "workers" in parts:
        for count in (1, 2):
            run = workdir / f"run_ray{count}"
            extra = ["cluster=ray", f"cluster.num_workers={count}", "cluster.cpus_per_worker=1", "cluster.num_cpus=2"]
            r = workers_pss(search_args(folders, tasks, SPACES["ties"], run, args.worker_candidates, args.limit, extra),
                            workdir / f"ray{count}.log")
            results["workers"][str(count)] = r
            print(f"[workers] {count}: rc {r['rc']}, peak PSS sum {r['peak_pss_sum_bytes'] / 1e9:.2f} GB "
                  f"({len(r['peak_pss_per_worker'])} workers sampled)", flush=True)
        one, two = (results["workers"][k]["peak_pss_sum_bytes"] for k in ("1", "2"))
        live = model_bytes  # the live model in the base's dtype
        results["second_worker_adds_bytes"] = two - one
        results["second_worker_bound_bytes"] = 1.1 * live
        results["import_floor_bytes"] = floor = import_floor()
        anon = list(results["workers"]["2"]["peak_anon_per_worker"].values())
        print(f"[workers] the second worker adds {(two - one) / 1e9:.2f} GB (bound: live model + 10% = "
              f"{1.1 * live / 1e9:.2f} GB: {'ok' if two - one <= 1.1 * live else 'OVER'}); of it the live model "
              f"{live / 1e9:.2f} GB and {(two - one - live) / 1e9:.2f} GB of process, of which "
              f"{floor / 1e9:.2f} GB is a bare interpreter's imports (torch, transformers, Ray, lm-eval); "
              f"private memory per worker: {', '.join(f'{a / 1e9:.2f}' for a in anon)} GB", flush=True)
    if args.merge:
        shape = SHAPE + ["--workdir", str(workdir)]
        merge_json, yaml_json = workdir / "merge_bench.json", workdir / "mergekit_yaml.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "merge_bench.py"), *shape, "--candidates", "5",
                        "--peers", "fuse_evo,roofline", "--out", str(merge_json)], check=False, cwd=ROOT)
        subprocess.run([sys.executable, str(ROOT / "bench" / "merge_bench.py"), *shape, "--candidates", "1",
                        "--methods", "ties", "--peers", "mergekit_yaml", "--out", str(yaml_json)], check=False, cwd=ROOT)
        results["merge_bench"] = json.loads(merge_json.read_text()).get("summary") if merge_json.exists() else None
        results["mergekit_yaml"] = (json.loads(yaml_json.read_text()).get("timings", {}).get("ties")
                                    if yaml_json.exists() else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
