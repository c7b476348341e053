"""ModelPool: loading (single, sharded, pickled opt-in), compatibility errors, tensor groups."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fuse_evo.errors import FuseEvoError
from fuse_evo.models import IncompatibleModels, ModelPool, TensorGroup, tensor_group
from fuse_evo.zoo.tokenizer import build_tokenizer


def _zoo_paths(manifest):
    models = manifest["models"]
    return models["base"]["path"], {n: m["path"] for n, m in models.items() if m["skill"]}


def _qwen2(tmp: Path, name: str, seed: int, **shape) -> Path:
    """A small random Qwen2 (a family with q/k/v biases), saved with the zoo tokenizer."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=shape.get("intermediate", 64),
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    out = tmp / name
    model.save_pretrained(out, max_shard_size=shape.get("shard", "50GB"))
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen")
    return _qwen2(tmp, "base", 0), {"a": _qwen2(tmp, "a", 1), "b": _qwen2(tmp, "b", 2)}


def test_pool_loads_the_zoo_and_groups_every_tensor(micro_zoo):
    base, sources = _zoo_paths(micro_zoo)
    pool = ModelPool(base, sources)
    assert pool.names == ["ft_increment", "ft_reverse", "ft_shift"]
    assert pool.num_layers == 2
    kinds = {g.kind for g in pool.groups.values()}
    assert kinds == {"embed", "layer", "norm", "head"}
    for layer in range(2):
        parts = {g.part for g in pool.groups.values() if g.layer == layer}
        assert parts == {"attn", "mlp"}
    reference = load_file(Path(sources["ft_shift"]) / "model.safetensors")
    assert all(torch.equal(reference[k], pool.sources["ft_shift"].tensors[k]) for k in reference)


def test_family_with_biases_and_sharded_checkpoints(qwen_family, tmp_path):
    base, sources = qwen_family
    sharded = _qwen2(tmp_path, "sharded", 1, shard="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    pool = ModelPool(base, {"a": sources["a"], "sharded": sharded})
    a, s = pool.sources["a"].tensors, pool.sources["sharded"].tensors
    assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in a)
    assert pool.groups["model.layers.1.self_attn.q_proj.bias"] == TensorGroup("layer", 1, "attn")


def test_new_model_is_the_live_base(micro_zoo):
    base, sources = _zoo_paths(micro_zoo)
    pool = ModelPool(base, sources)
    live = pool.new_model()
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[1, 25, 30, 19, 4, 11, 15, 9, 8, 4, 5]])
    with torch.no_grad():
        assert torch.equal(live(ids).logits, reference(ids).logits)


def _copy_without(src: str, dst: Path, drop: str) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors[drop]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_incompatible_models_are_named(micro_zoo, qwen_family, tmp_path):
    base, sources = _zoo_paths(micro_zoo)
    with pytest.raises(IncompatibleModels, match="model 'q' is a Qwen2ForCausalLM, the base is a LlamaForCausalLM"):
        ModelPool(base, {"q": qwen_family[1]["a"]})

    lacking = _copy_without(sources["ft_reverse"], tmp_path / "lacking", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(IncompatibleModels, match=r"model 'lacking' .* missing \['model.layers.1.mlp.up_proj.weight'\]"):
        ModelPool(base, {"ft_shift": sources["ft_shift"], "lacking": lacking})

    qbase, qsrc = qwen_family
    wider = _qwen2(tmp_path, "wider", 3, intermediate=96)
    with pytest.raises(IncompatibleModels, match=r"model 'wider', tensor 'model.layers.0.mlp.down_proj.weight': shape \(32, 96\), the base's is \(32, 64\)"):
        ModelPool(qbase, {"a": qsrc["a"], "wider": wider})

    model = AutoModelForCausalLM.from_pretrained(sources["ft_shift"])
    model.resize_token_embeddings(50)
    model.save_pretrained(tmp_path / "bigvocab")
    with pytest.raises(IncompatibleModels, match="model 'bigvocab' has a different vocabulary: its embedding has 50 rows, the base's 43"):
        ModelPool(base, {"bigvocab": tmp_path / "bigvocab"})


def test_pickled_weights_need_an_explicit_opt_in(micro_zoo, tmp_path):
    base, sources = _zoo_paths(micro_zoo)
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(Path(sources["ft_reverse"]) / "config.json", folder)
    tensors = load_file(Path(sources["ft_reverse"]) / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(FuseEvoError, match="only pickled .bin weights.*models.allow_pickle=true"):
        ModelPool(base, {"pickled": folder})
    with pytest.warns(UserWarning, match="pickled"):
        pool = ModelPool(base, {"pickled": folder}, allow_pickle=True)
    assert all(torch.equal(pool.sources["pickled"].tensors[k], v) for k, v in tensors.items())


def test_unreachable_models_are_named(micro_zoo, tmp_path):
    base, _ = _zoo_paths(micro_zoo)
    with pytest.raises(FuseEvoError, match="model 'x': nobody/nothing-here is not a local folder and could not be fetched"):
        ModelPool(base, {"x": "nobody/nothing-here"})
    (tmp_path / "file").write_text("")
    with pytest.raises(FuseEvoError, match="model 'f': .* is a file"):
        ModelPool(base, {"f": tmp_path / "file"})
    with pytest.raises(FuseEvoError, match="model 'e' at .* has no config.json"):
        ModelPool(base, {"e": tmp_path})
    with pytest.raises(FuseEvoError, match="at least one source"):
        ModelPool(base, {})


@pytest.mark.parametrize(
    "name, group",
    [
        ("model.embed_tokens.weight", TensorGroup("embed")),
        ("model.layers.3.self_attn.o_proj.weight", TensorGroup("layer", 3, "attn")),
        ("model.layers.3.input_layernorm.weight", TensorGroup("layer", 3, "attn")),
        ("model.layers.12.post_attention_layernorm.weight", TensorGroup("layer", 12, "mlp")),
        ("model.layers.0.mlp.gate_proj.weight", TensorGroup("layer", 0, "mlp")),
        ("model.norm.weight", TensorGroup("norm")),
        ("lm_head.weight", TensorGroup("head")),
        ("transformer.wte.weight", TensorGroup("embed")),
        ("transformer.h.5.attn.c_attn.bias", TensorGroup("layer", 5, "attn")),
        ("transformer.h.5.mlp.c_fc.weight", TensorGroup("layer", 5, "mlp")),
        ("transformer.ln_f.weight", TensorGroup("norm")),
        ("gpt_neox.layers.1.attention.query_key_value.weight", TensorGroup("layer", 1, "attn")),
        ("gpt_neox.final_layer_norm.weight", TensorGroup("norm")),
        ("embed_out.weight", TensorGroup("head")),
    ],
)
def test_tensor_groups_by_name_across_families(name, group):
    assert tensor_group(name) == group


def test_unknown_tensor_names_are_errors():
    with pytest.raises(FuseEvoError, match="'vision.patch.weight'"):
        tensor_group("vision.patch.weight")


def test_safetensors_are_mapped_in_their_own_dtype_without_a_copy(tmp_path):
    """Every dtype reads back equal to safetensors' own loader, as views of one shared file
    mapping (no model-sized copy per process); a write stays in this process."""
    from fuse_evo.models import load_tensors, read_header

    torch.manual_seed(0)
    saved = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(), "f32": torch.randn(2, 2, 2),
             "i64": torch.arange(5), "u8": torch.arange(4, dtype=torch.uint8), "empty": torch.zeros(0, 4),
             "bool": torch.tensor([True, False, True])}
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(saved, str(folder / "model.safetensors"))
    header, start = read_header(folder / "model.safetensors")
    assert set(header) - {"__metadata__"} == set(saved) and start > 8
    mapped = load_tensors("m", folder)
    reference = load_file(str(folder / "model.safetensors"))
    for key, t in reference.items():
        assert mapped[key].dtype == t.dtype and mapped[key].shape == t.shape and torch.equal(mapped[key], t), key
    # views of one mapping of the file, not copies: each tensor sits at its header offset
    placed = [k for k in saved if saved[k].numel()]
    origin = mapped[placed[0]].data_ptr() - header[placed[0]]["data_offsets"][0]
    assert all(mapped[k].data_ptr() - header[k]["data_offsets"][0] == origin for k in placed)
    mapped["f32"].mul_(0)  # copy-on-write: the file keeps its bytes
    assert torch.equal(load_file(str(folder / "model.safetensors"))["f32"], saved["f32"])


@pytest.mark.parametrize("damage", ["header length", "offsets"])
def test_a_damaged_safetensors_layout_is_named(tmp_path, damage):
    from fuse_evo.models import load_tensors

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(64)}, str(folder / "model.safetensors"))
    raw = bytearray((folder / "model.safetensors").read_bytes())
    if damage == "header length":
        raw[:8] = (10**9).to_bytes(8, "little")
    else:
        raw = raw[:-16]  # the data section ends before the tensor it announces
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FuseEvoError, match=r"model 'm': .*model.safetensors is not a readable safetensors file"):
        load_tensors("m", folder)
