"""Bad input, each one clear error (exit 2, one line naming the thing at fault) raised before
any expensive work: damaged weights and shard indexes, a device this machine lacks, bad plan
values, a damaged archive, a search that scores nothing, and merges that overflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fuse_evo.cli import main
from fuse_evo.errors import FuseEvoError
from fuse_evo.search.archive import Archive, ArchiveError
from fuse_evo.search.run import run_search

from test_search_run import REPO, command, paths_command, zoo_dir

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _error_line(capsys) -> str:
    """The one stderr line of a failed command (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _copy_model(micro_zoo, name: str, to: Path) -> Path:
    shutil.copytree(micro_zoo["models"][name]["path"], to)
    return to


def _merge_file(micro_zoo, tmp_path: Path, **paths) -> Path:
    """A task-arithmetic merge file over the zoo's base and two sources (``paths`` replaces some)."""
    models = micro_zoo["models"]
    sources = {"base": models["base"]["path"], "inc": models["ft_increment"]["path"],
               "shift": models["ft_shift"]["path"], **{k: str(v) for k, v in paths.items()}}
    recipe = {"method": "task_arithmetic", "base": "base", "models": ["inc", "shift"],
              "groups": {"*": {"inc": {"weight": 0.5}, "shift": {"weight": 0.5}}}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, "recipe": recipe}))
    return path


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garble_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header starts at byte 8
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble_header])
def test_damaged_safetensors_name_the_model_and_file_in_merge_and_search(micro_zoo, tmp_path, capsys, damage):
    bad = _copy_model(micro_zoo, "ft_shift", tmp_path / "ft_bad")
    damage(bad / "model.safetensors")
    out = tmp_path / "out"
    assert main(["merge", str(_merge_file(micro_zoo, tmp_path, shift=bad)), "--out", str(out)]) == 2
    err = _error_line(capsys)
    assert f"model 'shift': {bad / 'model.safetensors'} is not a readable safetensors file" in err
    assert "download or save it again" in err and not out.exists()

    cmd = paths_command(micro_zoo, tmp_path / "run", {"inc": micro_zoo["models"]["ft_increment"]["path"], "bad": bad})
    with pytest.raises(FuseEvoError, match=r"model 'bad': .*model.safetensors is not a readable safetensors file"):
        run_search(cmd)
    # a garbled header is found by the memory plan, before the run's config is written; a
    # truncated file when the worker loads it: nothing archived either way
    run = tmp_path / "run"
    assert not (run / "config.yaml").exists() or Archive.open(run).count() == 0


def test_a_missing_shard_names_the_model_and_the_index(micro_zoo, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    sharded = _copy_model(micro_zoo, "ft_shift", tmp_path / "ft_sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    merge_file = _merge_file(micro_zoo, tmp_path, shift=sharded)
    assert main(["merge", str(merge_file), "--out", str(tmp_path / "ok")]) == 0  # the intact one merges
    capsys.readouterr()
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert main(["merge", str(merge_file), "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert (f"model 'shift': {sharded / 'model.safetensors.index.json'} names 1 of 2 shards that are missing: "
            "model-00002-of-00002.safetensors") in err


@NO_CUDA
def test_cuda_without_cuda_is_refused_before_anything_loads(micro_zoo, small_run, tmp_path, capsys, monkeypatch):
    import fuse_evo.models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(fuse_evo.models, "load_model", no_loading)
    merge_file = _merge_file(micro_zoo, tmp_path)
    assert main(["merge", str(merge_file), "--out", str(tmp_path / "m"), "--device", "cuda"]) == 2
    assert "--device=cuda: this machine has no usable CUDA device" in _error_line(capsys)
    assert main(["eval", micro_zoo["models"]["base"]["path"], "--device", "cuda", "--tasks", "zoo_increment",
                 "--include_path", micro_zoo["task_dir"]]) == 2
    assert "--device=cuda: this machine has no usable CUDA device" in _error_line(capsys)
    assert main(["export", str(small_run), "--out", str(tmp_path / "e"), "--device", "cuda"]) == 2
    assert "--device=cuda: this machine has no usable CUDA device" in _error_line(capsys)
    with pytest.raises(FuseEvoError, match="run.device=cuda: this machine has no usable CUDA device"):
        run_search(command(micro_zoo, tmp_path / "run", "run.device=cuda"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("run.budget=-5", "run.budget: must be at least 1, got -5"),
    ("evaluator.limit=0", "evaluator.limit: must be > 0"),
    ("run.threads=0", "run.threads: must be at least 1, got 0"),
    ("evaluator.fidelity=fast", "evaluator.fidelity: 'fast' is not one of full, race"),
    ("evaluator.race.stages=[0.5,0.25,1]", r"evaluator.race.stages: \[0.5, 0.25, 1.0\]: increasing fractions"),
    ("evaluator.race.stages=[0.5]", "evaluator.race.stages: .* the last 1"),
    ("evaluator.race.confidence=1", r"evaluator.race.confidence: must be in \[0.5, 1\), got 1"),
])
def test_plan_values_are_checked_before_the_run_dir_exists(micro_zoo, tmp_path, override, message):
    with pytest.raises(FuseEvoError, match=message):
        run_search(command(micro_zoo, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def small_run(micro_zoo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bad_input") / "run"
    assert run_search(command(micro_zoo, run, "run.budget=3", "run.dashboard=false")).evaluations == 3
    return run


@pytest.mark.parametrize("where", ["middle", "header"])
def test_a_garbled_archive_says_how_to_recover_it(micro_zoo, small_run, tmp_path, capsys, where):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    db = run / "archive.db"
    data = bytearray(db.read_bytes())
    if where == "header":
        data[:100] = b"\x00garbage!" * 11 + b"\x00"
    else:  # the size stays, the pages after the first are noise
        data[4096:] = bytes((i * 37) % 251 for i in range(len(data) - 4096))
    db.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"\.recover"):
        run_search(command(micro_zoo, run, "run.budget=5", "run.dashboard=false"))
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert str(db) in err and f"sqlite3 {db} .recover" in err
    assert db.read_bytes() == bytes(data)  # nothing was written over what can be recovered


def test_a_search_that_scores_nothing_exits_non_zero(micro_zoo, tmp_path):
    """Coefficients near 1e38 (times lambda 1e38) overflow every merged weight: each
    candidate fails as non-finite, not archived complete with a score of 0, and the command
    says so and exits 2."""
    run = tmp_path / "run"
    args = ["experiment=micro", f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run}", "run.budget=3",
            "space.genes.weight.low=1e37", "space.genes.weight.high=1e38", "space.fixed.lambda=1e38",
            "run.dashboard=false"]
    done = subprocess.run([sys.executable, "-m", "fuse_evo.cli", "search", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "candidates could be scored" in done.stderr and "is not finite (inf or nan)" in done.stderr
    assert "Traceback" not in done.stderr
    with Archive.open(run) as archive:
        trials = archive.trials()
    assert len(trials) == 3 and all(t.status == "failed" for t in trials)
    assert all(t.error.startswith("NonFiniteMerge: merged tensor") for t in trials)


def test_an_overflowing_merge_fails_in_merge_too(micro_zoo, tmp_path, capsys):
    path = _merge_file(micro_zoo, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["recipe"]["groups"]["*"] = {"inc": {"weight": 3e38}, "shift": {"weight": 3e38}}
    data["recipe"]["parameters"] = {"lambda": 1e38}  # 3e76 overflows float32
    path.write_text(yaml.safe_dump(data))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert "merged tensor" in err and "is not finite (inf or nan)" in err
    assert not (tmp_path / "out").exists()


def test_merge_hints_name_merge_options(micro_zoo, tmp_path, capsys):
    from safetensors.torch import load_file

    pickled = _copy_model(micro_zoo, "ft_shift", tmp_path / "ft_pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    merge_file = _merge_file(micro_zoo, tmp_path, shift=pickled)
    assert main(["merge", str(merge_file), "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert "model 'shift'" in err and "pass --allow-pickle" in err and "models.allow_pickle" not in err

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert main(["merge", str(merge_file), "--out", str(a_file / "model")]) == 2
    assert f"--out {a_file / 'model'} lies under {a_file}, which is a file, not a folder" in _error_line(capsys)

    stacking = tmp_path / "stack.yaml"
    base = micro_zoo["models"]["base"]["path"]
    stacking.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": base, "layer_range": [0, 1]}]}, {"sources": [{"model": base, "layer_range": [0, 2]}]}]}))
    assert main(["merge", str(stacking), "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert err.startswith("fuse-evo: error: slices: layer stacking") and "merge_method" not in err
