"""Per-candidate merge materialization time: fuse_evo vs mergekit vs the memory roofline.

What it measures (one process, one set of models, the same genes for every peer):

* A random-init Llama (bf16, ~134M parameters with the defaults) is the base; 3 perturbed copies
  are the experts. All four are written once as HF safetensors folders (with a small tokenizer,
  so ``mergekit-yaml`` has one to copy) under ``--workdir`` (a temp dir by default; a workdir
  with matching models is reused).
* ``--candidates`` candidates per method, each with its own genes drawn from a seeded RNG:
  per-layer, per-expert ``weight`` (task_arithmetic, ties, dare_ties), plus ``density``
  (ties, dare_ties), or a per-layer ``t`` (slerp, base <-> expert 0). Embeddings, final norm
  and head take the candidate's ``"*"`` values. Every candidate draws DARE's masks with one
  seed (``--seed``), as a search's candidates do (the space's seed: common random numbers).
* Peers (``--peers``):

  - ``fuse_evo``: ``ModelPool`` + ``MergeEngine`` + a bf16 live model built once (timed as
    setup), then ``engine.materialize(recipe, into=live)`` per candidate. ``--warmup`` (2)
    warm-up candidates per method are timed apart (``first_call_s``: compilation and the
    one-time tables: ties' magnitude histograms on the first, DARE's kept-norm tables on the
    second, when its streams come back) and not counted in the median.
  - ``roofline``: the least any merge of these models can do: per tensor one compiled
    elementwise pass that reads the base and the experts in bf16 and writes the bf16 live
    model, with candidate genes as weights. Method-independent, so it runs once; the
    reference of every ratio.
  - ``mergekit_api``: mergekit 0.1.5's resident in-memory entry point,
    ``mergekit.merge_methods.merge_state_dicts(models, method, parameters=..., base=...)``,
    on the bf16 state dicts already in memory (the very tensors the ModelPool loaded).
    Per-tensor genes go in as ``PerGroupValues`` (one ``{model_id: value}`` per tensor);
    it returns a new dict of merged tensors (no copy into a live model is timed).
  - ``mergekit_yaml``: the ``mergekit-yaml`` CLI as a subprocess, one run per method
    (the last candidate's genes as ``filter:``-conditional parameters), wall time including process
    start, loading and writing the merged folder; peak RSS of the child (``ru_maxrss`` of its
    children, read by a small wrapper process so our own RSS is not inherited).

* Output: a table (method x peer: median seconds, ratio to the roofline, fuse_evo vs the
  mergekit API) on stdout, and a JSON (``--out``) with every raw timing, the genes, config,
  versions, load average, peak RSS per phase (sampled every 5 ms) and for the whole process,
  and agreement checks: fuse_evo re-materializes (untimed) the candidate mergekit merged last
  and reports ``||fuse - mergekit|| / ||mergekit - base||`` (not for dare_ties: different RNGs).

Timings on a shared machine: with ``--threads 2`` on 2 cores, any other busy process makes
torch's OpenMP regions wait for a descheduled thread (seen here: 10-60x slower for every peer
alike); the JSON records the load average and the script warns. ``--threads 1`` is steadier.

Running it
----------
Any venv with fuse_evo importable runs it; the mergekit peers need mergekit in the same venv
and are skipped with a message when it does not import (``--peers fuse_evo,roofline`` skips
them on purpose)::

    python bench/merge_bench.py --hidden 256 --layers 2 --peers fuse_evo,roofline

Full comparison: the project's test environment has both fuse_evo and mergekit
(``pip install -e ".[test]"``)::

    python bench/merge_bench.py                                       # ~134M, 10 candidates
    python bench/merge_bench.py --hidden 256 --layers 2 --intermediate 688 \
        --vocab 4096 --candidates 3                                   # smoke run, < 1 min
    # what produced bench/results/merge_bench.json (~10 min on 2 cores, peak RSS ~8 GiB):
    python bench/merge_bench.py --candidates 10 --mergekit-candidates 3 \
        --mergekit-warmup 0 --workdir /tmp/mb_full

``mergekit-yaml`` is looked up next to the interpreter, then on PATH (``--mergekit-yaml`` to
override). ``--profile`` profiles one extra fuse_evo materialize per method with cProfile
(Python functions) and torch.profiler (ATen ops); both tables go to the JSON and stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing fuse_evo
    sys.path.insert(0, str(ROOT))

ALL_METHODS = ("task_arithmetic", "ties", "dare_ties", "slerp")
ALL_PEERS = ("fuse_evo", "roofline", "mergekit_api", "mergekit_yaml")
TARGETS = {"task_arithmetic": 2.0, "ties": 2.0, "dare_ties": 2.0, "slerp": 2.0}  # x roofline (issue 17)
N_EXPERTS = 3
LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class RssMonitor:
    """Samples this process's RSS every few ms; ``phase(name)`` records the peak inside it."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.phases: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    @contextmanager
    def phase(self, name: str):
        start = _rss_bytes()
        self.peak = start
        try:
            yield
        finally:
            end = _rss_bytes()
            peak = max(self.peak, end)
            self.phases[name] = {
                "rss_start_mib": start / 2**20,
                "rss_peak_mib": peak / 2**20,
                "rss_end_mib": end / 2**20,
                "peak_over_start_mib": (peak - start) / 2**20,
            }

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- models
def build_models(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    """Base + N_EXPERTS perturbed copies as safetensors folders (reused when they match)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {
        "hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
        "vocab": args.vocab, "heads": args.heads, "kv_heads": args.kv_heads, "experts": N_EXPERTS, "seed": args.seed,
        "noise": args.noise, "dtype": "bfloat16",
    }
    names = ["base"] + [f"expert{i}" for i in range(N_EXPERTS)]
    folders = {n: workdir / n for n in names}
    meta = workdir / "bench_models.json"
    if meta.exists() and json.loads(meta.read_text()) == spec and all(
        (f / "model.safetensors").exists() or (f / "model.safetensors.index.json").exists()
        for f in folders.values()
    ):
        print(f"[models] reusing {workdir}", flush=True)
        return folders

    from fuse_evo.zoo.tokenizer import build_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    tokenizer = build_tokenizer()  # 70-odd tokens <= vocab rows: fine for ModelPool and mergekit
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for name, folder in folders.items():
        if name != "base":
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    b = base_state[key].float()
                    scale = float(b.std()) if b.numel() > 1 and float(b.std()) > 0 else 0.02
                    noise = torch.randn(b.shape, generator=gen) * (args.noise * scale)
                    param.copy_((b + noise).to(param.dtype))
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    meta.write_text(json.dumps(spec))
    n = sum(t.numel() for t in base_state.values())
    print(f"[models] wrote base + {N_EXPERTS} experts ({n / 1e6:.1f}M params, bf16) to {workdir} "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return folders


# ---------------------------------------------------------------------------- genes
def group_of(tensor: str) -> str:
    m = LAYER.search(tensor)
    return f"layers.{m.group(2)}" if m else "*"


def draw_genes(method: str, layers: int, experts: list[str], rng: random.Random) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {model: {param: value}}}, groups "*" and layers.<i>: one candidate."""
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for g in ["*"] + [f"layers.{i}" for i in range(layers)]:
        if method == "slerp":
            groups[g] = {experts[0]: {"t": round(rng.uniform(0.05, 0.95), 4)}}
            continue
        per: dict[str, dict[str, float]] = {}
        for e in experts:
            p = {"weight": round(rng.uniform(0.1, 1.0), 4)}
            if method in ("ties", "dare_ties"):
                p["density"] = round(rng.uniform(0.2, 0.9), 4)
            per[e] = p
        groups[g] = per
    return groups


def candidate_genes(args: argparse.Namespace, method: str, experts: list[str]) -> list[dict]:
    rng = random.Random(f"{args.seed}:{method}")
    n = max(args.warmup + args.candidates, args.mergekit_warmup + args.mergekit_candidates)
    return [draw_genes(method, args.layers, experts, rng) for _ in range(n)]


def method_models(method: str, experts: list[str]) -> list[str]:
    return experts[:1] if method == "slerp" else list(experts)


def gene_value(genes: dict, tensor: str, model: str, param: str) -> float:
    return genes[group_of(tensor)][model][param]


# ---------------------------------------------------------------------------- peers
def fuse_recipe(method: str, genes: dict, experts: list[str], seed: int):
    from fuse_evo.recipe import Recipe

    params = {} if method == "slerp" else {"lambda": 1.0}
    return Recipe(method, models=tuple(method_models(method, experts)), parameters=params,
                  groups=genes, seed=seed)


def time_calls(fn: Callable[[int], Any], n_warm: int, n: int) -> tuple[list[float], list[float]]:
    warm, timed = [], []
    for i in range(n_warm + n):
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        (warm if i < n_warm else timed).append(dt)
    return warm, timed


class Roofline:
    """The least any merge of these models can do: per tensor, one compiled elementwise pass
    that reads the base and the N experts in their own dtype (bf16), combines them with the
    candidate's weights in fp32 and writes the result into the bf16 live model."""

    def __init__(self, engine, experts: list[str]):
        self.names = list(engine.base)
        self.base = engine.base
        self.sources = {k: [engine.source(e, k) for e in experts] for k in self.names}
        self.kernel = torch.compile(_roofline_pass, dynamic=True)

    @property
    def nbytes(self) -> int:
        """Bytes read per candidate (the written bytes are one more model in bf16)."""
        return sum(t.numel() * t.element_size() for k in self.names for t in [self.base[k], *self.sources[k]])

    @torch.no_grad()
    def run(self, weights: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        for k in self.names:
            self.kernel(targets[k].view(-1), self.base[k], self.sources[k], weights[k])


def _roofline_pass(out: torch.Tensor, base: torch.Tensor, sources: list[torch.Tensor], w: torch.Tensor) -> None:
    acc = base.float() * w[0]
    for i, source in enumerate(sources):
        acc = acc + source.float() * w[i + 1]
    out.copy_(acc.to(out.dtype))


def mergekit_params(method: str, genes: dict, tensor_names: list[str], experts: list[str]) -> dict:
    from mergekit.merge_methods import PerGroupValues

    if method == "slerp":
        return {"t": PerGroupValues([gene_value(genes, k, experts[0], "t") for k in tensor_names])}
    out = {"weight": PerGroupValues([{e: gene_value(genes, k, e, "weight") for e in experts}
                                     for k in tensor_names])}
    if method in ("ties", "dare_ties"):
        out["density"] = PerGroupValues([{e: gene_value(genes, k, e, "density") for e in experts}
                                         for k in tensor_names])
    return out


def mergekit_yaml_config(method: str, genes: dict, folders: dict[str, Path], experts: list[str], layers: int) -> dict:
    """The same genes as ``filter:``-conditional parameters (``layers.<i>.`` then a default)."""
    def setting(model: str, param: str) -> list[dict]:
        conds = [{"filter": f"layers.{i}.", "value": genes[f"layers.{i}"][model][param]} for i in range(layers)]
        return conds + [{"value": genes["*"][model][param]}]

    cfg: dict[str, Any] = {"merge_method": method, "base_model": str(folders["base"]), "dtype": "bfloat16"}
    if method == "slerp":
        cfg["models"] = [{"model": str(folders["base"])}, {"model": str(folders[experts[0]])}]
        cfg["parameters"] = {"t": setting(experts[0], "t")}
    else:
        models = []
        for e in experts:
            params = {"weight": setting(e, "weight")}
            if method in ("ties", "dare_ties"):
                params["density"] = setting(e, "density")
            models.append({"model": str(folders[e]), "parameters": params})
        cfg["models"] = models
        cfg["parameters"] = {"lambda": 1.0}
    return cfg


_WAIT_CHILD = (
    "import json, resource, subprocess, sys, time\n"
    "t0 = time.perf_counter(); rc = subprocess.call(sys.argv[2:])\n"
    "dt = time.perf_counter() - t0\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'wall_s': dt, 'maxrss_kib': ru.ru_maxrss}))\n"
)


def run_process(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, int, int]:
    """Wall seconds, exit status and peak RSS (bytes) of one child process.

    The command runs under a small Python parent that reports its children's ``ru_maxrss``:
    a child forked straight from this (large) process would inherit our RSS high-water mark.
    The wall time is the one measured inside that parent (process start to exit).
    """
    report = log.with_suffix(".rusage.json")
    with open(log, "wb") as fh:
        subprocess.run([sys.executable, "-c", _WAIT_CHILD, str(report), *cmd], stdout=fh,
                       stderr=subprocess.STDOUT, env={**os.environ, **env}, check=False)
    r = json.loads(report.read_text())
    return r["wall_s"], r["rc"], r["maxrss_kib"] * 1024


def agreement(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
              base: dict[str, torch.Tensor]) -> dict[str, float]:
    """||a - b|| / ||b - base|| over the whole model: 0 = same merge; bf16 rounding ~1e-2."""
    num = den = 0.0
    worst = 0.0
    for k, ref in reference.items():
        a, b, z = merged[k].float(), ref.float(), base[k].float()
        num += float((a - b).pow(2).sum())
        den += float((b - z).pow(2).sum())
        worst = max(worst, float((a - b).abs().max()))
    return {"rel_l2_vs_merge_delta": (num ** 0.5) / max(den ** 0.5, 1e-30), "max_abs_diff": worst}


def profile_call(fn: Callable[[], Any], top: int = 15) -> str:
    """cProfile (Python functions, by own time) and torch.profiler (ATen ops, by self CPU time)
    of one call."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        fn()
    ops = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"== cProfile ==\n{s.getvalue()}\n== torch.profiler ==\n{ops}"


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden/64)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--mergekit-candidates", type=int, default=None,
                   help="candidates for the mergekit API peer (default --candidates; its ties is slow)")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up candidates per method, timed apart from the median (first-use setup)")
    p.add_argument("--mergekit-warmup", type=int, default=None, help="warm-up candidates for the mergekit API (default --warmup)")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--peers", default=",".join(ALL_PEERS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge_bench.json"))
    p.add_argument("--workdir", default=None, help="model folders (default: a temp dir, deleted after)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.1, help="expert perturbation, x each tensor's std")
    p.add_argument("--mergekit-yaml", default=None, help="path of the mergekit-yaml executable")
    p.add_argument("--profile", action="store_true", help="cProfile one fuse_evo materialize per method")
    args = p.parse_args(argv)
    args.heads = args.heads or max(1, args.hidden // 64)
    args.kv_heads = args.kv_heads or args.heads
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"--methods: unknown {m!r} (known: {', '.join(ALL_METHODS)})")
    for x in args.peers:
        if x not in ALL_PEERS:
            p.error(f"--peers: unknown {x!r} (known: {', '.join(ALL_PEERS)})")
    if args.mergekit_candidates is None:
        args.mergekit_candidates = args.candidates
    if args.mergekit_warmup is None:
        args.mergekit_warmup = args.warmup
    return args


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mon = RssMonitor()
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "platform": platform.platform(), "loadavg_start": os.getloadavg()},
        "timings": {}, "setup": {}, "skipped": {}, "agreement": {}, "profiles": {},
    }
    import transformers

    results["versions"]["transformers"] = transformers.__version__

    # ------------------------------------------------------------------ mergekit available?
    mergekit = None
    if {"mergekit_api", "mergekit_yaml"} & set(args.peers):
        try:
            import mergekit  # noqa: F811
            from mergekit.merge_methods import merge_state_dicts  # noqa: F401

            from importlib.metadata import version

            results["versions"]["mergekit"] = version("mergekit")
        except Exception as e:  # noqa: BLE001
            msg = (f"mergekit is not importable in {sys.executable} ({type(e).__name__}: {e}); "
                   "run with a venv that has both (e.g. /tmp/mkvenv/bin/python) for these peers")
            print(f"[skip] mergekit_api, mergekit_yaml: {msg}", flush=True)
            for x in ("mergekit_api", "mergekit_yaml"):
                if x in args.peers:
                    results["skipped"][x] = msg
            args.peers = [x for x in args.peers if x not in ("mergekit_api", "mergekit_yaml")]
    yaml_exe = None
    if "mergekit_yaml" in args.peers:
        yaml_exe = args.mergekit_yaml or (
            str(Path(sys.executable).with_name("mergekit-yaml"))
            if Path(sys.executable).with_name("mergekit-yaml").exists() else shutil.which("mergekit-yaml")
        )
        if not yaml_exe:
            msg = "no mergekit-yaml executable next to the interpreter or on PATH (--mergekit-yaml)"
            print(f"[skip] mergekit_yaml: {msg}", flush=True)
            results["skipped"]["mergekit_yaml"] = msg
            args.peers.remove("mergekit_yaml")
    results["mergekit_yaml_exe"] = yaml_exe

    # ------------------------------------------------------------------ models
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="merge_bench_")
        workdir = Path(tmp.name)
    try:
        with mon.phase("build_models"):
            folders = build_models(args, workdir)
        experts = [f"expert{i}" for i in range(N_EXPERTS)]

        from fuse_evo.merge.engine import MergeEngine
        from fuse_evo.models import ModelPool

        t0 = time.perf_counter()
        with mon.phase("setup_pool"):
            pool = ModelPool(folders["base"], {e: folders[e] for e in experts})
        results["setup"]["pool_load_s"] = time.perf_counter() - t0
        n_params = sum(t.numel() for t in pool.base.tensors.values())
        results["model"] = {"params": n_params, "tensors": len(pool.base.tensors),
                            "bytes_per_model_bf16": 2 * n_params, "experts": N_EXPERTS}
        print(f"[model] {n_params / 1e6:.1f}M params, {len(pool.base.tensors)} tensors, "
              f"hidden {args.hidden}, layers {args.layers}, intermediate {args.intermediate}, "
              f"vocab {args.vocab}; {N_EXPERTS} experts; torch threads {torch.get_num_threads()}",
              flush=True)
        t0 = time.perf_counter()
        with mon.phase("setup_engine"):
            engine = MergeEngine(pool, device="cpu")
            live = pool.new_model(dtype=torch.bfloat16)
        results["setup"]["engine_and_live_model_s"] = time.perf_counter() - t0
        targets = live.state_dict()
        genes = {m: candidate_genes(args, m, experts) for m in args.methods}
        results["genes"] = genes
        timings = results["timings"]

        def fuse_reference(m: str, index: int) -> dict[str, torch.Tensor] | None:
            """fuse_evo's merge of candidate ``index`` (untimed), to check mergekit got the same genes."""
            if "fuse_evo" not in args.peers or m == "dare_ties":  # DARE: different RNGs by design
                return None
            engine.materialize(fuse_recipe(m, genes[m][index], experts, seed=args.seed), into=live)
            return {k: v.detach().clone() for k, v in targets.items()}

        # ------------------------------------------------------------------ fuse_evo
        if "fuse_evo" in args.peers:
            for m in args.methods:
                recipes = [fuse_recipe(m, g, experts, seed=args.seed) for g in genes[m]]
                with mon.phase(f"fuse_evo:{m}"):
                    warm, timed = time_calls(lambda i: engine.materialize(recipes[i], into=live),
                                             args.warmup, args.candidates)
                timings.setdefault(m, {})["fuse_evo"] = {"first_call_s": warm, "samples_s": timed}
                print(f"[fuse_evo] {m}: median {median(timed):.4f}s "
                      f"(first-use setup: {len(warm)} warm-up candidates in {sum(warm):.3f}s)", flush=True)
                if args.profile:
                    txt = profile_call(lambda: engine.materialize(recipes[-1], into=live))
                    results["profiles"][m] = txt
                    print(f"[profile] fuse_evo {m}\n{txt}", file=sys.stderr, flush=True)

        # ------------------------------------------------------------------ roofline
        if "roofline" in args.peers:
            ta = candidate_genes(args, "task_arithmetic", experts)
            names = list(engine.base)
            wvecs = [{k: torch.tensor([1.0] + [gene_value(g, k, e, "weight") for e in experts])
                      for k in names} for g in ta]
            roof = Roofline(engine, experts)
            results["roofline_bytes_read_gb"] = gb = roof.nbytes / 1e9
            with mon.phase("roofline"):
                warm, timed = time_calls(lambda i: roof.run(wvecs[i], targets), args.warmup, args.candidates)
            timings["roofline"] = {"first_call_s": warm, "samples_s": timed, "bytes_read_gb": gb}
            print(f"[roofline] median {median(timed):.4f}s ({gb:.3f} GB read -> {gb / median(timed):.1f} GB/s)",
                  flush=True)
            del roof

        # ------------------------------------------------------------------ mergekit API
        if "mergekit_api" in args.peers:
            from mergekit.merge_methods import merge_state_dicts

            state = {"base": pool.base.tensors, **{e: pool.sources[e].tensors for e in experts}}
            names = list(pool.base.tensors)
            for m in args.methods:
                ids = ["base"] + method_models(m, experts)
                models = {i: state[i] for i in ids}
                params = [mergekit_params(m, g, names, method_models(m, experts)) for g in genes[m]]
                if m != "slerp":
                    for p in params:
                        p["lambda"] = 1.0
                out: dict[str, torch.Tensor] = {}

                def call(i: int) -> None:
                    nonlocal out
                    out = None  # free the previous candidate's tensors first
                    with torch.no_grad():
                        out = merge_state_dicts(models, m, parameters=params[i], base="base",
                                                out_dtype=torch.bfloat16)

                with mon.phase(f"mergekit_api:{m}"):
                    warm, timed = time_calls(call, args.mergekit_warmup, args.mergekit_candidates)
                timings.setdefault(m, {})["mergekit_api"] = {"first_call_s": warm, "samples_s": timed}
                print(f"[mergekit_api] {m}: median {median(timed):.4f}s", flush=True)
                ref = fuse_reference(m, args.mergekit_warmup + args.mergekit_candidates - 1)
                if ref is not None:  # same genes: fuse_evo (fp32 math) vs mergekit (bf16 math)
                    results["agreement"][m] = agreement(ref, out, pool.base.tensors)
                out = None

        # ------------------------------------------------------------------ mergekit-yaml
        if "mergekit_yaml" in args.peers:
            import yaml

            ydir = workdir / "mergekit_yaml"
            ydir.mkdir(exist_ok=True)
            for m in args.methods:
                cfg = mergekit_yaml_config(m, genes[m][-1], folders, experts, args.layers)
                cfg_path = ydir / f"{m}.yml"
                cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                out_dir = ydir / f"out_{m}"
                shutil.rmtree(out_dir, ignore_errors=True)
                cmd = [yaml_exe, str(cfg_path), str(out_dir), "--quiet", "-j", str(args.threads),
                       "--random-seed", str(args.seed)]
                with mon.phase(f"mergekit_yaml:{m}"):
                    dt, rc, child_rss = run_process(cmd, ydir / f"{m}.log", {"OMP_NUM_THREADS": str(args.threads)})
                entry = {"samples_s": [dt] if rc == 0 else [], "wall_s": dt, "returncode": rc,
                         "child_peak_rss_mib": child_rss / 2**20, "config_yaml": str(cfg_path),
                         "cmd": cmd}
                if rc != 0:
                    entry["log_tail"] = (ydir / f"{m}.log").read_text(errors="replace")[-3000:]
                    print(f"[mergekit_yaml] {m}: FAILED rc={rc}\n{entry['log_tail']}", flush=True)
                else:
                    print(f"[mergekit_yaml] {m}: {dt:.2f}s (peak RSS {child_rss / 2**20:.0f} MiB)", flush=True)
                    ref = fuse_reference(m, len(genes[m]) - 1)
                    if ref is not None:
                        from safetensors.torch import load_file

                        merged = {}
                        for f in sorted(out_dir.glob("*.safetensors")):
                            merged.update(load_file(str(f)))
                        if set(merged) >= set(ref):
                            results["agreement"][f"{m}:yaml"] = agreement(ref, merged, pool.base.tensors)
                timings.setdefault(m, {})["mergekit_yaml"] = entry
                shutil.rmtree(out_dir, ignore_errors=True)
    finally:
        mon.close()
        if tmp is not None:
            tmp.cleanup()

    results["host"]["loadavg_end"] = os.getloadavg()
    if max(results["host"]["loadavg_start"][0], results["host"]["loadavg_end"][0]) > args.threads + 0.5:
        warn = (f"other work may be running (1-min load {results['host']['loadavg_start'][0]:.1f} at start, "
                f"{results['host']['loadavg_end'][0]:.1f} at end, this run included): timings may be "
                "inflated" + ("; with more torch threads than free cores OpenMP regions wait for "
                              "descheduled threads (seen: 10-60x), --threads 1 is steadier there"
                              if args.threads > 1 else ""))
        results["host"]["busy_warning"] = warn
        print(f"[warn] {warn}", flush=True)
    results["memory"] = {"phases": mon.phases, "process_peak_rss_mib": _maxrss_bytes() / 2**20}
    summary = summarize(results, args)
    results["summary"] = summary
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str))
    print_table(summary, results)
    print(f"\nwrote {out_path}")
    return 0


def summarize(results: dict, args: argparse.Namespace) -> dict:
    t = results["timings"]
    roof = median(t.get("roofline", {}).get("samples_s", []))
    rows = {}
    for m in args.methods:
        row: dict[str, Any] = {}
        for peer in ("fuse_evo", "mergekit_api", "mergekit_yaml"):
            s = median(t.get(m, {}).get(peer, {}).get("samples_s", []))
            if s is None:
                continue
            row[peer] = {"median_s": s, "x_roofline": s / roof if roof else None,
                         "n": len(t[m][peer]["samples_s"])}
        if roof:
            row["roofline"] = {"median_s": roof, "x_roofline": 1.0}
        f, k = row.get("fuse_evo"), row.get("mergekit_api")
        if f and k:
            row["mergekit_api_over_fuse_evo"] = k["median_s"] / f["median_s"]
        if f and f["x_roofline"] is not None:
            row["target_x_roofline"] = TARGETS[m]
            row["meets_target"] = f["x_roofline"] <= TARGETS[m]
        warm = t.get(m, {}).get("fuse_evo", {}).get("first_call_s")
        if f and warm:  # first-use setup: the warm-up candidates' time beyond ordinary candidates'
            row["setup_s"] = sum(warm) - len(warm) * f["median_s"]
            row["setup_candidates"] = row["setup_s"] / f["median_s"]
        rows[m] = row
    return rows


def print_table(summary: dict, results: dict) -> None:
    def cell(row: dict, peer: str) -> str:
        e = row.get(peer)
        if not e:
            return "-"
        x = f" ({e['x_roofline']:.1f}x)" if e.get("x_roofline") is not None else ""
        return f"{e['median_s']:.3f}s{x}"

    peers = ["fuse_evo", "roofline", "mergekit_api", "mergekit_yaml"]
    head = ["method"] + peers + ["mk_api/fuse", "target", "ok", "setup (candidates, target <=10)"]
    lines = [head]
    for m, row in summary.items():
        k = row.get("mergekit_api_over_fuse_evo")
        lines.append([m] + [cell(row, p) for p in peers]
                     + [f"{k:.2f}x" if k else "-",
                        f"<={row['target_x_roofline']:.0f}x" if "target_x_roofline" in row else "-",
                        ("yes" if row["meets_target"] else "NO") if "meets_target" in row else "-",
                        f"{row['setup_s']:.1f}s ({row['setup_candidates']:.1f})" if "setup_s" in row else "-"])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    mdl = results.get("model", {})
    print(f"\nmedian seconds per candidate (x bf16 roofline); {mdl.get('params', 0) / 1e6:.1f}M params, "
          f"{mdl.get('experts')} experts, {results['host']['torch_threads']} torch threads; "
          "mergekit_yaml = one whole process run; mk_api/fuse > 1 means fuse_evo is faster")
    for r in lines:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    load = results["host"].get("loadavg_start"), results["host"].get("loadavg_end")
    print(f"load average at start/end: {load[0]} / {load[1]} on {results['host']['cpus']} CPUs")
    mem = results["memory"]
    print(f"\npeak RSS (process): {mem['process_peak_rss_mib']:.0f} MiB")
    for name, ph in mem["phases"].items():
        print(f"  {name:30s} peak {ph['rss_peak_mib']:8.0f} MiB  (+{ph['peak_over_start_mib']:.0f} over phase start)")
    for m, e in results["timings"].items():
        y = e.get("mergekit_yaml") if isinstance(e, dict) else None
        if y and "child_peak_rss_mib" in y:
            print(f"  mergekit-yaml {m:16s} child peak {y['child_peak_rss_mib']:8.0f} MiB")
    if results["agreement"]:
        print("\nfuse_evo vs mergekit on the same genes (||a-b|| / ||merge - base||):")
        for m, a in results["agreement"].items():
            print(f"  {m:22s} {a['rel_l2_vs_merge_delta']:.2e}  (max |diff| {a['max_abs_diff']:.2e})")
    for peer, why in results["skipped"].items():
        print(f"skipped {peer}: {why}")


if __name__ == "__main__":
    sys.exit(main())
