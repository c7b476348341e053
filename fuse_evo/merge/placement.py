"""Where a worker keeps its sources, decided before any weight is read.

A worker holds the base and N sources (their own dtype), one live model, the engine's small
tables, and the evaluator's activations. Which of them fit on the GPU decides how fast a
candidate is made: ``gpu`` (sources resident on the GPU), ``stream`` (sources in pinned host
memory, copied to the GPU a tensor at a time, the next copy overlapping the current merge) or
``cpu`` (sources memory-mapped on the host, shared by every worker of the node; merged there;
the live model still on the scoring device). The plan reads only ``config.json`` and the
safetensors headers (``models.read_header``), so it prints in a second for a 70B model, and
``fuse-evo plan`` sizes a cluster job for a hypothetical device from a laptop.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..config import PLACEMENTS
from ..errors import FuseEvoError
from ..models import SAFETENSORS, SAFETENSORS_INDEX, read_header, tensor_group, unreadable

HEADROOM = 0.9  # of a device's memory a plan may fill: allocator fragmentation, CUDA context, the OS
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
NAMED_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
_HISTOGRAM_BYTES = 256 * 1024  # ops.MagnitudeHistogram's nonempty buckets (16 B each; typically < 100 KB)
_SORTED_UP_TO = 1 << 13  # engine._SORTED_UP_TO: smaller tensors keep a sorted fp32 copy


class PlacementError(FuseEvoError):
    """No placement fits, or a forced one does not: the message names the bytes."""


@dataclass(frozen=True)
class ModelBytes:
    """One checkpoint's layout: what the plan needs, read without its data."""

    name: str
    parameters: int
    bytes: int
    dtypes: tuple[str, ...]
    tensor_numels: tuple[int, ...] = field(repr=False)
    largest_layer_bytes: int = 0  # one block's tensors: what the streaming placement holds twice
    hidden: int = 0
    intermediate: int = 0
    vocab: int = 0
    layers: int = 0
    kv_width: int = 0  # key (= value) width per token per layer: hidden x kv_heads / heads


def _checkpoint_files(name: str, folder: Path) -> list[Path]:
    if (folder / SAFETENSORS_INDEX).exists():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    if (folder / SAFETENSORS).exists():
        return [folder / SAFETENSORS]
    raise FuseEvoError(f"model {name!r} at {folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX} to plan from")


def read_model_bytes(name: str, folder: str | Path) -> ModelBytes:
    """A local model folder's layout from config.json and its safetensors headers only."""
    folder = Path(folder)
    numels, dtypes, total, layer_bytes = [], set(), 0, {}
    for path in _checkpoint_files(name, folder):
        try:
            header, _ = read_header(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise unreadable(name, path, e) from None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            numel = math.prod(int(d) for d in info["shape"])
            size = numel * DTYPE_BYTES.get(info["dtype"], 4)
            numels.append(numel)
            dtypes.add(info["dtype"])
            total += size
            try:
                layer = tensor_group(key).layer
            except FuseEvoError:
                layer = None
            if layer is not None:
                layer_bytes[layer] = layer_bytes.get(layer, 0) + size
    config = {}
    if (folder / "config.json").exists():
        config = json.loads((folder / "config.json").read_text())
    hidden, heads = int(config.get("hidden_size", 0)), int(config.get("num_attention_heads", 0) or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_width = head_dim * int(config.get("num_key_value_heads") or heads)
    return ModelBytes(name, sum(numels), total, tuple(sorted(dtypes)), tuple(numels),
                      max(layer_bytes.values(), default=0), hidden,
                      int(config.get("intermediate_size", 0)), int(config.get("vocab_size", 0)),
                      int(config.get("num_hidden_layers", len(layer_bytes))), kv_width)


def llama_shape(name: str, hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                dtype: str = "BF16", tied: bool = False) -> ModelBytes:
    """The layout of a Llama of this shape (no file): the README's table of 7B-70B plans."""
    head = hidden // heads
    block = [hidden * heads * head, hidden * kv_heads * head, hidden * kv_heads * head, heads * head * hidden,
             hidden * intermediate, hidden * intermediate, intermediate * hidden, hidden, hidden]
    numels = [vocab * hidden] + block * layers + [hidden] + ([] if tied else [vocab * hidden])
    size = DTYPE_BYTES[dtype]
    return ModelBytes(name, sum(numels), sum(numels) * size, (dtype,), tuple(numels), sum(block) * size,
                      hidden, intermediate, vocab, layers, kv_heads * head)


@dataclass(frozen=True)
class Machine:
    """What one node offers a search: GPU memory per GPU (None: no GPU), host memory, and the
    workers sharing the node (each with its own GPU, or all on the CPU)."""

    gpu_bytes: int | None
    host_bytes: int
    workers_per_node: int = 1

    @classmethod
    def here(cls, workers_per_node: int = 1, device: str | None = None) -> "Machine":
        """This machine: the free memory of its first CUDA device (none when ``device`` is cpu
        or there is no CUDA), and its physical memory."""
        import torch

        gpu = None
        if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
            index = torch.device(device).index if device and ":" in str(device) else 0
            gpu = torch.cuda.mem_get_info(index or 0)[0]
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(gpu, host, workers_per_node)


@dataclass(frozen=True)
class Need:
    """One placement's bytes: on each worker's GPU, on the node's host (shared once: the
    sources' page cache; per worker: the rest)."""

    placement: str
    gpu: int
    host_shared: int
    host_per_worker: int

    def host(self, workers: int) -> int:
        return self.host_shared + workers * self.host_per_worker


@dataclass(frozen=True)
class MemoryPlan:
    """The bytes per worker of each placement on ``machine`` and the one chosen (the fastest
    that fits, or the forced one)."""

    parts: Mapping[str, int]
    needs: Mapping[str, Need]
    machine: Machine
    chosen: str | None
    notes: tuple[str, ...] = ()
    kv_cache_bytes: int | None = None  # the vLLM engine's KV cache (evaluator.backend=vllm), per worker

    def fits(self, placement: str) -> bool:
        need, m = self.needs[placement], self.machine
        gpu_ok = need.gpu == 0 or (m.gpu_bytes is not None and need.gpu <= HEADROOM * m.gpu_bytes)
        return gpu_ok and need.host(m.workers_per_node) <= HEADROOM * m.host_bytes

    def text(self) -> str:
        m = self.machine
        gpu = f"{gb(m.gpu_bytes)} GPU" if m.gpu_bytes is not None else "no GPU"
        lines = [f"memory plan per worker ({gpu}, {gb(m.host_bytes)} host, {m.workers_per_node} worker(s) per node; "
                 f"a placement may fill {HEADROOM:.0%}):"]
        lines += ["  " + ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items())]
        for p in PLACEMENTS:
            need = self.needs[p]
            if p == self.chosen:
                mark = "<- chosen"
            elif m.gpu_bytes is None and p != "cpu":
                mark = "needs a GPU"
            else:
                mark = "fits" if self.fits(p) else "does not fit"
            lines.append(f"  {p:6s} GPU {gb(need.gpu):>9s}  host {gb(need.host(m.workers_per_node)):>9s}  {mark}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.1f} GB"


def memory_plan(base: ModelBytes, sources: Sequence[ModelBytes], machine: Machine, *, live_dtype: str | None = None,
                thresholds: bool = True, ranks: bool = False, batch_size: int = 8, sequence_length: int = 2048,
                scored_tokens: int = 64, force: str = "auto", vllm: bool = False,
                kv_cache_bytes: int | None = None, max_model_len: int = 2048) -> MemoryPlan:
    """Bytes per worker of each placement for merging ``sources`` into ``base`` and scoring
    the live model (``live_dtype``: None = the base's); ``thresholds``/``ranks``: the space's
    methods need magnitude histograms / DELLA's rank tables; ``batch_size`` x
    ``sequence_length``: the evaluator's activations, whose fp32 vocabulary logits cover
    ``scored_tokens`` positions per row (the evaluator asks for the scored positions only).
    ``force``: auto or one of PLACEMENTS. ``vllm``: the evaluator scores with a vLLM engine
    on the scoring device beside the live model (which stays: the merge writes into it): its
    own copy of the weights, its activations and a KV cache of ``kv_cache_bytes`` (None: on a
    GPU what the placement leaves within the headroom, at least ``batch_size`` sequences of
    ``max_model_len`` tokens, since a smaller cache runs fewer sequences at once and the
    scoring serializes: a slower merge placement wins over it; on the host 2 GiB, vLLM-CPU's
    own default).
    Raises PlacementError, naming the bytes, when the forced placement or every one does
    not fit."""
    if force not in ("auto", *PLACEMENTS):
        raise PlacementError(f"cluster.placement: {force!r} is not auto, {', '.join(PLACEMENTS)}")
    n = len(sources)
    s_bytes = sum(s.bytes for s in sources)
    live_bytes = base.parameters * (NAMED_DTYPES[live_dtype] if live_dtype else base.bytes // max(base.parameters, 1))
    tables = 0
    if thresholds:  # a histogram per large tensor per source, a sorted copy of small ones, refinements (1%)
        per_source = sum(_HISTOGRAM_BYTES if k > _SORTED_UP_TO else 4 * k for k in base.tensor_numels)
        tables = n * (per_source + 4 * base.parameters // 100)
    if ranks:
        tables += (s_bytes + base.bytes) // 50  # the engine's cache_bytes
    largest = max(base.tensor_numels, default=0)
    workspace = 4 * largest * 2  # two fp32-sized transients of the largest tensor (an upper bound: the table passes use 64 MB chunks)
    act_width = 2 if live_bytes <= 2 * base.parameters else 4
    logits = batch_size * min(scored_tokens, sequence_length) * 4 * base.vocab
    activations = logits + batch_size * sequence_length * (4 * base.hidden + 3 * base.intermediate) * act_width
    parts = {"sources": s_bytes, "base": base.bytes, "live model": live_bytes, "tables": tables,
             "activations": activations, "workspace": workspace}
    resident = s_bytes + base.bytes
    stream_window = 2 * (n + 1) * max(base.largest_layer_bytes, largest * 2)
    scoring = live_bytes + activations
    kv_token = 2 * base.layers * (base.kv_width or base.hidden) * act_width  # keys and values of one token
    kv_fixed = kv_cache_bytes if kv_cache_bytes is not None else (
        2 * 2**30 if machine.gpu_bytes is None else kv_token * max_model_len * max(batch_size, 1))
    if vllm:  # the engine's copy of the weights and its KV cache; the activations are its (the live model is not run)
        parts["vllm weights"] = live_bytes
        parts["kv cache"] = kv_fixed
        scoring += live_bytes + kv_fixed
    if machine.gpu_bytes is None:  # no GPU: everything on the host, the live model and scoring included
        needs = {p: Need(p, 0, resident, tables + workspace + scoring) for p in PLACEMENTS}
    else:
        needs = {
            "gpu": Need("gpu", resident + tables + workspace + scoring, 0, 0),
            "stream": Need("stream", stream_window + tables + workspace + scoring, 0, resident),
            "cpu": Need("cpu", scoring, resident, tables + workspace),
        }
    notes = []
    dtypes = {d for m in [base, *sources] for d in m.dtypes}
    if len(dtypes) > 1:
        mixed = ", ".join(f"{m.name} {'/'.join(m.dtypes)}" for m in [base, *sources])
        notes.append(f"sources of different dtypes ({mixed}): merged in fp32, written in the live model's dtype")
    plan = MemoryPlan(parts, needs, machine, None, tuple(notes))
    if machine.gpu_bytes is None and force in ("gpu", "stream"):
        raise PlacementError(f"cluster.placement={force} needs a GPU, and this node has none; use auto or cpu")
    candidates = ("cpu",) if machine.gpu_bytes is None else PLACEMENTS if force == "auto" else (force,)
    for p in candidates:
        if plan.fits(p):
            kv = None
            if vllm:
                kv = kv_fixed if kv_cache_bytes is not None or machine.gpu_bytes is None else (
                    kv_fixed + int(HEADROOM * machine.gpu_bytes) - needs[p].gpu)  # the GPU's rest, within the headroom
                notes.append(f"vLLM KV cache {gb(kv)} ({kv // max(kv_token, 1):,} tokens)")
            return MemoryPlan(parts, needs, machine, p, tuple(notes), kv)
    what = "cluster.placement=" + force if force != "auto" else "no placement"
    detail = "; ".join(f"{p}: GPU {gb(needs[p].gpu)}, host {gb(needs[p].host(machine.workers_per_node))}"
                       for p in candidates)
    have = (f"the GPU has {gb(machine.gpu_bytes)}" if machine.gpu_bytes is not None else "there is no GPU")
    raise PlacementError(f"{what} fits: {detail}; {have} and the host {gb(machine.host_bytes)} "
                         f"({machine.workers_per_node} worker(s) per node, {HEADROOM:.0%} usable)\n{plan.text()}")
