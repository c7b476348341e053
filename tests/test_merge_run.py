"""`fuse-evo merge`: our merge files and mergekit YAML configs, and parity with mergekit itself."""

from __future__ import annotations

import importlib.util

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fuse_evo.merge.run import merge_file
from fuse_evo.merge.mergekit import MergekitConfigError, parse, to_recipe
from fuse_evo.models import ModelPool
from fuse_evo.recipe import Recipe


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _paths(zoo):
    m = zoo["models"]
    return m["base"]["path"], m["ft_increment"]["path"], m["ft_reverse"]["path"], m["ft_shift"]["path"]


def _config(zoo, method: str, dtype: str = "float32") -> dict:
    base, inc, rev, shift = _paths(zoo)
    models = [
        {"model": inc, "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "self_attn", "value": 0.5}, {"value": 0.7}], "gamma": 0.02}},
        {"model": rev, "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": shift, "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}], "density": 0.9}},
    ]
    params: dict = {}
    if method in ("ties", "breadcrumbs_ties"):
        params = {"normalize": True, "lambda": 0.9}
    if method == "task_arithmetic":
        params = {"lambda": 0.7}
    if method == "linear":
        params = {"normalize": True}
        for m in models:
            m["parameters"] = {"weight": m["parameters"]["weight"]}
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        params["gamma"] = 0.05
    if method == "slerp":
        models = [{"model": base}, {"model": rev}]
        params = {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.4}]}
    if method == "model_stock":
        models = [{"model": inc}, {"model": rev}, {"model": shift}]
    if method not in ("slerp", "model_stock", "linear", "breadcrumbs", "breadcrumbs_ties"):
        for m in models:
            m["parameters"].pop("gamma", None)
    if method in ("task_arithmetic",):
        for m in models:
            m["parameters"].pop("density", None)
    cfg = {"merge_method": method, "models": models, "dtype": dtype}
    if method != "linear":
        cfg["base_model"] = base
    if params:
        cfg["parameters"] = params
    return cfg


def test_our_merge_file_rebuilds_an_export(micro_zoo, tmp_path):
    base, inc, rev, shift = _paths(micro_zoo)
    recipe = Recipe("dare_ties", ("inc", "shift"), seed=5,
                    groups={"*": {"*": {"weight": 0.7, "density": 0.6}}, "layers.1": {"inc": {"weight": 1.2}}})
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"sources": {"base": base, "inc": inc, "shift": shift}, "recipe": recipe.to_dict()}))
    first = merge_file(tmp_path / "m.yaml", tmp_path / "first")
    # the export's own recipe.yaml is a merge file: merging it again gives the same tensors
    again = merge_file(first / "recipe.yaml", tmp_path / "again")
    a, b = _load_dir(first), _load_dir(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_writes_shard_by_shard_what_the_live_model_holds(micro_zoo, tmp_path):
    """Small shards: several files and an index, loadable by transformers, holding exactly the
    engine's merge into a live model (written tensor by tensor, no second model in memory);
    a dtype in the merge file is the saved one."""
    from transformers import AutoModelForCausalLM

    from fuse_evo.merge.live import LiveMerge

    base, inc, rev, shift = _paths(micro_zoo)
    recipe = Recipe("ties", ("inc", "shift"), groups={"*": {"*": {"weight": 0.7, "density": 0.4}}})
    merge = {"sources": {"base": base, "inc": inc, "shift": shift}, "recipe": recipe.to_dict(), "dtype": "bfloat16"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(merge))
    out = merge_file(tmp_path / "m.yaml", tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    saved = _load_dir(out)
    pool = ModelPool(base, {"inc": inc, "shift": shift})
    live = LiveMerge(pool, device="cpu", dtype="bfloat16").load(recipe).state_dict()
    assert saved.keys() == set(pool.tensor_names)
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], live[k]) for k in saved)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()[pool.tensor_names[0]], saved[pool.tensor_names[0]])
    run = subprocess.run([sys.executable, "-m", "fuse_evo.cli", "merge", str(tmp_path / "m.yaml"), "--out",
                          str(tmp_path / "o"), "--max-shard-size", "lots"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--max-shard-size: 'lots' is not a size" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "o").exists()


def test_mergekit_config_reads_gradients_filters_and_precedence(micro_zoo):
    base, inc, rev, shift = _paths(micro_zoo)
    cfg = parse(_config(micro_zoo, "ties"))
    assert list(cfg.models) == ["ft_increment", "ft_reverse", "ft_shift"]
    pool = ModelPool(base, {"ft_increment": inc, "ft_reverse": rev, "ft_shift": shift})
    recipe = to_recipe(cfg, pool)
    g = pool.groups
    p = lambda name, model: recipe.model_params(g[name], model, name)  # noqa: E731
    # gradient [0.2, 0.8] over 2 layers: layer 0 -> 0.2, layer 1 -> 0.8, embed/norm/head -> 0.2
    assert p("model.layers.0.mlp.up_proj.weight", "ft_increment")["weight"] == pytest.approx(0.2)
    assert p("model.layers.1.mlp.up_proj.weight", "ft_increment")["weight"] == pytest.approx(0.8)
    assert p("lm_head.weight", "ft_increment")["weight"] == pytest.approx(0.2)
    # filters: substring of the tensor name; the layer norms match neither filter
    assert p("model.layers.1.self_attn.q_proj.weight", "ft_increment")["density"] == 0.5
    assert p("model.layers.1.input_layernorm.weight", "ft_increment")["density"] == 0.7
    assert p("model.layers.0.mlp.down_proj.weight", "ft_shift")["weight"] == 0.3
    assert p("model.layers.0.self_attn.o_proj.weight", "ft_shift")["weight"] == 0.6
    assert recipe.parameters == {"normalize": True, "lambda": 0.9}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "nuslerp"}, "merge_method: 'nuslerp' is not supported"),
        ({"slices": [{"sources": []}]}, "slices: layer stacking .* is not supported"),
        ({"tokenizer_source": "union"}, "vocabulary"),
        ({"base_model": None}, "base_model: ties needs a base model"),
        ({"models": []}, "models: list the models"),
    ],
)
def test_bad_mergekit_configs_are_named(micro_zoo, change, message):
    cfg = {**_config(micro_zoo, "ties"), **change}
    if cfg.get("base_model") is None:
        cfg.pop("base_model")
    with pytest.raises(MergekitConfigError, match=message):
        parse(cfg)


def test_cli_merge_errors_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("just: [a, list\n")
    run = subprocess.run([sys.executable, "-m", "fuse_evo.cli", "merge", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not valid YAML" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def _mergekit_yaml(config: Path, out: Path) -> None:
    """What ``mergekit-yaml CONFIG OUT`` does, in this process (mergekit's import, ~7 s, once)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions()
    options.apply_global_options()
    source = config.read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), str(out), options=options,
              config_source=source)


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit (test extra) is not installed")
@pytest.mark.parametrize(
    "method, dtype, tol",
    [
        ("linear", "float32", 1e-5), ("task_arithmetic", "float32", 1e-5), ("ties", "float32", 1e-5),
        ("breadcrumbs", "float32", 1e-5), ("breadcrumbs_ties", "float32", 1e-5),
        ("slerp", "float32", 1e-5), ("model_stock", "float32", 1e-5),
        ("ties", "bfloat16", 2 ** -7),
    ],
)
def test_parity_with_mergekit(micro_zoo, tmp_path, method, dtype, tol):
    """The same mergekit YAML through mergekit-yaml and through fuse-evo merge: same tensors."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(micro_zoo, method, dtype)))
    _mergekit_yaml(cfg, tmp_path / "mk")
    ours = merge_file(cfg, tmp_path / "fe")
    theirs, mine = _load_dir(tmp_path / "mk"), _load_dir(ours)
    assert theirs.keys() == mine.keys()
    for k in theirs:
        assert theirs[k].dtype == mine[k].dtype, k
        # bf16: both round an fp32-exact value once, or mergekit accumulates in bf16; allow that
        scale = max(1.0, theirs[k].float().abs().max().item())
        diff = (theirs[k].float() - mine[k].float()).abs().max().item()
        assert diff <= tol * scale * (8 if dtype == "bfloat16" else 1), f"{method} {k}: {diff}"
