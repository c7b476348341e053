"""The memory plan: bytes per worker from headers only, the fastest placement that fits, a
refusal naming the bytes; `fuse-evo plan` for a hypothetical node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuse_evo.merge.placement import (Machine, PlacementError, llama_shape, memory_plan, read_model_bytes)
from fuse_evo.models import ModelPool

REPO = Path(__file__).resolve().parents[1]
GB = 10**9


def _header_only(folder: Path, tensors: dict[str, tuple[str, list[int]]], config: dict) -> Path:
    """A model folder whose safetensors file is a header and no data: planning must not read data."""
    folder.mkdir(parents=True)
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"BF16": 2, "F32": 4, "F16": 2}[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_layout_of_a_model_comes_from_its_headers(micro_zoo, tmp_path):
    base = micro_zoo["models"]["base"]["path"]
    layout = read_model_bytes("base", base)
    pool = ModelPool(base, {"ft": micro_zoo["models"]["ft_shift"]["path"]})
    assert layout.parameters == pool.base.num_parameters
    assert layout.bytes == sum(t.numel() * t.element_size() for t in pool.base.tensors.values())
    assert layout.dtypes == ("F32",)
    # no tensor data read: a file holding only its header plans the same way
    big = _header_only(tmp_path / "big", {"model.embed_tokens.weight": ("BF16", [32000, 4096]),
                                          "model.layers.0.mlp.up_proj.weight": ("BF16", [11008, 4096]),
                                          "model.layers.0.self_attn.q_proj.weight": ("BF16", [4096, 4096])},
                       {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "num_hidden_layers": 1})
    layout = read_model_bytes("big", big)
    assert layout.parameters == 32000 * 4096 + 11008 * 4096 + 4096 * 4096
    assert layout.bytes == 2 * layout.parameters and (big / "model.safetensors").stat().st_size < 1000
    assert layout.largest_layer_bytes == 2 * (11008 * 4096 + 4096 * 4096)


def test_the_fastest_placement_that_fits_is_chosen():
    shape = (4096, 32, 11008, 32000, 32, 32)  # Llama-2-7B x 4 sources: 85 GB on the GPU when resident
    base, sources = llama_shape("b", *shape), [llama_shape(f"s{i}", *shape) for i in range(4)]
    assert base.parameters == pytest.approx(6.74e9, rel=0.01)
    plans = {gpu: memory_plan(base, sources, Machine(gpu * GB, 512 * GB), batch_size=8, sequence_length=2048)
             for gpu in (141, 80, 20)}
    assert [plans[g].chosen for g in (141, 80, 20)] == ["gpu", "stream", "cpu"]
    needs = plans[80].needs
    assert needs["gpu"].gpu > needs["stream"].gpu > needs["cpu"].gpu
    resident = base.bytes + sum(s.bytes for s in sources)
    assert needs["gpu"].gpu > resident and needs["stream"].host_per_worker == resident  # pinned, per worker
    assert needs["cpu"].host_shared == resident  # one page-cache copy per node
    assert plans[80].parts["tables"] < 0.05 * resident  # the thresholds' tables: under 5% of the sources
    text = plans[80].text()
    assert "stream" in text and "<- chosen" in text and "does not fit" in text
    # eight CPU workers on a node share the sources once
    cpu8 = memory_plan(base, sources, Machine(None, 512 * GB, 8))
    need = cpu8.needs["cpu"]
    assert cpu8.chosen == "cpu" and need.host(8) == resident + 8 * need.host_per_worker
    assert need.host_per_worker < resident / 2  # a worker's own: its live model, tables, activations


def test_a_vllm_engine_gets_its_weights_and_a_kv_cache_for_a_whole_batch():
    shape = (4096, 32, 11008, 32000, 32, 32)  # Llama-2-7B x 2 sources: resident fits 80 GB without vLLM
    base, sources = llama_shape("b", *shape), [llama_shape(f"s{i}", *shape) for i in range(2)]
    machine = Machine(80 * GB, 512 * GB)
    hf = memory_plan(base, sources, machine, batch_size=8, sequence_length=2048)
    plan = memory_plan(base, sources, machine, batch_size=8, sequence_length=2048, vllm=True, max_model_len=2048)
    assert plan.parts["vllm weights"] == plan.parts["live model"] == base.bytes  # bf16 live model
    per_token = 2 * 32 * 4096 * 2  # keys and values, 32 layers, bf16
    assert plan.parts["kv cache"] == 8 * 2048 * per_token  # the floor: batch_size sequences
    # the resident placement would leave the engine under a batch of KV: streaming wins instead
    assert hf.chosen == "gpu" and plan.chosen == "stream"
    assert plan.needs["stream"].gpu - plan.parts["kv cache"] + plan.kv_cache_bytes == pytest.approx(0.9 * 80 * GB, abs=1)
    assert f"({plan.kv_cache_bytes // per_token:,} tokens)" in plan.text()
    # a size the user gives is kept; with no GPU, vLLM-CPU's 2 GiB
    fixed = memory_plan(base, sources, Machine(141 * GB, 512 * GB), vllm=True, kv_cache_bytes=5 * 2**30)
    assert fixed.kv_cache_bytes == fixed.parts["kv cache"] == 5 * 2**30
    assert memory_plan(base, sources, Machine(None, 512 * GB), vllm=True).kv_cache_bytes == 2 * 2**30


def test_the_logits_estimate_covers_the_scored_positions_only():
    """The evaluator computes vocabulary logits at the scored positions only: the plan's
    activations grow with ``scored_tokens`` x vocabulary, with ``sequence_length`` only
    through the hidden states."""
    shape = (4096, 32, 14336, 128256, 32, 8)  # Llama-3-8B: a 128256-token vocabulary
    base, sources = llama_shape("b", *shape), [llama_shape(f"s{i}", *shape) for i in range(2)]
    act = {k: memory_plan(base, sources, Machine(None, 512 * GB), batch_size=8, sequence_length=2048,
                          scored_tokens=k).parts["activations"] for k in (1, 64, 2048, 4096)}
    assert act[64] - act[1] == 8 * 63 * 4 * 128256
    assert act[4096] == act[2048]  # never more positions than the longest request has
    hidden = 8 * 2048 * (4 * 4096 + 3 * 14336) * 2  # bf16 hidden states and MLP of one layer
    assert act[2048] - hidden == 8 * 2048 * 4 * 128256  # the old estimate: every position's logits
    assert act[64] < act[2048] / 4


def test_a_plan_that_fits_nowhere_names_the_bytes():
    shape = (8192, 80, 28672, 128256, 64, 8)  # Llama-3-70B: its live model alone fills a 141 GB GPU
    base, sources = llama_shape("b", *shape), [llama_shape(f"s{i}", *shape) for i in range(3)]
    with pytest.raises(PlacementError, match=r"no placement fits: gpu: GPU [\d.]+ GB.*the GPU has 141.0 GB"):
        memory_plan(base, sources, Machine(141 * GB, 2000 * GB))
    small = llama_shape("t", 256, 2, 688, 4096, 4, 4)
    with pytest.raises(PlacementError, match="cluster.placement=gpu fits: gpu: GPU"):
        memory_plan(small, [small, small], Machine(10**6, 512 * GB), force="gpu")
    with pytest.raises(PlacementError, match="needs a GPU"):
        memory_plan(small, [small], Machine(None, 512 * GB), force="stream")
    with pytest.raises(PlacementError, match="cluster.placement: 'disk'"):
        memory_plan(small, [small], Machine(None, 512 * GB), force="disk")


def test_sources_of_another_dtype_are_said_in_the_plan():
    b16 = llama_shape("base", 256, 2, 688, 4096, 4, 4)
    f32 = llama_shape("ft", 256, 2, 688, 4096, 4, 4, dtype="F32")
    plan = memory_plan(b16, [f32], Machine(None, 64 * GB))
    assert "sources of different dtypes (base BF16, ft F32): merged in fp32" in plan.text()


def _plan(micro_zoo, *overrides: str) -> subprocess.CompletedProcess:
    zoo = Path(micro_zoo["task_dir"]).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fuse_evo.cli", "plan", "experiment=micro",
                           f"models.zoo.out_dir={zoo}", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fuse_evo_plan_sizes_a_hypothetical_node(micro_zoo, tmp_path):
    done = _plan(micro_zoo, "plan.gpu_memory_gb=80", "plan.host_memory_gb=512", "plan.workers_per_node=8",
                 f"run.dir={tmp_path / 'never'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "80.0 GB GPU, 512.0 GB host, 8 worker(s) per node" in done.stdout
    assert "gpu" in done.stdout and "<- chosen" in done.stdout
    assert not (tmp_path / "never").exists()  # a plan makes no run directory
    refused = _plan(micro_zoo, "plan.gpu_memory_gb=0.000001", "cluster.placement=gpu")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cluster.placement=gpu fits: gpu: GPU" in refused.stderr


def test_a_search_forced_onto_a_placement_it_does_not_fit_stops_before_loading(micro_zoo, tmp_path):
    zoo = Path(micro_zoo["task_dir"]).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "fuse_evo.cli", "search", "experiment=micro", f"models.zoo.out_dir={zoo}",
                           f"run.dir={tmp_path / 'run'}", "plan.host_memory_gb=0.000001", "run.dashboard=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no placement fits" in done.stderr and "Traceback" not in done.stderr
    assert "host 0.0 GB" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")
def test_the_streaming_engine_needs_cuda(micro_zoo):
    from fuse_evo.errors import FuseEvoError
    from fuse_evo.merge.engine import MergeEngine

    pool = ModelPool(micro_zoo["models"]["base"]["path"], {"ft": micro_zoo["models"]["ft_shift"]["path"]})
    with pytest.raises(FuseEvoError, match="streaming placement copies sources to a CUDA device"):
        MergeEngine(pool, device="cpu", stream=True)
