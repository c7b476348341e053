"""SearchSpace: gene layout, genome <-> recipe both ways, bad genomes and configs named, and the
shipped search_spaces/ composed through Hydra."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fuse_evo.errors import ConfigError
from fuse_evo.models import tensor_group
from fuse_evo.recipe import Recipe
from fuse_evo.config import GeneConfig, GranularityConfig, SpaceConfig
from fuse_evo.search import SearchSpace, SpaceError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))


def ties_space(**kw) -> SearchSpace:
    config = SpaceConfig(
        method="ties", models=["a", "b"], num_layers=5,
        genes={"weight": GeneConfig(0.0, 1.0), "density": GeneConfig(0.1, 1.0, init=0.5)},
        fixed={"normalize": True, "lambda": 1.0},
        granularity=GranularityConfig(layers_per_block=2, split_attn_mlp=True, embed_norm_head="shared"),
    )
    return SearchSpace(replace(config, **kw))


def random_genome(space: SearchSpace, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(space.lower, space.upper)


# ---------------------------------------------------------------------------- layout
def test_genes_per_block_part_and_model():
    space = ties_space()
    # groups: "*", then blocks 0-1, 2-3 and the short last block 4, each split attn/mlp
    assert space.dimension == (1 + 3 * 2) * 2 * 2
    assert space.names[:4] == ["*/a/weight", "*/a/density", "*/b/weight", "*/b/density"]
    assert "layers.2-3.attn/b/weight" in space.names and "layers.4.mlp/a/density" in space.names
    assert space.names[-1] == "layers.4.mlp/b/density"
    assert np.all(space.lower < space.upper)


def test_scopes_and_own_extras():
    space = ties_space(
        genes={"weight": GeneConfig(0.0, 1.0, scope="model"), "density": GeneConfig(0.1, 1.0, scope="group"),
               "lambda": GeneConfig(0.5, 2.0)},
        fixed={"normalize": True},
        granularity=GranularityConfig(layers_per_block=1, embed_norm_head="own"),
    )
    groups = ["embed", *(f"layers.{i}" for i in range(5)), "norm", "head"]
    assert space.names == [f"{g}/density" for g in groups] + ["a/weight", "b/weight", "lambda"]


def test_initial_point_is_a_uniform_merge():
    space = ties_space(models=["a", "b", "c", "d"])
    x0 = dict(zip(space.names, space.initial()))
    assert x0["layers.0-1.attn/c/weight"] == pytest.approx(0.25) and x0["*/d/density"] == 0.5
    # a natural value outside the bounds is clipped into them
    clipped = ties_space(genes={"weight": GeneConfig(0.5, 1.0), "density": GeneConfig(0.1, 0.8)})
    x0 = dict(zip(clipped.names, clipped.initial()))
    assert x0["layers.4.mlp/a/weight"] == 0.5 and x0["*/a/density"] == 0.8


def test_num_layers_from_the_model_config():
    config = replace(ties_space().config, num_layers=None)
    assert SearchSpace(config, model_config={"num_hidden_layers": 3}).num_layers == 3
    with pytest.raises(ConfigError, match="space.num_layers"):
        SearchSpace(config)
    with pytest.raises(ConfigError, match="space.num_layers: 5, but the model config has 4"):
        SearchSpace(replace(config, num_layers=5), model_config={"num_hidden_layers": 4})


# ---------------------------------------------------------------------------- decode / encode
def test_decoded_recipe_resolves_each_tensor_to_its_gene():
    space = ties_space()
    x = random_genome(space)
    genes = dict(zip(space.names, x))
    recipe = space.decode(x)
    assert isinstance(recipe, Recipe) and recipe.method == "ties" and recipe.models == ("a", "b")
    assert recipe.parameters == {"normalize": True, "lambda": 1.0}
    cases = {
        "model.layers.4.self_attn.q_proj.weight": "layers.4.attn",
        "model.layers.3.mlp.down_proj.weight": "layers.2-3.mlp",
        "model.layers.0.input_layernorm.weight": "layers.0-1.attn",
        "model.layers.1.post_attention_layernorm.weight": "layers.0-1.mlp",
        "model.embed_tokens.weight": "*",
        "model.norm.weight": "*",
        "lm_head.weight": "*",
    }
    for tensor, group in cases.items():
        for model in ("a", "b"):
            got = recipe.model_params(tensor_group(tensor), model, tensor)
            want = {"weight": genes[f"{group}/{model}/weight"], "density": genes[f"{group}/{model}/density"]}
            assert got == pytest.approx(want), tensor


def test_layer_beyond_a_partial_block():
    # 5 layers in blocks of 2: the last block is layer 4 alone, keyed layers.4
    recipe = ties_space().decode(ties_space().initial())
    assert "layers.4.attn" in recipe.groups and "layers.4-5.attn" not in recipe.groups


def test_decode_encode_round_trip_every_scope():
    space = ties_space(
        method="della",
        genes={"weight": GeneConfig(-0.5, 1.5), "density": GeneConfig(0.3, 0.7, scope="group"),
               "epsilon": GeneConfig(0.0, 0.2, scope="model"), "lambda": GeneConfig(0.5, 2.0)},
        fixed={"rescale": True},
    )
    for seed in range(3):
        x = random_genome(space, seed)
        recipe = space.decode(x, seed=11)
        assert recipe.seed == 11
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
        np.testing.assert_array_equal(space.encode(recipe), x)
    assert space.decode(x).seed == space.config.seed


def test_encode_accepts_an_equivalent_recipe_written_otherwise():
    space = ties_space(granularity=GranularityConfig(layers_per_block=2, embed_norm_head="own"))
    x = random_genome(space)
    genes = dict(zip(space.names, x))
    # the same merge with the block genes spelled out per layer
    groups = {}
    for i in range(5):
        block = f"layers.{i // 2 * 2}" + ("" if i == 4 else f"-{i // 2 * 2 + 1}")
        groups[f"layers.{i}"] = {m: {p: genes[f"{block}/{m}/{p}"] for p in ("weight", "density")} for m in "ab"}
    for kind in ("embed", "norm", "head"):
        groups[kind] = {m: {p: genes[f"{kind}/{m}/{p}"] for p in ("weight", "density")} for m in "ab"}
    recipe = Recipe("ties", ("a", "b"), parameters={"normalize": True, "lambda": 1.0}, groups=groups)
    np.testing.assert_allclose(space.encode(recipe), x)


def test_encode_refuses_what_the_space_cannot_express():
    space = ties_space()
    recipe = space.decode(random_genome(space)).to_dict()
    finer = {**recipe, "groups": {**recipe["groups"], "layers.2": {"a": {"weight": 0.123}}}}
    with pytest.raises(SpaceError, match=r"gene layers\.2-3\.attn/a/weight takes one value"):
        space.encode(Recipe.from_dict(finer))
    with pytest.raises(SpaceError, match="recipe.method"):
        space.encode(Recipe.from_dict({**recipe, "method": "dare_ties"}))
    with pytest.raises(SpaceError, match="recipe.models"):
        space.encode(Recipe.from_dict({**recipe, "models": ["b", "a"]}))
    with pytest.raises(SpaceError, match="recipe.parameters.lambda"):
        space.encode(Recipe.from_dict({**recipe, "parameters": {"normalize": True, "lambda": 0.7}}))
    per_tensor = {**recipe, "groups": {**recipe["groups"], "tensor:lm_head.weight": {"a": {"weight": 0.5}}}}
    with pytest.raises(SpaceError, match="tensor:lm_head.weight"):
        space.encode(Recipe.from_dict(per_tensor))
    outside = {**recipe, "groups": {**recipe["groups"], "*": {m: {"weight": 3.0, "density": 0.5} for m in "ab"}}}
    with pytest.raises(SpaceError, match=r"gene \*/a/weight = 3.0 is outside \[0.0, 1.0\]"):
        space.encode(Recipe.from_dict(outside))


# ---------------------------------------------------------------------------- bad genomes
def test_bad_genomes_are_refused_naming_the_gene():
    space = ties_space()
    x = space.initial()
    with pytest.raises(SpaceError, match=f"genome: 27 values, the space has {space.dimension} genes"):
        space.validate(x[:27])
    with pytest.raises(SpaceError, match="shape"):
        space.validate(x.reshape(2, -1))
    with pytest.raises(SpaceError, match="not a vector of numbers"):
        space.validate(["x"] * space.dimension)
    bad = x.copy()
    bad[space.names.index("layers.2-3.mlp/b/density")] = np.nan
    with pytest.raises(SpaceError, match="gene layers.2-3.mlp/b/density is nan"):
        space.decode(bad)
    bad = x.copy()
    bad[space.names.index("*/a/density")] = 0.05
    with pytest.raises(SpaceError, match=r"gene \*/a/density = 0.05 is outside \[0.1, 1.0\]"):
        space.decode(bad)
    np.testing.assert_array_equal(space.validate(list(x)), x)


# ---------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(genes={"wieght": GeneConfig(0.0, 1.0)}), r"space.genes.wieght: ties cannot search 'wieght'"),
        (dict(method="task_arithmetic"), r"space.genes.density: task_arithmetic cannot search"),
        (dict(genes={"weight": GeneConfig(0.0, 1.0, scope="layer")}), r"space.genes.weight.scope"),
        (dict(genes={"lambda": GeneConfig(0.0, 1.0, scope="group")}, fixed={}), r"space.genes.lambda.scope: lambda takes scope global"),
        (dict(genes={"weight": GeneConfig(1.0, 1.0)}), r"space.genes.weight: need finite bounds with low < high"),
        (dict(genes={"weight": GeneConfig(0.0, 1.0, init=2.0)}), r"space.genes.weight.init: 2.0 is outside"),
        (dict(genes={"weight": GeneConfig(0.0, 1.0), "density": GeneConfig(0.0, 1.0)}), r"space.genes.density: density must lie in \(0, 1\]"),
        (dict(genes={"density": GeneConfig(0.1, 1.0)}), r"space.genes.weight: ties needs weight"),
        (dict(fixed={"weight": 1.0}), r"space.fixed.weight: weight is also a gene"),
        (dict(fixed={"t": 0.5}), r"space.fixed.t: ties has no parameter 't'"),
        (dict(genes={}), r"space.genes: nothing to search"),
        (dict(models=[]), r"space.models: name the source models"),
        (dict(models=["a", "base"]), r"space.models: each source once and not the base"),
        (dict(granularity=GranularityConfig(layers_per_block=0)), r"space.granularity.layers_per_block"),
        (dict(granularity=GranularityConfig(embed_norm_head="tied")), r"space.granularity.embed_norm_head"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        ties_space(**change)


def test_della_bounds_that_could_break_the_engine_are_refused():
    genes = {"weight": GeneConfig(0.0, 1.0), "density": GeneConfig(0.2, 0.8)}
    ties_space(method="della", genes={**genes, "epsilon": GeneConfig(0.0, 0.15)})
    with pytest.raises(ConfigError, match="space.genes.epsilon: della needs epsilon"):
        ties_space(method="della", genes={**genes, "epsilon": GeneConfig(0.0, 0.25)})
    # density up to 1 leaves no room for epsilon's default 0.15
    with pytest.raises(ConfigError, match="space.fixed.epsilon"):
        ties_space(method="della", genes={"weight": GeneConfig(0.0, 1.0), "density": GeneConfig(0.2, 1.0)})
    ties_space(method="della", genes=genes, fixed={"epsilon": 0.1})


def test_slerp_takes_one_model_and_a_t_per_group():
    config = SpaceConfig(method="slerp", models=["a"], num_layers=2, genes={"t": GeneConfig(0.0, 1.0)})
    space = SearchSpace(config)
    assert space.names == ["embed/t", "layers.0/t", "layers.1/t", "norm/t", "head/t"]
    recipe = space.decode([0.1, 0.2, 0.3, 0.4, 0.5])
    assert recipe.model_params(tensor_group("model.layers.1.mlp.up_proj.weight"), "a")["t"] == 0.3
    np.testing.assert_array_equal(space.encode(recipe), [0.1, 0.2, 0.3, 0.4, 0.5])
    one_t = SearchSpace(replace(config, genes={"t": GeneConfig(0.0, 1.0, scope="global")}))
    assert one_t.decode([0.25]).parameters == {"t": 0.25}
    assert one_t.encode(one_t.decode([0.25])).tolist() == [0.25]
    with pytest.raises(ConfigError, match="slerp merges one source model"):
        SearchSpace(replace(config, models=["a", "b"]))


# ---------------------------------------------------------------------------- Hydra
def _compose(tmp_path: Path, overrides: list[str]):
    """Compose a tiny primary config that picks a space, as the search command will."""
    (tmp_path / "primary.yaml").write_text(
        f"defaults:\n  - _self_\n  - space: ta_per_layer\nhydra:\n  searchpath:\n    - file://{REPO / 'configs'}\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return compose(config_name="primary", overrides=overrides)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_compose_and_build(tmp_path, name):
    cfg = _compose(tmp_path, [f"space={name}", "space.models=[ft_a,ft_b]", "space.num_layers=4"])
    config = OmegaConf.to_object(cfg.space)
    assert isinstance(config, SpaceConfig) and isinstance(config.granularity, GranularityConfig)
    if config.method == "dataflow":  # genomes -> layer paths -> genomes
        from fuse_evo.search.dataflow_space import DataFlowSpace

        space = DataFlowSpace(replace(config.dataflow, models=config.models), {"num_hidden_layers": 4})
        path = space.decode(space.initial())
        assert space.decode(space.encode(path)) == path and path.io_model == "ft_a"
        return
    if config.method == "slerp":
        config = replace(config, models=["ft_a"])
    space = SearchSpace(config)
    x = random_genome(space)
    np.testing.assert_array_equal(space.encode(space.decode(x)), x)
    space.decode(space.initial())


def test_typos_fail_at_compose_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match="layer_per_block"):
        _compose(tmp_path, ["space.granularity.layer_per_block=2"])
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "typo.yaml").write_text(
        "defaults:\n  - space_schema\n  - _self_\nmethod: ties\ngenes:\n  weight: {low: 0.0, hihg: 1.0}\n"
    )
    with pytest.raises(ConfigCompositionException, match="hihg"):
        _compose(tmp_path, ["space=typo"])
    with pytest.raises(ConfigCompositionException, match="split_attn_mlp"):
        _compose(tmp_path, ["space.granularity.split_attn_mlp=maybe"])


def test_an_unknown_method_is_named():
    with pytest.raises(ConfigError, match=r"space.method: 'task_arithmatic' is not a merge method \(linear, "):
        SearchSpace(SpaceConfig(method="task_arithmatic", models=["a"], num_layers=1,
                                genes={"weight": GeneConfig(0.0, 1.0)}))
    with pytest.raises(ConfigError, match="a data-flow space .* is a DataFlowSpace"):
        SearchSpace(SpaceConfig(method="dataflow", models=["a"], num_layers=1))
