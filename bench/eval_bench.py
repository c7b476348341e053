"""Per-candidate scoring time: fuse_evo's Evaluator vs lm_eval.simple_evaluate vs a bare forward.

What it measures (one process, one live model, the same candidates for every peer):

* The zoo's models (``--zoo``: base and specialists) are the candidates: before each round
  their weights are copied into one live model in place, as the search's merge engine does
  (the copy is not timed). Every round scores that candidate with each peer in turn, so a
  change of machine load hits all peers alike; the median over ``--repeats`` rounds is
  reported, after one untimed warm-up round.
* Tasks: every task of the zoo's search split (``zoo.json``): loglikelihood, multiple-choice and
  generate_until (``--tasks`` to choose).
* Peers:

  - ``evaluator``: ``fuse_evo.evaluate.evaluator.Evaluator`` built once (its build time is
    reported apart), then ``score()`` per candidate.
  - ``simple_evaluate``: ``lm_eval.simple_evaluate`` per candidate, as a careful user calls it:
    ``TaskManager(include_path=..., include_defaults=False)`` and ``HFLM`` on the live model
    built once, ``bootstrap_iters=0``, no sample logging, no cache.
  - ``forward``: the floor. One bare batched forward pass (``model(input_ids)`` under
    ``torch.inference_mode``) over the token sequences the model reads for this candidate:
    every distinct loglikelihood input, and every generation prompt followed by the tokens
    generated for it. Same batch size, sequences sorted by length (minimal padding). It does
    no log-softmax and no incremental decoding, so it is a strict lower bound.

* Agreement: each round checks the evaluator's metrics equal simple_evaluate's.
* Output: a table on stdout, and a JSON (``--out``) with every raw timing, the evaluator's
  per-request-type breakdown, the tokens per call, versions, threads and load average.

Timings on a shared machine: with ``--threads 2`` on 2 cores any other busy process slows
torch's OpenMP regions many times over, for every peer; the ratios measured within one run are
what this reports. The JSON records the load average and the script warns when it was high.

Running it (the zoo from ``fuse-evo zoo zoo=tiny zoo.out_dir=/tmp/zoo-tiny``)::

    python bench/eval_bench.py --zoo /tmp/zoo-tiny --repeats 10
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval draws bars per task; tqdm reads this at import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_VS_SIMPLE = 3.0  # evaluator at least this many times faster than simple_evaluate
TARGET_VS_FLOOR = 2.0  # and within this factor of the bare forward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="/tmp/zoo-tiny", help="a built zoo (its zoo.json, models/, tasks/)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (candidates) per peer")
    p.add_argument("--split", default="search", choices=["search", "heldout"])
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all of the split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers", default="evaluator,simple_evaluate,forward")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_bench.json"))
    return p.parse_args(argv)


def split_tasks(manifest: dict, split: str) -> list[str]:
    names = []
    for by_kind in manifest["tasks"].values():
        for key in (split, f"mc_{split}", f"generate_{split}"):
            if key in by_kind:
                names.append(by_kind[key])
    return names


def bare_forward(model, sequences: list[list[int]], batch_size: int) -> float:
    """Seconds for one batched forward over ``sequences`` (sorted by length, right-padded)."""
    order = sorted(sequences, key=len, reverse=True)
    batches = []
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        x = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)
        for r, s in enumerate(chunk):
            x[r, : len(s)] = torch.tensor(s)
        batches.append(x.to(model.device))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def metrics(results: dict) -> dict:
    return {(t, k): v for t, row in results.items() for k, v in row.items() if "," in k and "_stderr" not in k}


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse_evo.evaluate.evaluator import Evaluator

    zoo = Path(args.zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    tasks = args.tasks.split(",") if args.tasks else split_tasks(manifest, args.split)
    peers = args.peers.split(",")
    names = list(manifest["models"])
    states = {n: AutoModelForCausalLM.from_pretrained(manifest["models"][n]["path"]).state_dict() for n in names}
    model = AutoModelForCausalLM.from_pretrained(manifest["models"][names[0]]["path"]).eval()
    tok = AutoTokenizer.from_pretrained(manifest["models"][names[0]]["path"])
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    evaluator = Evaluator(model, tok, tasks, include_path=manifest["task_dir"], batch_size=args.batch_size)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manager = TaskManager(include_path=manifest["task_dir"], include_defaults=False)
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    simple_setup_s = time.perf_counter() - t0

    samples: dict[str, list[float]] = {p: [] for p in peers}
    breakdown: list[dict] = []
    tokens: list[int] = []
    agree: list[bool] = []
    candidates: list[str] = []
    for rnd in range(args.repeats + 1):  # round 0 warms up, untimed
        name = names[rnd % len(names)]
        with torch.no_grad():
            model.load_state_dict(states[name])  # in place, as a merge into the live model
        ours = ref = None
        times = {}
        for peer in peers:
            if peer == "evaluator":
                scores = evaluator.score()
                dt, ours = scores.seconds, scores.results
                if rnd:
                    breakdown.append(scores.timings)
                    tokens.append(scores.tokens)
            elif peer == "simple_evaluate":
                with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # HFLM's progress bars
                    t0 = time.perf_counter()
                    out = lm_eval.simple_evaluate(model=hflm, tasks=tasks, task_manager=manager,
                                                  bootstrap_iters=0, log_samples=False, use_cache=None)
                    dt, ref = time.perf_counter() - t0, out["results"]
            elif peer == "forward":
                if "evaluator" not in peers:
                    raise SystemExit("the forward floor needs the evaluator peer (its token sequences)")
                dt = bare_forward(model, evaluator.token_sequences(), args.batch_size)
            else:
                raise SystemExit(f"unknown peer {peer!r}")
            times[peer] = dt
            if rnd:
                samples[peer].append(dt)
        if rnd:
            candidates.append(name)
            if ours is not None and ref is not None:
                agree.append(metrics(ours) == metrics(ref))
        print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {name}: "
              + ", ".join(f"{p} {times[p]:.3f} s" for p in peers), file=sys.stderr)

    med = {p: median(v) for p, v in samples.items()}
    summary = {"median_s": med}
    if med.get("evaluator") and med.get("simple_evaluate"):
        summary["simple_evaluate_over_evaluator"] = med["simple_evaluate"] / med["evaluator"]
    if med.get("evaluator") and med.get("forward"):
        summary["evaluator_over_forward"] = med["evaluator"] / med["forward"]
    summary["meets_targets"] = {
        f">= {TARGET_VS_SIMPLE:g}x faster than simple_evaluate": summary.get("simple_evaluate_over_evaluator", 0) >= TARGET_VS_SIMPLE,
        f"within {TARGET_VS_FLOOR:g}x of the bare forward": summary.get("evaluator_over_forward", 1e9) <= TARGET_VS_FLOOR,
    }
    summary["evaluator_breakdown_median_s"] = {k: median([b[k] for b in breakdown if k in b]) for k in (breakdown[0] if breakdown else {})}
    summary["metrics_agree_every_round"] = all(agree) if agree else None

    load_end = os.getloadavg()
    results = {
        "config": vars(args),
        "tasks": tasks,
        "output_types": evaluator.output_types,
        "documents": evaluator.n_docs,
        "requests": {k: len(v) for k, v in evaluator._requests.items()},
        "tokens_per_call": tokens[0] if tokens else None,
        "candidates": candidates,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "lm_eval": getattr(lm_eval, "__version__", "?")},
        "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                 "loadavg_start": load_start, "loadavg_end": load_end},
        "setup_s": {"evaluator_build": build_s, "simple_evaluate_taskmanager_and_hflm": simple_setup_s},
        "samples_s": samples,
        "evaluator_breakdown_s": breakdown,
        "metrics_agree": agree,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{len(tasks)} tasks ({', '.join(tasks)}); {sum(evaluator.n_docs.values())} documents, "
          f"{sum(results['requests'].values())} requests, {results['tokens_per_call']} tokens per call; "
          f"{n_params / 1e6:.2f}M-parameter model, {torch.get_num_threads()} threads, batch size {args.batch_size}")
    print(f"evaluator built once in {build_s:.2f} s\n")
    print(f"{'peer':<18}{'median s/candidate':>20}{'x evaluator':>13}{'x forward':>11}")
    for p in peers:
        x_ev = med[p] / med["evaluator"] if med.get("evaluator") else float("nan")
        x_fw = med[p] / med["forward"] if med.get("forward") else float("nan")
        print(f"{p:<18}{med[p]:>20.3f}{x_ev:>13.2f}{x_fw:>11.2f}")
    if summary["evaluator_breakdown_median_s"]:
        print("\nevaluator per call: " + ", ".join(f"{k} {v:.3f} s" for k, v in summary["evaluator_breakdown_median_s"].items()))
    for target, ok in summary["meets_targets"].items():
        print(f"target {target}: {'yes' if ok else 'NO'}")
    if agree:
        print(f"metrics equal to simple_evaluate's in every round: {'yes' if all(agree) else 'NO'}")
    print(f"load average {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} CPUs "
          "(another busy process slows every peer; the ratios within this run are what counts)")
    if max(load_start[0], load_end[0]) > args.threads + 0.5:
        print("warning: the machine was busy while measuring", file=sys.stderr)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
