"""Recipe: plain data, canonical hashing, YAML round trip, group resolution, bad fields named."""

from __future__ import annotations

import pytest

from fuse_evo.models import TensorGroup
from fuse_evo.recipe import Recipe, RecipeError


def _recipe(**kw):
    base = dict(
        method="ties",
        models=("a", "b"),
        parameters={"lambda": 1.0, "normalize": True},
        groups={
            "*": {"*": {"weight": 0.5, "density": 0.7}},
            "layers.0-3": {"a": {"weight": 0.9}},
            "layers.2": {"*": {"density": 0.3}},
            "layers.2.mlp": {"b": {"weight": 0.1}},
            "head": {"a": {"weight": 0.0}},
        },
        seed=7,
    )
    base.update(kw)
    return Recipe(**base)


def test_resolution_takes_the_most_specific_group():
    r = _recipe()
    assert r.model_params(TensorGroup("layer", 2, "mlp"), "b") == {"weight": 0.1, "density": 0.3}
    assert r.model_params(TensorGroup("layer", 2, "attn"), "a") == {"weight": 0.9, "density": 0.3}
    assert r.model_params(TensorGroup("layer", 5, "attn"), "a") == {"weight": 0.5, "density": 0.7}
    assert r.model_params(TensorGroup("layer", 3, "mlp"), "a") == {"weight": 0.9, "density": 0.7}
    assert r.model_params(TensorGroup("head"), "a") == {"weight": 0.0, "density": 0.7}
    assert r.model_params(TensorGroup("embed"), "b") == {"weight": 0.5, "density": 0.7}


def test_key_is_canonical_and_sensitive():
    a = _recipe()
    b = Recipe.from_dict(dict(reversed(list(a.to_dict().items()))))
    assert a == b and a.key == b.key and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert _recipe(seed=8).key != a.key
    changed = a.to_dict()
    changed["groups"]["layers.2"]["*"]["density"] = 0.31
    assert Recipe.from_dict(changed).key != a.key
    # ints and floats that are equal numbers are the same recipe
    assert _recipe(parameters={"lambda": 1, "normalize": True}).key == a.key


def test_yaml_round_trip(tmp_path):
    a = _recipe()
    a.save(tmp_path / "r.yaml")
    b = Recipe.load(tmp_path / "r.yaml")
    assert b == a and b.key == a.key
    assert "method: ties" in a.to_yaml()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(method="tiess"), "recipe.method: unknown merge method 'tiess'"),
        (dict(models=()), "recipe.models"),
        (dict(models=("base", "a")), "'base' is the base"),
        (dict(groups={"layer.1": {"a": {"weight": 1.0}}}), "bad group 'layer.1'"),
        (dict(groups={"layers.1": {"c": {"weight": 1.0}}}), r"recipe.groups.layers.1: unknown model\(s\) \['c'\]"),
    ],
)
def test_bad_recipes_name_the_field(kw, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(**kw)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(RecipeError, match=r"unknown field\(s\) \['wieght'\]"):
        Recipe.from_dict({"method": "linear", "models": ["a"], "wieght": 1})
    with pytest.raises(RecipeError, match="recipe.models is missing"):
        Recipe.from_dict({"method": "linear"})
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_yaml("- just a list")
