"""The smol zoo's builder: LoRA adapters that start at the base and fold back exactly, a loss
on the answer only that equals the full model's, its config checks, and a miniature build on
the real SmolLM2 (two skills, a few steps) with its manifest, checksums and reuse."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fuse_evo.config import ZooConfig
from fuse_evo.errors import ConfigError
from fuse_evo.zoo.build import build_zoo, config_key, validate
from fuse_evo.zoo.chat_skills import RETENTION, chat_splits
from fuse_evo.zoo.smol import IGNORE, LoRALinear, add_lora, answer_batch, answer_loss, merge_lora


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_lora_starts_at_the_base_and_folds_back_into_the_same_function():
    model = _llama()
    ids = torch.randint(0, 97, (3, 11))
    before = model(ids).logits
    keys = set(model.state_dict())
    params = add_lora(model, rank=4, alpha=8.0)
    assert len(params) == 2 * 7 * 2  # A and B on 7 linears of 2 layers
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(model(ids).logits, before)  # B starts at zero
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    adapted = model(ids).logits
    assert (adapted - before).abs().max() > 1e-3
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == keys  # an ordinary checkpoint again
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def smol_tokenizer(smol_base):
    return AutoTokenizer.from_pretrained(smol_base)


def test_the_answer_loss_is_the_full_models_loss_on_the_answer_tokens(smol_tokenizer):
    tok = smol_tokenizer
    docs = chat_splits(tok, "dates", seed=0, n_search=3, n_heldout=0)["search"]
    ids, mask, labels = answer_batch(tok, docs)
    for row, doc in enumerate(docs):
        start = len(tok(doc.prompt)["input_ids"])
        assert (labels[row, :start] == IGNORE).all()
        answer = labels[row][labels[row] != IGNORE]
        assert tok.decode(answer) == "\n" + doc.answer + "<|im_end|>"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, ids, mask, labels), full, atol=1e-5, rtol=1e-5)


def _smol(tmp_path, **over) -> ZooConfig:
    fields = dict(name="smol", kind="smol", out_dir=str(tmp_path / "zoo"), skills=["extraction", "dates"],
                  generation_skill=None, n_search=4, n_heldout=4, batch_size=2, finetune_lr=2e-3,
                  finetune_max_steps=2, finetune_check_every=1, finetune_target=0.95, uniform_scales=[0.5])
    fields.update(over)
    return ZooConfig(**fields)


def test_a_smol_config_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"zoo.skills: unknown chat skill\(s\) \['increment'\]"):
        validate(_smol(tmp_path, skills=["extraction", "increment"]))
    with pytest.raises(ConfigError, match="zoo.kind: 'big' is not one of"):
        validate(_smol(tmp_path, kind="big"))
    with pytest.raises(ConfigError, match="zoo.lora_rank must be positive"):
        validate(_smol(tmp_path, lora_rank=0))
    with pytest.raises(ConfigError, match=f"zoo.gguf: {tmp_path}/none.gguf is not a file"):
        validate(_smol(tmp_path, gguf=str(tmp_path / "none.gguf")))
    # the LoRA fields are a smol build's: a scratch zoo's key (and its cache) ignores them
    scratch = ZooConfig()
    assert config_key(dataclasses.replace(scratch, lora_rank=4)) == config_key(scratch)
    smol = _smol(tmp_path)
    assert config_key(dataclasses.replace(smol, lora_rank=4)) != config_key(smol)
    run = subprocess.run([sys.executable, "-m", "fuse_evo.cli", "zoo", "zoo=smol", f"zoo.out_dir={tmp_path}/z",
                          "zoo.skills=[extraction,arithmetic]"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "zoo.skills: unknown chat skill(s) ['arithmetic']" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "z").exists()


def test_a_miniature_smol_build_is_a_zoo_of_full_weight_llamas_and_is_reused(smol_base, tmp_path, caplog):
    cfg = _smol(tmp_path)
    manifest = build_zoo(cfg, progress=False)
    assert set(manifest["models"]) == {"base", "ft_extraction", "ft_dates"}
    assert set(manifest["tasks"]) == {"extraction", "dates", RETENTION}
    assert manifest["tasks"]["dates"] == {"search": "smol_dates_search", "heldout": "smol_dates_heldout",
                                          "gen_heldout": "smol_dates_gen_heldout"}
    assert "gen_heldout" not in manifest["tasks"][RETENTION]
    assert manifest["parameters"] == 134_515_008
    assert "every_specialist_ge_0.9_on_own_skill" in manifest["summary"]["bars"]
    base = AutoModelForCausalLM.from_pretrained(manifest["models"]["base"]["path"])
    ft = AutoModelForCausalLM.from_pretrained(manifest["models"]["ft_dates"]["path"])
    assert manifest["models"]["ft_dates"]["train_steps"] >= 1
    sb, sf = base.state_dict(), ft.state_dict()
    assert set(sb) == set(sf)
    changed = {k for k in sb if not torch.equal(sb[k], sf[k])}
    # LoRA touched the decoder's linears only: embeddings (tied head) and norms are the base's
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj") for k in changed)
    assert all(v.dtype == torch.float32 for v in sf.values())
    reference = AutoModelForCausalLM.from_pretrained(smol_base)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in sb.items())  # the converted GGUF itself
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text())["summary"] == manifest["summary"]
    with caplog.at_level("INFO"):
        assert build_zoo(cfg, progress=False) == manifest
    assert "reusing the zoo" in caplog.text
    # deterministic: another folder, the same config, the same weights and scores
    again = build_zoo(dataclasses.replace(cfg, out_dir=str(tmp_path / "again")), progress=False)
    assert again["models"]["ft_dates"]["scores"] == manifest["models"]["ft_dates"]["scores"]
    assert all(again["checksums"][f"models/{name}/model.safetensors"] == manifest["checksums"][f"models/{name}/model.safetensors"]
               for name in manifest["models"])
