"""The candidates: plain data describing one merged model, the contract between search and merge.

Two kinds, one interface (``key``, ``to_dict``, ``models``, ``seed``; ``candidate_from_dict``
reads either back from an archive row or a job): a ``Recipe`` (parameter space: a merge method
and its coefficients) and a ``LayerPath`` (data flow: a path through the layers of several
models). No torch here: the search, the archive and the results read candidates without
loading a model.

A recipe names the method, its global parameters, the base and source models, per-model
parameters (weight, density, ...) for tensor groups, and the seed of stochastic methods. It is
hashable (``key``), round-trips through YAML/JSON, and resolves the parameters of any tensor
from the most specific group that covers it:

    tensor:<name>  >  layers.<i>.<attn|mlp>  >  layers.<i>  >  layers.<a>-<b> (a block,
    inclusive)  >  <kind>  >  "*"

where ``<kind>`` is ``embed``, ``norm`` (the final norm) or ``head``, and ``"*"`` is the default.
``tensor:<name>`` entries exist for configs finer than a group (mergekit ``filter`` values such
as ``q_proj``); a search never needs them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
import math
from typing import Any, Mapping, Union

import yaml

from .errors import FuseEvoError
from .registry import METHODS

DATAFLOW = "dataflow"  # what an archived LayerPath's dict says it is (a Recipe says its merge method)

_BLOCK = re.compile(r"layers\.(\d+)-(\d+)")
_GROUP_KEY = re.compile(
    r"\*|embed|norm|head|layers\.\d+(\.(attn|mlp))?|layers\.\d+-\d+(\.(attn|mlp))?|tensor:\S+"
)


class RecipeError(FuseEvoError):
    """A recipe that cannot describe a merge (the message names the field)."""


class DataFlowError(FuseEvoError):
    """A path or models that cannot be routed (the message names the step or model)."""


@dataclass(frozen=True)
class TensorGroup:
    """Where a tensor sits: ``embed``, ``layer`` (with index and ``attn``/``mlp`` part),
    ``norm`` (the final norm) or ``head`` (``models.tensor_group`` classifies a name)."""

    kind: str
    layer: int | None = None
    part: str | None = None


def _content_key(data: Mapping[str, Any]) -> str:
    """A candidate's content hash: equal candidates (whatever their construction order) share it."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _plain(value: Any) -> Any:
    """Numbers as float (1 and 1.0 are one recipe), mappings sorted: one canonical form for
    hashing and files."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value)


@dataclass(frozen=True, eq=False)
class Recipe:
    method: str
    models: tuple[str, ...]
    base: str = "base"
    parameters: Mapping[str, Any] = field(default_factory=dict)  # global: lambda, normalize, t...
    groups: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "parameters", _plain(self.parameters))
        object.__setattr__(self, "groups", _plain(self.groups))
        if self.method not in METHODS:
            raise RecipeError(f"recipe.method: unknown merge method {self.method!r}; known: {', '.join(METHODS)}")
        if not self.models:
            raise RecipeError("recipe.models: name at least one source model")
        if len(set(self.models)) != len(self.models):
            raise RecipeError(f"recipe.models: each model once, got {list(self.models)}")
        if self.base in self.models:
            raise RecipeError(f"recipe.models: {self.base!r} is the base, not a source")
        for key, per_model in self.groups.items():
            if not _GROUP_KEY.fullmatch(key):
                raise RecipeError(
                    f"recipe.groups: bad group {key!r} (use '*', embed, norm, head, layers.I, "
                    "layers.I.attn, layers.I.mlp, layers.A-B or tensor:NAME)"
                )
            unknown = set(per_model) - set(self.models) - {"*"}
            if unknown:
                raise RecipeError(f"recipe.groups.{key}: unknown model(s) {sorted(unknown)}; models are {list(self.models)}")

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "base": self.base,
            "models": list(self.models),
            "parameters": dict(self.parameters),
            "groups": {k: {m: dict(p) for m, p in v.items()} for k, v in self.groups.items()},
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        """Content hash: equal recipes (whatever their construction order) share it."""
        return _content_key(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        unknown = set(data) - {"method", "base", "models", "parameters", "groups", "seed"}
        if unknown:
            raise RecipeError(f"recipe: unknown field(s) {sorted(unknown)}")
        for required in ("method", "models"):
            if required not in data:
                raise RecipeError(f"recipe.{required} is missing")
        return cls(
            method=data["method"],
            models=tuple(data["models"]),
            base=data.get("base", "base"),
            parameters=data.get("parameters") or {},
            groups=data.get("groups") or {},
            seed=int(data.get("seed", 0)),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise RecipeError("recipe: expected a mapping at the top level")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.from_yaml(Path(path).read_text())

    # ------------------------------------------------------------------ resolution
    def _candidates(self, group: TensorGroup, tensor: str | None) -> list[str]:
        exact = [f"tensor:{tensor}"] if tensor is not None else []
        if group.kind != "layer":
            return [*exact, group.kind, "*"]
        i, part = group.layer, group.part
        blocks = [
            k for k in self.groups
            if (m := _BLOCK.match(k)) and int(m.group(1)) <= i <= int(m.group(2))
        ]
        specific = [b for b in blocks if b.endswith(f".{part}")] + [b for b in blocks if "." not in b[7:]]
        return [*exact, f"layers.{i}.{part}", f"layers.{i}", *specific, "*"]

    def model_params(self, group: TensorGroup, model: str, tensor: str | None = None) -> dict[str, float]:
        """The parameters of ``model`` for a tensor in ``group`` (named ``tensor``); each key from
        its most specific group, per-model entries before a group's ``"*"`` entry."""
        out: dict[str, float] = {}
        for key in reversed(self._candidates(group, tensor)):
            per_model = self.groups.get(key, {})
            out.update(per_model.get("*", {}))
            out.update(per_model.get(model, {}))
        return out


@dataclass(frozen=True)
class LayerPath:
    """A data-flow candidate. ``steps``: ``(model, layer index)`` in order; ``scales``: one per
    step, > 0, multiplied into the hidden state before that step; ``io_model``: whose
    embedding, final norm and head frame the path (``merge.dataflow`` routes and exports it)."""

    steps: tuple[tuple[str, int], ...]
    scales: tuple[float, ...]
    io_model: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple((str(m), int(i)) for m, i in self.steps))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.steps:
            raise DataFlowError("path: empty; a data-flow path needs at least one layer")
        if len(self.scales) != len(self.steps):
            raise DataFlowError(f"path: {len(self.steps)} steps but {len(self.scales)} scales")
        for k, ((model, layer), s) in enumerate(zip(self.steps, self.scales)):
            if not (math.isfinite(s) and s > 0):
                raise DataFlowError(f"path step {k} ({model} layer {layer}): scale {s} must be finite and > 0 "
                                    "(a norm cannot undo a sign flip or a zero)")

    method = DATAFLOW
    seed = 0  # routing draws nothing at random

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.io_model, *(m for m, _ in self.steps)]))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "io_model": self.io_model, "steps": [[m, i] for m, i in self.steps],
                "scales": list(self.scales)}

    @property
    def key(self) -> str:
        """Content hash, as ``Recipe.key``: equal paths share it."""
        return _content_key(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPath":
        return cls(tuple(tuple(s) for s in data["steps"]), tuple(data["scales"]), data["io_model"])


Candidate = Union[Recipe, LayerPath]


def candidate_from_dict(data: Mapping[str, Any]) -> Candidate:
    """A ``to_dict()`` of either kind (an archive row's recipe, a job) as its candidate."""
    if data.get("method") == DATAFLOW:
        return LayerPath.from_dict(data)
    return Recipe.from_dict(data)


def is_path(data: Mapping[str, Any] | Candidate) -> bool:
    """Whether a candidate (or its dict) is a data-flow path."""
    return isinstance(data, LayerPath) or (isinstance(data, Mapping) and data.get("method") == DATAFLOW)
