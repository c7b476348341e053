"""Data-flow merging: a path through the layers of several models, and its plain export.

A ``LayerPath`` (``fuse_evo.recipe``: plain data, like a Recipe) lists the decoder layers the
hidden state passes through (``(model, layer)`` steps, any model, any order, a layer may
recur) and the scale the hidden state is multiplied by before each step, with the embedding,
final norm and head of one model (``io_model``).

``Router(models, io_model).route(path)`` (or ``routed_model(path, models)``) runs such a path
through the live source models' own layer modules (referenced, never copied): an ordinary
``*ForCausalLM`` shell of the io model's family whose ``layers`` are the path's layers wrapped
in ``ScaledLayer``, so the evaluator scores it like any model (KV cache included: each step
writes its own cache slot); one router's model is re-pointed in place for every path.

``plain_model(path, models)`` exports the same function as an ordinary model of the family
with ``num_hidden_layers`` = path length, loadable with no custom code: for pre-norm RMSNorm
decoders, a layer fed ``c * x`` returns ``c * L'(x)``, with ``L'`` the layer whose
residual-writing projections (attention output, MLP down projection) are divided by ``c``,
because ``RMSNorm(c * x) = RMSNorm(x)`` for ``c > 0`` (up to its epsilon). The cumulative
scale is folded into copies of the layers and the final norm absorbs what remains.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from ..recipe import DataFlowError, LayerPath, Recipe


def _decoder(model: nn.Module, name: str) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise DataFlowError(f"model {name!r} ({type(model).__name__}): not a decoder with model.layers and "
                            "model.embed_tokens (Llama, Mistral, Qwen2 families)")
    return inner


def _check_pre_norm(layer: nn.Module, where: str) -> None:
    """The folding argument needs exactly two RMSNorms in front of the two sublayers, and no
    norm after them (Gemma 2's post-norms would not pass a scale through)."""
    norms = [n for n, m in layer.named_children() if "norm" in n.lower()]
    ok = (sorted(norms) == ["input_layernorm", "post_attention_layernorm"]
          and all("RMSNorm" in type(getattr(layer, n)).__name__ for n in norms)
          and hasattr(getattr(layer, "self_attn", None), "o_proj") and hasattr(getattr(layer, "mlp", None), "down_proj"))
    if not ok:
        raise DataFlowError(f"{where} ({type(layer).__name__}): data-flow merging needs a pre-norm RMSNorm decoder "
                            "layer (input_layernorm, post_attention_layernorm, self_attn.o_proj, mlp.down_proj), "
                            f"found norms {norms}")


def check_path(path: LayerPath, models: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The path's layer modules, after checking every model and step (names the culprit)."""
    if path.io_model not in models:
        raise DataFlowError(f"path io_model: {path.io_model!r} is not one of the models {sorted(models)}")
    io_cfg = models[path.io_model].config
    layers = []
    for k, (name, index) in enumerate(path.steps):
        if name not in models:
            raise DataFlowError(f"path step {k}: model {name!r} is not one of {sorted(models)}")
        cfg, decoder = models[name].config, _decoder(models[name], name)
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                    "rope_parameters", "model_type"):
            if getattr(cfg, key, None) != getattr(io_cfg, key, None):
                raise DataFlowError(f"path step {k}: model {name!r} has {key} {getattr(cfg, key, None)}, the io model "
                                    f"{path.io_model!r} has {getattr(io_cfg, key, None)}")
        if not 0 <= index < len(decoder.layers):
            raise DataFlowError(f"path step {k}: model {name!r} has layers 0..{len(decoder.layers) - 1}, not {index}")
        layer = decoder.layers[index]
        _check_pre_norm(layer, f"path step {k}: {name} layer {index}")
        layers.append(layer)
    return layers


class ScaledLayer(nn.Module):
    """A source model's decoder layer (referenced, not copied), fed ``scale * hidden``, writing
    the KV cache at its position on the path (the layer's own index is restored after)."""

    def __init__(self, layer: nn.Module, scale: float, position: int):
        super().__init__()
        self.layer = layer
        self.scale = float(scale)
        self.position = position

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        attn = self.layer.self_attn
        own = getattr(attn, "layer_idx", None)
        attn.layer_idx = self.position
        try:
            return self.layer(hidden_states * self.scale if self.scale != 1.0 else hidden_states, *args, **kwargs)
        finally:
            attn.layer_idx = own


def _path_config(path: LayerPath, models: Mapping[str, nn.Module]):
    cfg = copy.deepcopy(models[path.io_model].config)
    cfg.num_hidden_layers = len(path.steps)
    types = getattr(cfg, "layer_types", None)
    if types:
        cfg.layer_types = [models[m].config.layer_types[i] for m, i in path.steps]
    return cfg


def _shell(cfg, io: nn.Module) -> nn.Module:
    """An empty model of the io model's class for ``cfg`` (weights on the meta device)."""
    with torch.device("meta"):
        return type(io)(cfg)


class Router:
    """One persistent routed model over resident source models: ``route(path)`` re-points its
    layers (references to the sources' own modules) and scales in place, so an evaluator built
    once on ``router.model`` scores every path, as the merge engine's live model serves every
    recipe."""

    def __init__(self, models: Mapping[str, nn.Module], io_model: str):
        if io_model not in models:
            raise DataFlowError(f"path io_model: {io_model!r} is not one of the models {sorted(models)}")
        self.models = dict(models)
        io = models[io_model]
        self.model = _shell(copy.deepcopy(io.config), io)
        _decoder(self.model, "routed").layers = nn.ModuleList()
        self._frame(io_model)
        self.model.eval()
        self.path: LayerPath | None = None

    def _frame(self, io_model: str) -> None:
        """Embedding, final norm, rotary tables and head from ``io_model`` (references)."""
        io = self.models[io_model]
        inner, io_inner = _decoder(self.model, "routed"), _decoder(io, io_model)
        inner.embed_tokens, inner.norm, inner.rotary_emb = io_inner.embed_tokens, io_inner.norm, io_inner.rotary_emb
        self.model.lm_head = io.lm_head
        self.io_model = io_model

    def route(self, path: LayerPath) -> nn.Module:
        layers = check_path(path, self.models)
        if path.io_model != self.io_model:
            self._frame(path.io_model)
        cfg = self.model.config
        cfg.num_hidden_layers = len(path.steps)
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [self.models[m].config.layer_types[i] for m, i in path.steps]
        _decoder(self.model, "routed").layers = nn.ModuleList(
            ScaledLayer(layer, s, k) for k, (layer, s) in enumerate(zip(layers, path.scales)))
        meta = [n for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers()) if t.is_meta]
        if meta:
            raise DataFlowError(f"routed model: {type(self.model).__name__} has parts the router does not know: "
                                f"{meta[:5]}")
        self.path = path
        return self.model


def routed_model(path: LayerPath, models: Mapping[str, nn.Module]) -> nn.Module:
    """The path as a model of the io model's class, running the sources' own modules."""
    return Router(models, path.io_model).route(path)


def plain_model(path: LayerPath, models: Mapping[str, nn.Module]) -> nn.Module:
    """The path as an ordinary model (its own copies of the layers, scales folded in)."""
    layers = check_path(path, models)
    io = models[path.io_model]
    cfg = _path_config(path, models)
    shell = _shell(cfg, io)
    inner, io_inner = _decoder(shell, "plain"), _decoder(io, path.io_model)
    folded, cumulative = [], 1.0
    for k, (layer, s) in enumerate(zip(layers, path.scales)):
        cumulative *= s
        copy_ = copy.deepcopy(layer)
        with torch.no_grad():
            for proj in (copy_.self_attn.o_proj, copy_.mlp.down_proj):
                proj.weight.div_(cumulative)
                if getattr(proj, "bias", None) is not None:
                    proj.bias.div_(cumulative)
        copy_.self_attn.layer_idx = k
        folded.append(copy_)
    inner.layers = nn.ModuleList(folded)
    inner.embed_tokens = copy.deepcopy(io_inner.embed_tokens)
    inner.norm = copy.deepcopy(io_inner.norm)
    inner.rotary_emb = copy.deepcopy(io_inner.rotary_emb)
    shell.lm_head = copy.deepcopy(io.lm_head)
    if getattr(cfg, "tie_word_embeddings", False):
        shell.lm_head.weight = inner.embed_tokens.weight
    return shell.eval()


def plain_parameter_count(path: LayerPath, models: Mapping[str, nn.Module]) -> int:
    """Parameters of ``plain_model(path, models)`` without building it: the io model's
    embedding, final norm and head (once if tied) and a copy of each step's layer."""
    layers = check_path(path, models)
    io = models[path.io_model]
    inner = _decoder(io, path.io_model)
    frame = {id(p): p.numel() for m in (inner.embed_tokens, inner.norm, io.lm_head) for p in m.parameters()}
    return sum(frame.values()) + sum(p.numel() for layer in layers for p in layer.parameters())


def build_router(pool: Any, engine: Any, live: nn.Module, dataflow: Mapping[str, Any], dtype: Any = None,
                 device: Any = None) -> Router:
    """The router of a data-flow search over a ModelPool: each laid-out model a resident live
    model of its weights (``merged``: ``live``, merged once by the hybrid's recipe with
    ``engine``), routed to the starting path. ``dataflow``: the search's
    ``{"io_model", "models", "initial", "merged"}``; ``device``: the scoring device (default
    the engine's)."""
    device = engine.device if device is None else device
    modules = {}
    for name in dataflow["models"]:
        if name == "merged":
            if not dataflow.get("merged"):
                raise DataFlowError("space.dataflow.models: 'merged' needs space.dataflow.merged_from (a run dir)")
            recipe = Recipe.from_dict(dataflow["merged"])
            engine.check(recipe)
            engine.materialize(recipe, into=live)
            modules[name] = live
        else:
            modules[name] = pool.new_model(dtype=dtype, device=device, weights=name)
    router = Router(modules, dataflow["io_model"])
    router.route(LayerPath.from_dict(dataflow["initial"]))
    return router
