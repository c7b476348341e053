"""Data-flow paths: a routed model (the sources' own layers, scaled) computes what its plain
export computes, for the Llama and Qwen2 families, after a save/load with no custom code;
one model's own path with unit scales is that model; bad paths and models are refused."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

from fuse_evo.merge.dataflow import DataFlowError, LayerPath, Router, plain_model, routed_model

# rms_norm_eps tiny: the fold is exact but for the norms' epsilon (RMSNorm(c x) = RMSNorm(x) up
# to it), and these random models' hidden states are small enough for 1e-6 to show at 1e-4
SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-12)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),  # q/k/v biases
}


def _models(family: str, n: int = 3, **override) -> dict[str, torch.nn.Module]:
    config_class, model_class, extra = FAMILIES[family]
    models = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        model = model_class(config_class(**{**SMALL, **extra, **override})).float().eval()
        with torch.no_grad():  # norms away from 1 and non-zero biases, so a wrong fold shows
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.3 * torch.randn_like(p))
        models[f"m{i}"] = model
    return models


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routed_model_equals_its_plain_export(family, tmp_path):
    models = _models(family)
    rng = random.Random(7)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    for trial in range(6):
        steps = [(rng.choice(sorted(models)), rng.randrange(3)) for _ in range(rng.randint(1, 7))]
        path = LayerPath(steps, [rng.uniform(0.4, 2.5) for _ in steps], rng.choice(sorted(models)))
        routed, plain = routed_model(path, models), plain_model(path, models)
        assert plain.config.num_hidden_layers == len(steps)
        expected = _logits(routed, ids)
        torch.testing.assert_close(_logits(plain, ids), expected, rtol=1e-4, atol=1e-4)
        if trial == 0:  # an ordinary checkpoint: loads and runs with no fuse_evo code
            plain.save_pretrained(tmp_path / "plain")
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").float().eval()
            assert type(loaded).__name__ == type(models["m0"]).__name__
            torch.testing.assert_close(_logits(loaded, ids), expected, rtol=1e-4, atol=1e-4)
    # the routed model references the sources' layers: nothing was copied
    path = LayerPath([("m1", 2), ("m0", 0)], [1.0, 1.5], "m0")
    routed = routed_model(path, models)
    assert routed.model.layers[0].layer is models["m1"].model.layers[2]
    assert routed.model.embed_tokens is models["m0"].model.embed_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_models_own_path_is_that_model(family):
    models = _models(family, n=2)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))
    path = LayerPath([("m1", i) for i in range(3)], [1.0] * 3, "m1")
    assert torch.equal(_logits(routed_model(path, models), ids), _logits(models["m1"], ids))
    assert torch.equal(_logits(plain_model(path, models), ids), _logits(models["m1"], ids))


def test_one_router_serves_every_path_in_place():
    models = _models("llama", n=2)
    router = Router(models, "m0")
    ids = torch.randint(0, SMALL["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    live = router.model
    for steps, scales in (([("m0", 0), ("m1", 1)], [1.0, 1.7]), ([("m1", 2)] * 3, [1.0, 0.8, 1.2]), ([("m0", 1)], [1.0])):
        path = LayerPath(steps, scales, "m0")
        assert router.route(path) is live and live.config.num_hidden_layers == len(steps)
        torch.testing.assert_close(_logits(live, ids), _logits(plain_model(path, models), ids), rtol=1e-4, atol=1e-4)
    other = LayerPath([("m0", 0), ("m1", 1)], [1.0, 0.9], "m1")  # another io model: the frame follows
    assert router.route(other) is live and live.lm_head is models["m1"].lm_head
    torch.testing.assert_close(_logits(live, ids), _logits(plain_model(other, models), ids), rtol=1e-4, atol=1e-4)


def test_generation_with_a_repeated_layer_uses_one_cache_slot_per_step():
    models = _models("llama", n=2)
    path = LayerPath([("m0", 0), ("m1", 1), ("m0", 0), ("m1", 2)], [1.0, 0.7, 1.3, 0.9], "m1")
    ids = torch.randint(0, SMALL["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        routed = routed_model(path, models).generate(ids, **kw)
        plain = plain_model(path, models).generate(ids, **kw)
    assert torch.equal(routed, plain)
    assert models["m0"].model.layers[0].self_attn.layer_idx == 0  # the source's own index is back


def test_bad_paths_and_models_are_refused():
    models = _models("llama", n=2)
    with pytest.raises(DataFlowError, match="path: empty"):
        LayerPath([], [], "m0")
    with pytest.raises(DataFlowError, match=r"path step 1 \(m1 layer 2\): scale -0.5 must be finite and > 0"):
        LayerPath([("m0", 0), ("m1", 2)], [1.0, -0.5], "m0")
    with pytest.raises(DataFlowError, match="2 steps but 1 scales"):
        LayerPath([("m0", 0), ("m1", 2)], [1.0], "m0")
    with pytest.raises(DataFlowError, match=r"path step 0: model 'm1' has layers 0..2, not 5"):
        routed_model(LayerPath([("m1", 5)], [1.0], "m0"), models)
    with pytest.raises(DataFlowError, match=r"path step 0: model 'x' is not one of \['m0', 'm1'\]"):
        routed_model(LayerPath([("x", 0)], [1.0], "m0"), models)
    wide = _models("llama", n=1, hidden_size=64)["m0"]
    with pytest.raises(DataFlowError, match=r"path step 1: model 'wide' has hidden_size 64, the io model 'm0' has 32"):
        plain_model(LayerPath([("m0", 0), ("wide", 0)], [1.0, 1.0], "m0"), {**models, "wide": wide})
    gemma = Gemma2ForCausalLM(Gemma2Config(**{**SMALL, "head_dim": 8}))
    with pytest.raises(DataFlowError, match="needs a pre-norm RMSNorm decoder layer"):
        routed_model(LayerPath([("g", 0)], [1.0], "g"), {"g": gemma})
