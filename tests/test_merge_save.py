"""Nothing lost, nothing left behind: ``--overwrite`` keeps one complete model at ``--out`` at
every instant, even when the writer is SIGKILLed mid-way, and the next merge or export into
the same ``--out`` cleans (or puts back) what a killed one left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fuse_evo.cli import main

from test_search_run import REPO

# run in a subprocess: `merge CONFIG --out OUT --overwrite`, with one step made to kill the process
_KILLER = """
import os, shutil, signal, sys
from pathlib import Path
import fuse_evo.merge.save as export
from fuse_evo.cli import main
how, config, out = sys.argv[1:4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if how == "during-delete":  # the old model's deletion: a file gone, then killed
    real_rmtree = shutil.rmtree
    def rmtree(path, *a, **k):
        if not Path(path).name.startswith(f".{Path(out).name}.old-"):  # another folder (a compiler's)
            return real_rmtree(path, *a, **k)
        files = sorted(p for p in Path(path).rglob("*.safetensors"))
        if files:
            files[0].unlink()
        die()
    shutil.rmtree = rmtree
elif how == "between-renames":  # where the swap cannot be one step: killed once the old is aside
    def exchange(a, b):
        raise OSError(38, "no renameat2 here")
    export._exchange = exchange
    real = os.replace
    def replace(src, dst):
        if Path(dst) == Path(out):
            die()
        real(src, dst)
    os.replace = replace
elif how == "while-writing":  # the new model written, killed before it moves in
    export.default_permissions = lambda folder: die()
sys.exit(main(["merge", config, "--out", out, "--overwrite"]))
"""


def _merge_file(micro_zoo, tmp_path: Path, weight: float) -> Path:
    models = micro_zoo["models"]
    path = tmp_path / f"merge_{weight}.yaml"
    path.write_text(yaml.safe_dump({
        "sources": {"base": models["base"]["path"], "inc": models["ft_increment"]["path"]},
        "recipe": {"method": "task_arithmetic", "base": "base", "models": ["inc"],
                   "groups": {"*": {"inc": {"weight": weight}}}}}))
    return path


def _model_of(folder: Path) -> float:
    """The folder's recipe weight, after checking it is a complete, loadable model."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder) is not None
    for f in folder.glob("*.safetensors"):
        load_file(f)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())["recipe"]
    return recipe["groups"]["*"]["inc"]["weight"]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def old_model(micro_zoo, tmp_path) -> Path:
    out = tmp_path / "merged"
    assert main(["merge", str(_merge_file(micro_zoo, tmp_path, 0.25)), "--out", str(out)]) == 0
    assert _model_of(out) == 0.25
    return out


def _killed(how: str, config: Path, out: Path) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _KILLER, how, str(config), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]  # it was killed where the test meant it to be
    return done.returncode


def test_killed_while_deleting_the_old_model_leaves_the_new_one_complete(micro_zoo, tmp_path, old_model, capsys):
    new = _merge_file(micro_zoo, tmp_path, 0.75)
    _killed("during-delete", new, old_model)
    assert _model_of(old_model) == 0.75  # the swap came first: the half-deleted folder is the old one, aside
    [leftover] = _siblings(old_model)
    assert leftover.startswith(".merged.old-")
    capsys.readouterr()
    assert main(["merge", str(new), "--out", str(old_model), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"removed {old_model.parent / leftover}" in err and "MiB), left by process" in err and "is gone" in err
    assert _siblings(old_model) == [] and _model_of(old_model) == 0.75


def test_killed_between_the_two_renames_the_old_model_is_put_back(micro_zoo, tmp_path, old_model, capsys):
    new = _merge_file(micro_zoo, tmp_path, 0.75)
    _killed("between-renames", new, old_model)
    assert not old_model.exists()  # the one instant a plain rename pair has no model at --out
    capsys.readouterr()
    assert main(["merge", str(new), "--out", str(old_model)]) == 2  # put back first: then it exists
    err = capsys.readouterr().err
    assert "was missing and its previous model lay aside" in err and "put back" in err
    assert "already exists" in err
    assert _model_of(old_model) == 0.25 and [s for s in _siblings(old_model) if ".old-" in s] == []


def test_a_killed_writer_staging_folder_is_removed_by_the_next_merge(micro_zoo, tmp_path, old_model, capsys):
    new = _merge_file(micro_zoo, tmp_path, 0.75)
    _killed("while-writing", new, old_model)
    assert _model_of(old_model) == 0.25  # untouched
    [staging] = _siblings(old_model)
    assert staging.startswith(".merged.staging-")
    pid = int(staging.split("-")[1])
    capsys.readouterr()
    assert main(["merge", str(new), "--out", str(old_model), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"left by process {pid} that was writing merged and is gone" in err
    assert _siblings(old_model) == [] and _model_of(old_model) == 0.75


def test_a_live_writer_staging_folder_is_left_alone(micro_zoo, tmp_path, old_model):
    mine = old_model.parent / f".merged.staging-{os.getpid()}-abc"  # this process: alive
    mine.mkdir()
    assert main(["merge", str(_merge_file(micro_zoo, tmp_path, 0.5)), "--out", str(old_model), "--overwrite"]) == 0
    assert mine.is_dir() and _model_of(old_model) == 0.5
