"""GPU smoke tests (``pytest -m gpu``; skipped without CUDA): a search materializes and scores
on CUDA, in-process and on a Ray GPU worker, and scores what the CPU scores."""

from __future__ import annotations

import pytest
import torch

from fuse_evo.search.archive import Archive
from fuse_evo.search.run import run_search

from test_search_run import command

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _first(run_dir):
    with Archive.open(run_dir) as archive:
        return archive.trial(0)


def test_search_on_cuda_scores_what_the_cpu_scores(micro_zoo, tmp_path):
    run_search(command(micro_zoo, tmp_path / "cpu", "run.budget=1", "run.device=cpu", "run.dashboard=false"))
    run_search(command(micro_zoo, tmp_path / "cuda", "run.budget=3", "run.device=cuda", "run.dashboard=false"))
    cpu, cuda = _first(tmp_path / "cpu"), _first(tmp_path / "cuda")
    assert cuda.status == "complete" and "cuda" in cuda.worker and "cpu" in cpu.worker
    assert cuda.recipe_key == cpu.recipe_key  # the same first candidate (the uniform merge)
    for name, value in cpu.objectives.items():  # accuracies over 20 documents: kernels may flip one
        assert cuda.objectives[name] == pytest.approx(value, abs=0.05)


def test_ray_gpu_worker(micro_zoo, tmp_path):
    result = run_search(command(micro_zoo, tmp_path / "ray", "run.budget=3", "cluster=ray", "cluster.num_workers=1",
                                "cluster.gpus_per_worker=1", "run.dashboard=false"))
    assert result.evaluations == 3
    with Archive.open(tmp_path / "ray") as archive:
        trials = archive.trials()
    assert all(t.status == "complete" and "cuda" in t.worker for t in trials)


@pytest.mark.parametrize("placement", ["gpu", "stream", "cpu"])
def test_each_placement_on_cuda_gives_the_cpus_tensors(micro_zoo, placement):
    """The live model on CUDA, the sources resident there, streamed there or merged on the
    host: the merged weights equal the CPU engine's (fp32 math on both)."""
    import time

    from fuse_evo.merge.engine import MergeEngine
    from fuse_evo.merge.live import LiveMerge
    from fuse_evo.models import ModelPool
    from fuse_evo.recipe import Recipe

    models = micro_zoo["models"]
    pool = ModelPool(models["base"]["path"], {n: m["path"] for n, m in models.items() if m["skill"]})
    recipe = Recipe("ties", tuple(pool.names), groups={"*": {"*": {"weight": 0.6, "density": 0.4}}}, seed=1)
    cpu = MergeEngine(pool, device="cpu").materialize(recipe, into=pool.new_model()).state_dict()
    live = LiveMerge(pool, device="cuda", placement=placement)
    t0 = time.perf_counter()
    merged = live.load(recipe).state_dict()
    torch.cuda.synchronize()
    print(f"[gpu] placement {placement}: first materialize {time.perf_counter() - t0:.3f}s")
    assert live.device.type == "cuda" and (live.engine.device.type == "cpu") == (placement == "cpu")
    for name, value in cpu.items():
        torch.testing.assert_close(merged[name].cpu(), value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
