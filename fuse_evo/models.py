"""ModelPool: the one place that reads checkpoint files.

It loads a base and N source models (local folders, or hub ids where a network exists), reads
safetensors only unless pickled ``.bin`` checkpoints are explicitly allowed, and proves before
any merge work that the models can be merged: same architecture, same tensor names and shapes,
the same vocabulary. Every mismatch is an error that names the model and the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .errors import FuseEvoError
from .recipe import TensorGroup

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class IncompatibleModels(FuseEvoError):
    """Source models that cannot be merged with the base (the message says which and why)."""


# ---------------------------------------------------------------------------- tensor groups
# Decoder-only families name their tensors alike: an embedding, numbered blocks, a final norm
# and a head. Patterns, not per-family tables, so a new family works if it follows the habit.
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)\.")
_LAYER = re.compile(r"(^|\.)(layers|h|blocks|block)\.(\d+)\.")
_FINAL_NORM = re.compile(r"(^|\.)(norm|ln_f|final_layernorm|final_layer_norm|norm_f)\.")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)\.")
_ATTENTION = re.compile(r"(self_attn|attention|attn|input_layernorm|ln_1)")
_MLP = re.compile(r"(mlp|feed_forward|ffn|post_attention_layernorm|ln_2)")
_POSITION = re.compile(r"(^|\.)(rotary_emb|wpe)\.")


def tensor_group(name: str) -> TensorGroup:
    """Classify a tensor by its name; an unknown name is an error, never silently skipped."""
    m = _LAYER.search(name)
    if m:
        rest = name[m.end():]
        # MLP first: "post_attention_layernorm" belongs to the MLP half of a block
        part = "mlp" if _MLP.search(rest) else "attn" if _ATTENTION.search(rest) else None
        if part is None:
            raise FuseEvoError(f"tensor {name!r}: cannot tell attention from MLP in layer {m.group(3)}")
        return TensorGroup("layer", int(m.group(3)), part)
    if _EMBED.search(name) or _POSITION.search(name):
        return TensorGroup("embed")
    if _HEAD.search(name):
        return TensorGroup("head")
    if _FINAL_NORM.search(name):
        return TensorGroup("norm")
    raise FuseEvoError(f"tensor {name!r}: not an embedding, layer, final norm or head tensor")


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """One checkpoint's tensors (CPU, in their stored dtype; from safetensors, views of the
    file's page cache) and what we know about it."""

    name: str
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    tokenizer_size: int | None = None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def resolve(name: str, ref: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (safetensors, configs, tokenizer)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise FuseEvoError(f"model {name!r}: {ref} is a file, expected a model folder")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(ref)):
        raise FuseEvoError(f"model {name!r}: {ref} is not a folder and not a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, no network, gated...
        raise FuseEvoError(
            f"model {name!r}: {ref} is not a local folder and could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (``{name: {"dtype", "shape", "data_offsets"}}``, and
    ``__metadata__``) and where its data starts: the file's layout, no tensor data read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + n


def _map_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a private memory map of it: nothing is
    copied, the pages stay in the page cache that every process reading the file shares, and a
    write into a tensor stays in this process (copy-on-write), never reaching the file."""
    header, start = read_header(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {key!r} has dtype {info.get('dtype')!r}, which fuse_evo does not read")
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        count = math.prod(shape)
        if not 0 <= begin <= end or start + end > size or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {key!r} claims bytes {begin}..{end} of a {size - start}-byte data section "
                             f"for {count} x {dtype}")
        flat = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin) if count
                else torch.empty(0, dtype=dtype))
        tensors[key] = flat.view(shape)
    return tensors


def _read_safetensors(name: str, files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(_map_file(f))
        except (ValueError, KeyError, TypeError, OSError) as e:  # truncated, garbled header, unreadable
            raise unreadable(name, f, e) from None
    return tensors


def unreadable(name: str, path: Path, error: Exception) -> FuseEvoError:
    """The error of a safetensors file that cannot be read (truncated, garbled header)."""
    return FuseEvoError(f"model {name!r}: {path} is not a readable safetensors file ({error}); "
                        "it is truncated or damaged: download or save it again")


def _shards(name: str, folder: Path, index_name: str) -> list[Path]:
    """The shard files an index names, each checked present (a missing one named with its index)."""
    index_path = folder / index_name
    try:
        shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FuseEvoError(f"model {name!r}: {index_path} is not a shard index with a weight_map "
                           f"({type(e).__name__}: {e})") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FuseEvoError(f"model {name!r}: {index_path} names {len(missing)} of {len(shards)} shards that are "
                           f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return [folder / s for s in shards]


class PickledWeights(FuseEvoError):
    """A model with only pickled weights, not allowed; ``hint(option)`` names the caller's switch."""

    def __init__(self, name: str, folder: Path, option: str = "models.allow_pickle=true"):
        self.name, self.folder = name, folder
        super().__init__(f"model {name!r} at {folder} has only pickled .bin weights; loading them can run "
                         f"arbitrary code, so pass {option} if you trust them")

    def hint(self, option: str) -> "PickledWeights":
        return PickledWeights(self.name, self.folder, option)


def load_tensors(name: str, folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Safetensors (single file or sharded index); pickled .bin only when allowed, with a warning."""
    if (folder / SAFETENSORS_INDEX).exists():
        return _read_safetensors(name, _shards(name, folder, SAFETENSORS_INDEX))
    if (folder / SAFETENSORS).exists():
        return _read_safetensors(name, [folder / SAFETENSORS])
    pickled = [folder / PICKLE] if (folder / PICKLE).exists() else (
        _shards(name, folder, PICKLE_INDEX) if (folder / PICKLE_INDEX).exists() else []
    )
    if pickled and not allow_pickle:
        raise PickledWeights(name, folder)
    if pickled:
        warnings.warn(f"model {name!r}: loading pickled weights from {folder} (allow_pickle)")
        tensors: dict[str, torch.Tensor] = {}
        for f in pickled:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        return tensors
    raise FuseEvoError(f"model {name!r} at {folder} has no weights ({SAFETENSORS} or {SAFETENSORS_INDEX})")


def _tokenizer_size(folder: Path) -> int | None:
    """Vocabulary size from tokenizer.json (base vocab plus added tokens), if present."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    spec = json.loads(path.read_text())
    vocab = spec.get("model", {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))  # Unigram: list
    ids |= {t["id"] for t in spec.get("added_tokens", [])}
    return max(ids) + 1 if ids else None


def load_model(
    name: str, ref: str | Path, allow_pickle: bool = False, revision: str | None = None
) -> LoadedModel:
    folder = resolve(name, ref, revision)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FuseEvoError(f"model {name!r} at {folder} has no config.json")
    config = json.loads(config_path.read_text())
    tensors = load_tensors(name, folder, allow_pickle)
    if not tensors:
        raise FuseEvoError(f"model {name!r} at {folder}: the checkpoint holds no tensors")
    return LoadedModel(name, folder, config, tensors, _tokenizer_size(folder))


# ---------------------------------------------------------------------------- the pool
class ModelPool:
    """A base model and its fine-tunes, loaded once and checked mergeable.

    ``sources`` maps a short name to a folder or hub id (a list uses folder names). The pool
    holds CPU tensors; the merge engine derives and keeps what it needs (task vectors).
    """

    def __init__(
        self,
        base: str | Path,
        sources: Mapping[str, str | Path] | Sequence[str | Path],
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        base_name: str = "base",
    ):
        if not isinstance(sources, Mapping):
            sources = {Path(str(s)).name: s for s in sources}
        if not sources:
            raise FuseEvoError("models.sources: give at least one source model to merge")
        if base_name in sources:
            raise FuseEvoError(f"models.sources: {base_name!r} names the base; rename that source")
        if trust_remote_code:
            warnings.warn("trust_remote_code: model code from the checkpoint folders will run")
        self.trust_remote_code = trust_remote_code
        self.base = load_model(base_name, base, allow_pickle)
        self.sources = {n: load_model(n, ref, allow_pickle) for n, ref in sources.items()}
        self.check_compatible()
        self.groups = {name: tensor_group(name) for name in self.base.tensors}

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.base.tensors)

    @property
    def num_layers(self) -> int:
        layers = [g.layer for g in self.groups.values() if g.layer is not None]
        return max(layers) + 1 if layers else 0

    def check_compatible(self) -> None:
        """Raise IncompatibleModels naming the first model and tensor that cannot merge."""
        base = self.base
        base_embed = _embedding_rows(base)
        for m in self.sources.values():
            if m.architecture != base.architecture:
                raise IncompatibleModels(
                    f"model {m.name!r} is a {m.architecture}, the base is a {base.architecture}"
                )
            missing = sorted(set(base.tensors) - set(m.tensors))
            extra = sorted(set(m.tensors) - set(base.tensors))
            if missing or extra:
                raise IncompatibleModels(
                    f"model {m.name!r} has different tensors from the base: "
                    + "; ".join(
                        part for part in (
                            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "",
                            f"extra {extra[:3]}{' ...' if len(extra) > 3 else ''}" if extra else "",
                        ) if part
                    )
                )
            rows = _embedding_rows(m)
            if rows != base_embed:
                raise IncompatibleModels(
                    f"model {m.name!r} has a different vocabulary: its embedding has {rows} rows, "
                    f"the base's {base_embed} (tokenizer sizes {m.tokenizer_size} vs "
                    f"{base.tokenizer_size})"
                )
            for key, t in base.tensors.items():
                if m.tensors[key].shape != t.shape:
                    raise IncompatibleModels(
                        f"model {m.name!r}, tensor {key!r}: shape {tuple(m.tensors[key].shape)}, "
                        f"the base's is {tuple(t.shape)}"
                    )
        for m in [base, *self.sources.values()]:
            if m.tokenizer_size is not None and base_embed is not None and m.tokenizer_size > base_embed:
                raise IncompatibleModels(
                    f"model {m.name!r}: its tokenizer has {m.tokenizer_size} tokens but the "
                    f"embedding only {base_embed} rows"
                )

    def tokenizer(self):
        """The base's tokenizer (the merge keeps its vocabulary), or None if it ships none."""
        from transformers import AutoTokenizer

        if not any((self.base.path / f).exists() for f in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(self.base.path, trust_remote_code=self.trust_remote_code)

    def new_model(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  weights: str | None = None):
        """A live model with the base's architecture and weights (or those of the source model
        ``weights``), to be merged into in place (or routed through, for data-flow merges)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if weights is not None and weights not in self.sources and weights != self.base.name:
            raise FuseEvoError(f"model {weights!r}: not the base {self.base.name!r} nor a source {self.names}")
        tensors = self.base.tensors if weights in (None, self.base.name) else self.sources[weights].tensors
        config = AutoConfig.from_pretrained(self.base.path, trust_remote_code=self.trust_remote_code)
        dtype = dtype or next(iter(self.base.tensors.values())).dtype
        # built in its final dtype on its device, weights left uninitialized (they are loaded
        # next): no fp32 copy, no random init of a model-sized tensor, at 7B a 28 GB transient
        with _no_init_weights(), _default_dtype(dtype), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and _HEAD.search(k)}
        if set(missing) - tied or unexpected:
            raise FuseEvoError(
                f"the base's tensors do not fit a {config.architectures}: missing "
                f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        model.tie_weights()
        return model.to(device=device, dtype=dtype).eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else before)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _no_init_weights():
    """transformers' context that skips weight initialization (its home moved in v5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _embedding_rows(m: LoadedModel) -> int | None:
    for key, t in m.tensors.items():
        if tensor_group(key).kind == "embed" and t.dim() == 2 and not _POSITION.search(key):
            return t.shape[0]
    return None
