"""mergekit YAML configs, read into our Recipe so a mergekit user's configs run on our engine.

Semantics follow mergekit 0.1.5 (read, not imported: mergekit is not a dependency):
- a parameter is a scalar, a *gradient* (a list interpolated over the layers: layer i of N sits
  at t = i / (N - 1); the embedding, final norm and head sit at t = 0), or a list of
  ``{filter: SUBSTRING, value: ...}`` conditions where the first whose filter occurs in the
  tensor name wins (no filter, or ``*``, matches everything);
- per-model ``parameters`` take precedence over the top-level ``parameters``; a setting that
  resolves to nothing falls through to the next level;
- ``weight``, ``density``, ``gamma``, ``epsilon`` are per model; ``normalize``, ``rescale``,
  ``lambda``, ``t``, ``filter_wise`` are shared (``int8_mask`` changes nothing here).
Only ``models:`` configs are read; ``slices:``/``modules:`` (layer stacking) and tokenizer
merging are refused with a message, as is any method we do not implement.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import FuseEvoError
from ..models import ModelPool
from ..recipe import Recipe
from ..registry import GLOBAL_PARAMS, PER_MODEL_DEFAULTS, PER_MODEL_PARAMS, SPECS, spec

# mergekit's merge_method names -> ours (the registry's MethodSpec.mergekit)
_FROM_MERGEKIT = {s.mergekit: name for name, s in SPECS.items() if s.mergekit}

log = logging.getLogger(__name__)

PER_MODEL = ("weight", "density", "gamma", "epsilon")
SHARED = ("normalize", "rescale", "lambda", "t", "filter_wise")
IGNORED = ("int8_mask",)
_BASELESS = {"linear"}  # methods where mergekit needs no base_model


class MergekitConfigError(FuseEvoError):
    """A mergekit config we cannot run (the message names the key)."""


@dataclass
class MergekitConfig:
    method: str
    base: str  # the pool's base: base_model, or for linear without one, the first model
    models: dict[str, str]  # source name -> model reference, in config order
    model_settings: dict[str, dict[str, Any]]  # source name -> its raw parameters
    settings: dict[str, Any]  # top-level parameters, raw
    dtype: str | None

    def sources(self) -> dict[str, str]:
        return {"base": self.base, **self.models}


def _name(ref: str, taken: set[str]) -> str:
    stem = Path(str(ref).rstrip("/")).name or "model"
    name, i = stem, 1
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def parse(data: Mapping[str, Any], relative_to: Path | None = None) -> MergekitConfig:
    """Check a mergekit config and name its models; relative paths resolve against the file."""
    for key in ("slices", "modules"):  # first: a stacking config's passthrough is not the method's fault
        if data.get(key):
            raise MergekitConfigError(f"{key}: layer stacking (frankenmerges) is not supported; list the models "
                                      "to merge under 'models:' (fuse-evo's data-flow search stacks layers)")
    named = data.get("merge_method")
    method = _FROM_MERGEKIT.get(named) if isinstance(named, str) else None
    if method is None:
        raise MergekitConfigError(f"merge_method: {named!r} is not supported; supported: "
                                  f"{', '.join(_FROM_MERGEKIT)}")
    if data.get("tokenizer_source") not in (None, "base") or data.get("tokenizer"):
        raise MergekitConfigError("tokenizer_source/tokenizer: models must share the base's vocabulary")
    entries = data.get("models") or []
    if not entries:
        raise MergekitConfigError("models: list the models to merge")

    def ref(value: Any) -> str:
        path = Path(str(value)).expanduser()
        if relative_to is not None and not path.is_absolute() and (relative_to / path).exists():
            return str((relative_to / path).resolve())
        return str(path.resolve()) if path.exists() else str(value)

    base_model = data.get("base_model")
    if base_model is None and method not in _BASELESS:
        raise MergekitConfigError(f"base_model: {method} needs a base model")
    base = ref(base_model) if base_model is not None else ref(entries[0]["model"])
    taken = {"base"}
    models: dict[str, str] = {}
    model_settings: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise MergekitConfigError(f"models[{i}]: expected a mapping with a 'model' key")
        r = ref(entry["model"])
        if base_model is not None and r == base and method not in _BASELESS:
            continue  # the base listed among the models contributes no task vector
        name = _name(r, taken)
        models[name] = r
        model_settings[name] = dict(entry.get("parameters") or {})
    return MergekitConfig(method, base, models, model_settings, dict(data.get("parameters") or {}),
                          data.get("out_dtype") or data.get("dtype"))


def _evaluate(setting: Any, tensor: str, t: float) -> Any:
    """One parameter for one tensor: scalar, gradient, or first matching filter (None if none)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (int, float, bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise MergekitConfigError(f"parameter condition {cond!r}: expected {{filter: ..., value: ...}}")
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor:
                return _evaluate(cond["value"], tensor, t)
        return None
    raise MergekitConfigError(f"parameter value {setting!r}: expected a number, a list or conditions")


def _resolve(levels: list[Mapping[str, Any]], key: str, tensor: str, t: float) -> Any:
    for level in levels:
        if key in level:
            value = _evaluate(level[key], tensor, t)
            if value is not None:
                return value
    return None


def to_recipe(cfg: MergekitConfig, pool: ModelPool) -> Recipe:
    """Resolve every parameter per tensor, then write the most compact equivalent Recipe."""
    unknown = (set(cfg.settings) | {k for s in cfg.model_settings.values() for k in s}) - set(
        PER_MODEL + SHARED + IGNORED
    )
    if unknown:
        raise MergekitConfigError(f"parameters: {sorted(unknown)} are not understood for {cfg.method}")
    wanted = PER_MODEL_PARAMS[cfg.method]
    applicable = GLOBAL_PARAMS[cfg.method]
    ignored = (set(cfg.settings) | {k for s in cfg.model_settings.values() for k in s}) - set(wanted) - applicable
    if ignored:
        log.warning("mergekit config: %s do(es) not apply to %s and is ignored", sorted(ignored), cfg.method)
    n = pool.num_layers
    per_tensor: dict[str, dict[str, dict[str, float]]] = {}
    shared: dict[str, set] = {k: set() for k in SHARED if k in applicable and k != "t"}
    for name, group in pool.groups.items():
        t = (group.layer / (n - 1) if n > 1 else 1.0) if group.kind == "layer" else 0.0
        entry: dict[str, dict[str, float]] = {}
        for model in cfg.models:
            params = {}
            for k in wanted:
                v = _resolve([cfg.model_settings[model], cfg.settings], k, name, t)
                if v is None and k not in PER_MODEL_DEFAULTS:
                    raise MergekitConfigError(f"models.{model}: no {k} for tensor {name}")
                params[k] = float(PER_MODEL_DEFAULTS[k] if v is None else v)
            entry[model] = params
        if "t" in applicable:
            v = _resolve([cfg.settings], "t", name, t)
            if v is None:
                raise MergekitConfigError(f"parameters.t: no value for tensor {name}")
            entry["*"] = {"t": float(v)}
        for k in shared:
            v = _resolve([cfg.settings], k, name, t)
            if v is not None:
                shared[k].add(v)
        per_tensor[name] = entry
    parameters: dict[str, Any] = {}
    for k, values in shared.items():
        if len(values) > 1:
            raise MergekitConfigError(f"parameters.{k}: varies across tensors, which we do not support")
        if values:
            parameters[k] = values.pop()
    return Recipe(cfg.method, tuple(cfg.models), parameters=parameters, groups=_compact(pool, per_tensor))


def _group_key(group) -> str:
    return f"layers.{group.layer}.{group.part}" if group.kind == "layer" else group.kind


def _compact(pool: ModelPool, per_tensor: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Group values where a group's tensors agree (the common case), tensor: entries elsewhere."""
    by_group: dict[str, list[str]] = {}
    for name, group in pool.groups.items():
        by_group.setdefault(_group_key(group), []).append(name)
    groups: dict[str, Any] = {}
    for key, names in by_group.items():
        frozen = {n: repr(sorted((m, sorted(p.items())) for m, p in per_tensor[n].items())) for n in names}
        common = Counter(frozen.values()).most_common(1)[0][0]
        first = next(n for n in names if frozen[n] == common)
        if any(per_tensor[first].values()):
            groups[key] = per_tensor[first]
        for n in names:
            if frozen[n] != common:
                groups[f"tensor:{n}"] = per_tensor[n]
    return groups


# ---------------------------------------------------------------------------- recipe -> mergekit
def _gradient(values: list[float]) -> Any:
    """One value when all agree, else a gradient with one point per layer."""
    return values[0] if all(v == values[0] for v in values) else list(values)


def recipe_to_mergekit(
    recipe: Recipe, sources: Mapping[str, str], pool: ModelPool, dtype: str | None = None
) -> dict[str, Any] | None:
    """The mergekit config that makes the same merge as ``recipe``, or None when mergekit
    cannot say it: ``tensor:`` groups, an attention half and an MLP half of one layer that
    differ, a ``consensus`` parameter, or sources whose folder names collide.

    A per-layer value becomes a gradient with one point per layer (layer i sits exactly at
    point i); the embedding, final norm and head, which mergekit places at t = 0, get
    ``filter`` conditions on their exact tensor names when they differ from layer 0.
    ``to_recipe(parse(config), pool)`` resolves every tensor to the values ``recipe`` gives.
    """
    if any(k.startswith("tensor:") for k in recipe.groups) or "consensus" in recipe.parameters:
        return None
    refs = {m: str(sources[m]) for m in (recipe.base, *recipe.models) if m in sources}
    if len(refs) != len(recipe.models) + 1:
        return None
    stems = [Path(refs[m].rstrip("/")).name for m in recipe.models]
    if len(set(stems)) != len(stems) or "base" in stems:
        return None  # mergekit names models by folder: the names would not come back
    n = pool.num_layers
    layers: dict[int, dict[str, Any]] = {}
    others: dict[str, Any] = {}  # tensor name -> group (embed, norm, head)
    for name, group in pool.groups.items():
        if group.kind == "layer":
            layers.setdefault(group.layer, {}).setdefault(group.part, group)
        else:
            others[name] = group
    if sorted(layers) != list(range(n)):
        return None

    def setting(model: str, key: str) -> Any:
        def value(group) -> float | None:
            v = recipe.model_params(group, model).get(key)
            if v is None:
                v = PER_MODEL_DEFAULTS.get(key)
            return None if v is None else float(v)

        per_layer: list[float] = []
        for i in range(n):
            parts = {value(g) for g in layers[i].values()}
            if len(parts) != 1 or None in parts:
                raise _NotExpressible
            per_layer.append(parts.pop())
        default = _gradient(per_layer)
        conditions = []
        for name, group in others.items():
            v = value(group)
            if v is None:
                raise _NotExpressible
            if v != per_layer[0]:
                conditions.append({"filter": name, "value": v})
        return [*conditions, {"value": default}] if conditions else default

    try:
        models = []
        for model, ref in zip(recipe.models, stems):
            params = {k: setting(model, k) for k in PER_MODEL_PARAMS[recipe.method]}
            entry: dict[str, Any] = {"model": refs[model]}
            if params:
                entry["parameters"] = params
            models.append(entry)
        parameters = {k: v for k, v in recipe.parameters.items() if k in SHARED}
        if recipe.method == "slerp":
            parameters["t"] = setting("*", "t")
    except _NotExpressible:
        return None
    config: dict[str, Any] = {"merge_method": spec(recipe.method).mergekit, "base_model": refs[recipe.base],
                              "models": models}
    if parameters:
        config["parameters"] = parameters
    if dtype:
        config["dtype"] = dtype
    return config


class _NotExpressible(Exception):
    pass
