"""The built micro zoo: loadable models, lm-eval agreement, determinism, caching, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from fuse_evo.errors import ConfigError, FuseEvoError
from fuse_evo.evaluate.evaluator import simple_scores
from fuse_evo.zoo.build import build_zoo, config_key, load_cached, score_table

from conftest import micro_zoo_config


def _load(manifest, name):
    path = manifest["models"][name]["path"]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_manifest_describes_every_model_and_task(micro_zoo):
    skills = ["increment", "reverse", "shift"]
    assert micro_zoo["base"] == "base"
    assert micro_zoo["models"]["base"]["skill"] is None
    assert {m["skill"] for n, m in micro_zoo["models"].items() if n != "base"} == set(skills)
    assert set(micro_zoo["tasks"]) == set(skills)
    assert Path(micro_zoo["task_dir"]).is_absolute()
    for m in micro_zoo["models"].values():
        assert Path(m["path"]).is_absolute()
        assert set(m["scores"]) == set(skills)
        assert all(0.0 <= v <= 1.0 for v in m["scores"].values())
    ta = micro_zoo["uniform_merges"]["task_arithmetic"]
    assert ta["best"] == ta["scales"][f"{ta['best_scale']:g}"]
    on_disk = json.loads((Path(micro_zoo["task_dir"]).parent / "zoo.json").read_text())
    assert on_disk["models"] == micro_zoo["models"]


def test_every_model_is_a_safetensors_llama_with_a_real_tokenizer(micro_zoo):
    for name, entry in micro_zoo["models"].items():
        folder = Path(entry["path"])
        assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
        assert not list(folder.glob("*.bin")), name
        model, tok = _load(micro_zoo, name)
        assert isinstance(model, LlamaForCausalLM)
        assert tok("rev abc =")["input_ids"][0] == tok.bos_token_id


def test_specialists_share_the_base_and_learn_their_own_skill(micro_zoo):
    base, _ = _load(micro_zoo, "base")
    base_scores = micro_zoo["models"]["base"]["scores"]
    for name, entry in micro_zoo["models"].items():
        if entry["skill"] is None:
            continue
        skill = entry["skill"]
        assert entry["scores"][skill] > base_scores[skill], name
        # a fine-tune of the base: same tensors, moved a little, not a model trained apart
        model, _ = _load(micro_zoo, name)
        base_sd, sd = base.state_dict(), model.state_dict()
        assert sd.keys() == base_sd.keys()
        moved = sum((sd[k] - base_sd[k]).norm() ** 2 for k in sd) ** 0.5
        size = sum(base_sd[k].norm() ** 2 for k in sd) ** 0.5
        assert 0 < moved / size < 0.5, name


def test_scores_equal_lm_eval_on_the_generated_tasks(micro_zoo):
    """The builder's exact-match numbers are lm-eval's own, from the files lm-eval reads."""
    tasks = micro_zoo["tasks"]
    for name in ("base", "ft_reverse"):
        model, tok = _load(micro_zoo, name)
        heldout = [tasks[s]["heldout"] for s in tasks]
        results = simple_scores(model, tok, heldout, include_path=micro_zoo["task_dir"])
        for skill in tasks:
            got = results[tasks[skill]["heldout"]]["acc,none"]
            assert got == pytest.approx(micro_zoo["models"][name]["scores"][skill], abs=1e-4)


def test_generation_task_runs_and_agrees_with_greedy_scoring(micro_zoo):
    tasks = micro_zoo["tasks"]["increment"]
    model, tok = _load(micro_zoo, "ft_increment")
    results = simple_scores(
        model, tok, [tasks["generate_heldout"]], include_path=micro_zoo["task_dir"]
    )
    generated = results[tasks["generate_heldout"]]["exact_match,none"]
    greedy = micro_zoo["models"]["ft_increment"]["scores"]["increment"]
    # generation is greedy too: it can only lose documents where the model fails to stop
    assert generated <= greedy + 1e-9
    assert generated >= greedy - 0.1


def test_same_config_reuses_the_build(micro_zoo, tmp_path, caplog):
    out = Path(micro_zoo["task_dir"]).parent
    before = (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        again = build_zoo(micro_zoo_config(out), progress=False)
    assert "reusing" in caplog.text
    assert again == micro_zoo
    assert (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_corrupted_cache_is_rebuilt_to_the_same_weights(micro_zoo, tmp_path, caplog):
    """A damaged copy is detected and rebuilt; the rebuild is bit-identical (determinism)."""
    src = Path(micro_zoo["task_dir"]).parent
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    cfg = micro_zoo_config(copy)
    manifest = json.loads((copy / "zoo.json").read_text())
    target = copy / "models" / "ft_shift" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF
    target.write_bytes(bytes(data))
    assert load_cached(copy, config_key(cfg))[1] == "models/ft_shift/model.safetensors is corrupted (checksum mismatch)"

    with caplog.at_level("WARNING"):
        rebuilt = build_zoo(cfg, progress=False)
    assert "corrupted" in caplog.text
    def weights(m):  # task YAMLs hold this folder's absolute paths; the weights must not differ
        return {k: v for k, v in m["checksums"].items() if k.startswith("models/")}

    assert weights(rebuilt) == weights(manifest) and len(weights(manifest)) == 12
    assert rebuilt["models"]["ft_shift"]["scores"] == micro_zoo["models"]["ft_shift"]["scores"]


def test_a_different_seed_gives_different_weights():
    a = micro_zoo_config(Path("/nonexistent/a"))
    b = micro_zoo_config(Path("/nonexistent/b"), "zoo.seed=1")
    assert config_key(a) != config_key(b)
    assert config_key(a) == config_key(micro_zoo_config(Path("/elsewhere")))


def test_score_table_lists_models_merges_and_bars(micro_zoo):
    table = score_table(micro_zoo)
    for name in micro_zoo["models"]:
        assert name in table
    assert "task_arithmetic x" in table and "headroom" in table and "bars:" in table


@pytest.mark.parametrize(
    "override, message",
    [
        ("zoo.skills=[increment,sorting]", "zoo.skills: unknown skill"),
        ("zoo.generation_skill=shiftt", "zoo.generation_skill"),
        ("zoo.num_heads=3", "zoo.hidden_size (64) must be divisible by zoo.num_heads (3)"),
        ("+zoo.pretrain_mixture.sorting=1.0", "zoo.pretrain_mixture"),
    ],
)
def test_bad_config_is_named_before_any_work(tmp_path, override, message):
    cfg = micro_zoo_config(tmp_path / "zoo", override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_zoo(cfg, progress=False)
    assert not (tmp_path / "zoo").exists()


def test_out_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FuseEvoError, match="not empty and holds no zoo"):
        build_zoo(micro_zoo_config(tmp_path), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "fuse_evo.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


def test_cli_prints_the_table_of_a_built_zoo(micro_zoo, tmp_path):
    out = Path(micro_zoo["task_dir"]).parent
    run = _cli("zoo", "zoo=micro", f"zoo.out_dir={out}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ft_increment" in run.stdout and "headroom" in run.stdout
    assert str(out / "zoo.json") in run.stdout
    assert not list(tmp_path.iterdir())  # the command leaves nothing in the working directory


def test_cli_unknown_zoo_size_lists_the_known_ones(tmp_path):
    run = _cli("zoo", "zoo=huge", f"zoo.out_dir={tmp_path}")
    assert run.returncode != 0
    assert "Could not find 'zoo/huge'" in run.stderr
    assert "micro" in run.stderr and "tiny" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_unwritable_out_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = _cli("zoo", "zoo=micro", f"zoo.out_dir={blocker}/zoo")
    assert run.returncode == 2
    assert f"zoo.out_dir {blocker}/zoo is not writable" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_misspelt_key_fails_at_compose_time(tmp_path):
    run = _cli("zoo", "zoo.hiden_size=3", f"zoo.out_dir={tmp_path}")
    assert run.returncode != 0
    assert "hiden_size" in run.stderr and "Traceback" not in run.stderr
    assert not list(tmp_path.iterdir())


def test_cli_unknown_command():
    run = _cli("zooo")
    assert run.returncode == 2 and "unknown command 'zooo'" in run.stderr
