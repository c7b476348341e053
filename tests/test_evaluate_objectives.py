"""Objectives: validation that names the bad key, signs and weights, and the cost measures."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from transformers import LlamaConfig, LlamaForCausalLM

from fuse_evo.config import EvaluatorConfig, ObjectiveConfig
from fuse_evo.errors import ConfigError
from fuse_evo.evaluate.objectives import Objectives, measure_costs, parameter_count, path_layers

SCORES = {"zoo_inc/acc,none": 0.75, "zoo_rev_mc/acc_norm,none": 0.5, "zoo_gen/exact_match,strict": 0.25}


def test_metrics_and_costs_become_signed_weighted_objectives():
    objectives = Objectives([
        ObjectiveConfig(name="inc", metric="zoo_inc/acc", weight=2.0),
        {"name": "rev", "metric": "zoo_rev_mc/acc_norm,none"},
        {"name": "gen", "metric": "zoo_gen/exact_match,strict"},
        {"name": "size", "cost": "params", "weight": 1e-6},
        {"name": "speed", "cost": "tokens_per_s", "weight": 0.0},
    ])
    assert [o.direction for o in objectives] == ["max", "max", "max", "min", "max"]
    assert objectives.tasks == ["zoo_inc", "zoo_rev_mc", "zoo_gen"]
    values = objectives.values(SCORES, {"params": 1_000_000, "layers": 4, "tokens_per_s": 500.0})
    assert values == {"inc": 0.75, "rev": 0.5, "gen": 0.25, "size": 1e6, "speed": 500.0}
    assert objectives.losses(values) == [-0.75, -0.5, -0.25, 1e6, -500.0]
    assert objectives.scalar(values) == pytest.approx(2 * 0.75 + 0.5 + 0.25 - 1.0)
    with pytest.raises(KeyError, match="cost 'params' was not measured"):
        objectives.values(SCORES)


@pytest.mark.parametrize(
    "configs, message",
    [
        ([{"name": "a", "metric": "zoo_inc"}], r"objectives\[0\].metric: 'zoo_inc' is not TASK/METRIC"),
        ([{"name": "a", "metric": "zoo_inc/acc,"}], r"objectives\[0\].metric: .* empty metric or filter"),
        ([{"name": "a", "metric": "t/acc", "cost": "params"}], r"objectives\[0\] \(a\): give exactly one"),
        ([{"name": "a"}], r"objectives\[0\] \(a\): give exactly one"),
        ([{"name": "a", "cost": "flops"}], r"objectives\[0\].cost: 'flops' is not one of"),
        ([{"name": "a", "metric": "t/acc", "direction": "maximize"}], r"objectives\[0\].direction: 'maximize'"),
        ([{"name": "a", "metric": "t/acc", "weight": -1}], r"objectives\[0\].weight: must be a finite number >= 0"),
        ([{"name": "a", "metric": "t/acc", "weight": "heavy"}], r"objectives\[0\].weight: 'heavy' is not a number"),
        ([{"name": "a", "metric": "t/acc"}, {"name": "a", "cost": "layers"}], r"objectives\[1\].name: 'a' is used twice"),
        ([{"name": "a", "metrc": "t/acc"}], r"objectives\[0\]: unknown key\(s\) \['metrc'\]"),
        ([ObjectiveConfig(metric="t/acc")], r"objectives\[0\].name: every objective needs a name"),
        ([], "objectives: give at least one objective"),
    ],
)
def test_bad_objective_configs_name_the_key(configs, message):
    with pytest.raises(ConfigError, match=message):
        Objectives(configs)


def test_objectives_are_checked_against_the_evaluated_tasks():
    objectives = Objectives([{"name": "a", "metric": "zoo_inc/acc"}, {"name": "b", "metric": "zoo_mc/acc_norm"}])
    objectives.check_tasks({"zoo_inc": ["acc,none"], "zoo_mc": ["acc,none", "acc_norm,none"]})
    with pytest.raises(ConfigError, match=r"objectives\[1\].metric: task 'zoo_mc' is not evaluated"):
        objectives.check_tasks({"zoo_inc": ["acc,none"]})
    with pytest.raises(ConfigError, match=r"objectives\[0\].metric: task 'zoo_inc' has no metric 'acc,none'"):
        objectives.check_tasks({"zoo_inc": ["exact_match,none"], "zoo_mc": ["acc_norm,none"]})


def test_costs_of_a_model():
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert parameter_count(model) == n
    assert path_layers(model) == 3
    assert path_layers(model, path=[0, 1, 1, 2, 2]) == 5  # a routed path repeats layers

    class Scored:
        tokens, seconds = 1200, 0.5

    assert measure_costs(model, Scored()) == {"params": float(n), "layers": 3.0, "tokens_per_s": 2400.0}
    assert "tokens_per_s" not in measure_costs(model)


def test_evaluator_config_is_a_structured_config():
    base = OmegaConf.structured(EvaluatorConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(base, {
        "tasks": ["zoo_inc"], "limits": {"zoo_inc": 10}, "samples": {"zoo_mc": [1, 2]},
        "objectives": [{"name": "inc", "metric": "zoo_inc/acc"}],
    }))
    assert cfg.objectives == [ObjectiveConfig(name="inc", metric="zoo_inc/acc")]
    assert Objectives(cfg.objectives).names == ["inc"]
    with pytest.raises(ConfigKeyError, match="metrc"):
        OmegaConf.merge(base, {"objectives": [{"name": "inc", "metrc": "zoo_inc/acc"}]})
