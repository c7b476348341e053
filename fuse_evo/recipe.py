"""Recipe: the plain-data description of one merged model, the contract between search and merge.

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
from typing import Any, Mapping

import yaml

from .errors import FuseEvoError
from .models import TensorGroup

METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock",
)
# per-model parameters each method reads, and the global ones it accepts
PER_MODEL_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "breadcrumbs": ("weight", "density", "gamma"),
    "breadcrumbs_ties": ("weight", "density", "gamma"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "della": ("weight", "density", "epsilon"),
    "della_linear": ("weight", "density", "epsilon"),
    "slerp": (),
    "model_stock": (),
}
GLOBAL_PARAMS: dict[str, set[str]] = {
    "linear": {"normalize"},
    "task_arithmetic": {"normalize", "lambda"},
    "ties": {"normalize", "lambda", "rescale", "consensus"},
    "breadcrumbs": {"normalize", "lambda", "rescale"},
    "breadcrumbs_ties": {"normalize", "lambda", "rescale", "consensus"},
    "dare_ties": {"normalize", "lambda", "rescale", "consensus"},
    "dare_linear": {"normalize", "lambda", "rescale"},
    "della": {"normalize", "lambda", "rescale", "consensus"},
    "della_linear": {"normalize", "lambda", "rescale"},
    "slerp": {"t"},
    "model_stock": {"filter_wise"},
}
# what a per-model parameter is when a recipe leaves it out (mergekit's defaults); weight has none
PER_MODEL_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}

_BLOCK = re.compile(r"layers\.(\d+)-(\d+)")
_GROUP_KEY = re.compile(
    r"\*|embed|norm|head|layers\.\d+(\.(attn|mlp))?|layers\.\d+-\d+(\.(attn|mlp))?|tensor:\S+"
)


class RecipeError(FuseEvoError):
    """A recipe that cannot describe a merge (the message names the field)."""


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
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:20]

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
