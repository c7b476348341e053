"""Per-candidate scoring: the vllm backend vs the hf backend, same candidates, one process.

What it measures (issue "Scoring with vLLM"):

* Candidates: the zoo's models (base and specialists) and their uniform task-arithmetic merge
  (``--lam``). Before each round the candidate's weights are copied into one live Hugging Face
  model in place (untimed, as the search's merge engine leaves them) and written from it into
  one running vLLM engine with ``VLLMEngine.write_model`` (timed: the weight update).
* Two task sets, each scored by both backends per candidate:

  - ``generation``: the zoo's ``generate_until`` held-out tasks (greedy, the task's stop
    sequence, the answer extracted by its regex filter);
  - ``loglikelihood``: the zoo's search tasks (loglikelihood and multiple choice).

* Each backend has one ``Evaluator`` per task set, built once (build times reported apart);
  per candidate ``score()``; the median over candidates after one untimed warm-up round.
* Engine start-up: ``VLLMEngine(base folder)`` once, timed.
* Agreement: per candidate and task, the two backends' primary metrics (equal in fp32; in bf16
  the backends' kernels round differently, so a few documents may flip).

Targets (the issue's): weight update <= 10% of a candidate's vllm scoring time; generation
scoring >= 3x faster than the hf backend (stated as a ratio).

Run it in the vLLM virtualenv (README, "Scoring with vLLM"), on a built smol zoo::

    python bench/vllm_bench.py --zoo runs/zoo-smol --dtype bfloat16
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_GEN_SPEEDUP = 3.0  # vllm generation scoring at least this many times faster than hf
TARGET_WEIGHT_SHARE = 0.10  # weight update at most this share of a candidate's vllm scoring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo-smol", help="a built zoo (its zoo.json, models/, tasks/)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--lam", type=float, default=0.25, help="the uniform task-arithmetic candidate's lambda")
    p.add_argument("--batch-size", type=int, default=32, help="the hf backend's batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_bench.json"))
    return p.parse_args(argv)


def task_sets(manifest: dict) -> dict[str, list[str]]:
    """{"generation": the generate_until held-out tasks, "loglikelihood": the search tasks}."""
    gen = [by[k] for by in manifest["tasks"].values() for k in ("gen_heldout", "generate_heldout") if k in by]
    ll = [by[k] for by in manifest["tasks"].values() for k in ("search", "mc_search") if k in by]
    if not gen:
        raise SystemExit(f"zoo {manifest.get('name')!r} has no generate_until held-out task")
    return {"generation": gen, "loglikelihood": ll}


def candidates(manifest: dict, lam: float) -> dict[str, dict[str, torch.Tensor]]:
    """The zoo's models' fp32 states and their uniform task-arithmetic merge."""
    from safetensors.torch import load_file

    from fuse_evo.models import SAFETENSORS

    states = {n: load_file(str(Path(m["path"]) / SAFETENSORS)) for n, m in manifest["models"].items()}
    base = states["base"]
    experts = [s for n, s in states.items() if n != "base"]
    states[f"task_arithmetic x{lam:g}"] = {
        k: (v.float() + lam * sum(e[k].float() - v.float() for e in experts)).to(v.dtype) for k, v in base.items()}
    return states


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse_evo.evaluate.evaluator import Evaluator, primary_metrics
    from fuse_evo.evaluate.vllm_lm import VLLMEngine

    zoo = Path(args.zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    sets = task_sets(manifest)
    base_dir = Path(manifest["models"]["base"]["path"])
    dtype = getattr(torch, args.dtype)
    states = candidates(manifest, args.lam)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    primary = primary_metrics([t for ts in sets.values() for t in ts], [manifest["task_dir"]])
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    engine = VLLMEngine(base_dir, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb)
    start_s = time.perf_counter() - t0
    print(f"vLLM engine start: {start_s:.1f} s", file=sys.stderr)

    evaluators, build_s = {}, {}
    for backend, lm in (("hf", model), ("vllm", engine)):
        for kind, tasks in sets.items():
            ev = Evaluator(lm, tok, tasks, include_path=manifest["task_dir"], batch_size=args.batch_size)
            evaluators[backend, kind], build_s[f"{backend} {kind}"] = ev, ev.build_seconds

    seconds: dict[str, list[float]] = {f"{b} {k}": [] for b, k in evaluators}
    weight_s: list[float] = []
    rounds: list[dict] = []
    names = list(states)
    for rnd in range(len(names) + 1):  # round 0 warms up on the first candidate, untimed
        name = names[(rnd - 1) % len(names)] if rnd else names[0]
        with torch.no_grad():  # not strict: the tied head is not in the checkpoint
            missing, unexpected = model.load_state_dict(states[name], strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        w = engine.write_model(model)
        row: dict = {"candidate": name, "weights_s": w, "seconds": {}, "metrics": {}}
        for (backend, kind), ev in evaluators.items():
            scores = ev.score()
            row["seconds"][f"{backend} {kind}"] = scores.seconds
            for task, (metric, _) in primary.items():
                if task in scores.results:
                    row["metrics"].setdefault(task, {})[backend] = scores.results[task][metric]
        if rnd:
            weight_s.append(w)
            for k, v in row["seconds"].items():
                seconds[k].append(v)
            rounds.append(row)
        print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {name}: weights {w:.2f} s, "
              + ", ".join(f"{k} {v:.2f} s" for k, v in row["seconds"].items()), file=sys.stderr)
    engine.close()

    med = {k: median(v) for k, v in seconds.items()}
    vllm_total = med["vllm generation"] + med["vllm loglikelihood"]
    summary = {
        "median_s": med,
        "engine_start_s": start_s,
        "weight_update_median_s": median(weight_s),
        "generation_hf_over_vllm": med["hf generation"] / med["vllm generation"],
        "loglikelihood_hf_over_vllm": med["hf loglikelihood"] / med["vllm loglikelihood"],
        "candidate_hf_over_vllm": (med["hf generation"] + med["hf loglikelihood"]) / vllm_total,
        "weight_update_share_of_vllm_scoring": median(weight_s) / vllm_total,
        "max_metric_difference": max(abs(m["hf"] - m["vllm"]) for r in rounds for m in r["metrics"].values()),
        "metrics_equal_every_round": all(m["hf"] == m["vllm"] for r in rounds for m in r["metrics"].values()),
    }
    summary["meets_targets"] = {
        f"generation >= {TARGET_GEN_SPEEDUP:g}x faster": summary["generation_hf_over_vllm"] >= TARGET_GEN_SPEEDUP,
        f"weight update <= {TARGET_WEIGHT_SHARE:.0%} of scoring":
            summary["weight_update_share_of_vllm_scoring"] <= TARGET_WEIGHT_SHARE,
    }
    import vllm

    results = {
        "config": vars(args), "tasks": sets, "build_s": build_s, "summary": summary, "rounds": rounds,
        "documents": {kind: evaluators["hf", kind].n_docs for kind in sets},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "vllm": vllm.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(), "loadavg": [load_start, os.getloadavg()],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")

    n_gen = sum(evaluators["hf", "generation"].n_docs.values())
    n_ll = sum(evaluators["hf", "loglikelihood"].n_docs.values())
    print(f"\nper candidate (median of {len(rounds)} candidates, {args.dtype}, {args.threads} threads):")
    print(f"{'':28}{'hf':>10}{'vllm':>10}{'hf / vllm':>12}")
    for kind, n in (("generation", n_gen), ("loglikelihood", n_ll)):
        label = f"{kind} ({n} docs)"
        print(f"{label:28}{med['hf ' + kind]:>9.2f}s{med['vllm ' + kind]:>9.2f}s{med['hf ' + kind] / med['vllm ' + kind]:>11.2f}x")
    print(f"{'weight update (vllm)':28}{'':>10}{median(weight_s):>9.2f}s"
          f"{summary['weight_update_share_of_vllm_scoring']:>11.1%} of its scoring")
    print(f"{'engine start (once)':28}{'':>10}{start_s:>9.1f}s")
    print(f"metrics: largest |hf - vllm| {summary['max_metric_difference']:.3f}; "
          f"equal in every round: {summary['metrics_equal_every_round']}")
    for target, ok in summary["meets_targets"].items():
        print(f"target {target}: {'met' if ok else 'MISSED'}")
    if max(load_start[0], os.getloadavg()[0]) > args.threads + 0.5:
        print(f"warning: load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}: timings unreliable", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
