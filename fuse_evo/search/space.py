"""SearchSpace: genome (a bounded real vector) <-> Recipe. Decoding is this module's job alone.

A space cuts the model into tensor groups (per layer or block of k layers, optionally split
into attention and MLP halves; embed/norm/head each on their own or sharing the ``"*"``
group) and gives each searched parameter a gene per group and model, per group, per model or
one overall (its ``scope``). Every genome inside the bounds decodes to a recipe the merge
engine accepts: bounds a method would refuse are rejected when the space is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import SpaceConfig
from ..errors import ConfigError, FuseEvoError
from ..registry import GLOBAL_PARAMS, PER_MODEL_DEFAULTS, PER_MODEL_PARAMS
from ..recipe import DATAFLOW, Recipe, TensorGroup

SCOPES = ("group_model", "group", "model", "global")
# global recipe parameters a space may search (the others are switches: normalize, rescale, ...)
_SEARCHABLE_GLOBALS = ("lambda", "t")
_NATURAL_INIT = {**PER_MODEL_DEFAULTS, "lambda": 1.0, "t": 0.5}


class SpaceError(FuseEvoError):
    """A genome or recipe that does not fit the space (the message names the gene)."""


@dataclass(frozen=True)
class Gene:
    """One coordinate of the genome and where its value goes in a recipe.

    ``group`` is a recipe group key and ``model`` a source model or ``"*"`` (all of them);
    both are None for a global recipe parameter (``recipe.parameters[param]``).
    """

    name: str
    param: str
    scope: str
    group: str | None
    model: str | None
    low: float
    high: float
    init: float


class GenomeSpace:
    """What strategies see of a space: ``genes`` (each with name, bounds and init), ``lower``,
    ``upper``, ``names``, ``dimension``, ``initial()`` and ``validate(genome)``. Subclasses
    decode genomes into what workers build (a Recipe; a LayerPath)."""

    genes: tuple[Gene, ...]
    lower: np.ndarray
    upper: np.ndarray

    def _set_genes(self, genes: Sequence[Gene]) -> None:
        self.genes = tuple(genes)
        self.lower = np.array([g.low for g in self.genes])
        self.upper = np.array([g.high for g in self.genes])

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    @property
    def dimension(self) -> int:
        return len(self.genes)

    def initial(self) -> np.ndarray:
        """The starting genome: each gene's ``init``."""
        return np.array([g.init for g in self.genes])

    def validate(self, genome: Sequence[float] | np.ndarray) -> np.ndarray:
        """The genome as a float vector, or SpaceError naming the length or the gene at fault."""
        try:
            x = np.asarray(genome, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise SpaceError(f"genome: not a vector of numbers ({e})") from None
        if x.ndim != 1 or x.shape[0] != self.dimension:
            raise SpaceError(
                f"genome: {x.shape[0] if x.ndim == 1 else f'shape {x.shape}'} values, the space has "
                f"{self.dimension} genes ({self.genes[0].name} ... {self.genes[-1].name})"
            )
        for gene, value in zip(self.genes, x):
            if not np.isfinite(value):
                raise SpaceError(f"genome: gene {gene.name} is {value}")
            if not gene.low <= value <= gene.high:
                raise SpaceError(f"genome: gene {gene.name} = {value} is outside [{gene.low}, {gene.high}]")
        return x


class SearchSpace(GenomeSpace):
    """The genes of one space over a given set of models and layers.

    ``model_config``: the base's HF config (a mapping), read for ``num_hidden_layers`` when
    the space config leaves ``num_layers`` out.
    """

    def __init__(self, config: SpaceConfig, model_config: Mapping[str, Any] | None = None):
        self.config = config
        self.method = config.method
        if self.method not in PER_MODEL_PARAMS:
            hint = "; a data-flow space (method: dataflow) is a DataFlowSpace" if self.method == DATAFLOW else ""
            raise ConfigError(f"space.method: {self.method!r} is not a merge method ({', '.join(PER_MODEL_PARAMS)})"
                              f"{hint}")
        self.models = tuple(config.models)
        self.base = config.base
        self.num_layers = _num_layers(config, model_config)
        self._check_models()
        self._fixed_per_model, self._fixed_global = self._split_fixed()
        self._group_keys = self._layout()
        self._set_genes(self._build_genes())
        if not self.genes:
            raise ConfigError(f"space.genes: nothing to search for {self.method}; name at least one gene")
        self._check_complete()

    # ------------------------------------------------------------------ building
    def _check_models(self) -> None:
        if not self.models:
            raise ConfigError("space.models: name the source models (the experiment's models group fills them)")
        if len(set(self.models)) != len(self.models) or self.base in self.models:
            raise ConfigError(f"space.models: each source once and not the base {self.base!r}, got {list(self.models)}")
        if self.method == "slerp" and len(self.models) != 1:
            raise ConfigError(f"space.models: slerp merges one source model with the base, got {list(self.models)}")

    def _split_fixed(self) -> tuple[dict[str, Any], dict[str, Any]]:
        per_model, global_ = {}, {}
        for key, value in self.config.fixed.items():
            if key in self.config.genes:
                raise ConfigError(f"space.fixed.{key}: {key} is also a gene; fix it or search it, not both")
            if key in PER_MODEL_PARAMS[self.method]:
                per_model[key] = float(value)
            elif key in GLOBAL_PARAMS[self.method]:
                global_[key] = value
            else:
                known = sorted({*PER_MODEL_PARAMS[self.method], *GLOBAL_PARAMS[self.method]})
                raise ConfigError(f"space.fixed.{key}: {self.method} has no parameter {key!r}; it has {known}")
        return per_model, global_

    def _layout(self) -> list[str]:
        """The recipe group keys of the space, in model order."""
        g = self.config.granularity
        k = g.layers_per_block
        if k < 1:
            raise ConfigError(f"space.granularity.layers_per_block: must be at least 1, got {k}")
        if g.embed_norm_head not in ("own", "shared"):
            raise ConfigError(f"space.granularity.embed_norm_head: 'own' or 'shared', got {g.embed_norm_head!r}")
        layers = []
        for a in range(0, self.num_layers, k):
            b = min(a + k, self.num_layers) - 1
            key = f"layers.{a}" if a == b else f"layers.{a}-{b}"
            layers += [f"{key}.attn", f"{key}.mlp"] if g.split_attn_mlp else [key]
        if g.embed_norm_head == "shared":
            return ["*", *layers]
        return ["embed", *layers, "norm", "head"]

    def group_of(self, group: TensorGroup) -> str:
        """The space's group key covering a tensor group."""
        g = self.config.granularity
        if group.kind != "layer":
            return group.kind if g.embed_norm_head == "own" else "*"
        a = group.layer // g.layers_per_block * g.layers_per_block
        b = min(a + g.layers_per_block, self.num_layers) - 1
        key = f"layers.{a}" if a == b else f"layers.{a}-{b}"
        return f"{key}.{group.part}" if g.split_attn_mlp else key

    def _natural_scope(self, param: str) -> str:
        if param in PER_MODEL_PARAMS[self.method]:
            return "group_model"
        return "group" if param == "t" else "global"

    def _allowed_scopes(self, param: str) -> tuple[str, ...]:
        if param in PER_MODEL_PARAMS[self.method]:
            return SCOPES
        return ("group", "global") if param == "t" else ("global",)

    def _build_genes(self) -> list[Gene]:
        searchable = [*PER_MODEL_PARAMS[self.method], *(p for p in _SEARCHABLE_GLOBALS if p in GLOBAL_PARAMS[self.method])]
        scoped: dict[str, tuple[str, float, float, float]] = {}
        for param, gene in self.config.genes.items():
            where = f"space.genes.{param}"
            if param not in searchable:
                raise ConfigError(f"{where}: {self.method} cannot search {param!r}; it can search {searchable}")
            scope = gene.scope or self._natural_scope(param)
            if scope not in self._allowed_scopes(param):
                raise ConfigError(f"{where}.scope: {param} takes scope {' or '.join(self._allowed_scopes(param))}, got {scope!r}")
            low, high = float(gene.low), float(gene.high)
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise ConfigError(f"{where}: need finite bounds with low < high, got [{low}, {high}]")
            if gene.init is None:
                init = 1.0 / len(self.models) if param == "weight" else _NATURAL_INIT[param]
                init = min(max(init, low), high)
            elif not low <= gene.init <= high:
                raise ConfigError(f"{where}.init: {gene.init} is outside [{low}, {high}]")
            else:
                init = float(gene.init)
            scoped[param] = (scope, low, high, init)
        self._check_sparsity_bounds(scoped)

        genes = []
        for group in self._group_keys:
            for model in self.models:
                genes += [Gene(f"{group}/{model}/{p}", p, s, group, model, lo, hi, x0)
                          for p, (s, lo, hi, x0) in scoped.items() if s == "group_model"]
            genes += [Gene(f"{group}/{p}", p, s, group, "*", lo, hi, x0)
                      for p, (s, lo, hi, x0) in scoped.items() if s == "group"]
        for model in self.models:
            genes += [Gene(f"{model}/{p}", p, s, "*", model, lo, hi, x0)
                      for p, (s, lo, hi, x0) in scoped.items() if s == "model"]
        for p, (s, lo, hi, x0) in scoped.items():
            if s == "global":
                per_model = p in PER_MODEL_PARAMS[self.method]
                genes.append(Gene(p, p, s, "*" if per_model else None, "*" if per_model else None, lo, hi, x0))
        return genes

    def _check_sparsity_bounds(self, scoped: Mapping[str, tuple[str, float, float, float]]) -> None:
        """Refuse bounds under which some genome would decode to densities the engine rejects."""

        def span(param: str) -> tuple[float, float] | None:
            if param in scoped:
                return scoped[param][1], scoped[param][2]
            if param in self._fixed_per_model:
                return self._fixed_per_model[param], self._fixed_per_model[param]
            if param in PER_MODEL_PARAMS[self.method]:
                return PER_MODEL_DEFAULTS[param], PER_MODEL_DEFAULTS[param]
            return None

        def where(param: str) -> str:
            return f"space.genes.{param}" if param in scoped else f"space.fixed.{param}"

        density, gamma, epsilon = span("density"), span("gamma"), span("epsilon")
        if density and not (0.0 < density[0] and density[1] <= 1.0):
            raise ConfigError(f"{where('density')}: density must lie in (0, 1], got [{density[0]}, {density[1]}]")
        if gamma and not (0.0 <= gamma[0] and gamma[1] <= 1.0):
            raise ConfigError(f"{where('gamma')}: gamma must lie in [0, 1], got [{gamma[0]}, {gamma[1]}]")
        if epsilon and density and density[0] < 1.0:  # the engine checks epsilon only below density 1
            # density can come arbitrarily close to 1 when its upper bound is 1: epsilon must be 0 there
            top = density[1] + epsilon[1] >= 1.0 if density[1] < 1.0 else epsilon[1] > 0.0
            if epsilon[0] < 0.0 or density[0] - epsilon[1] <= 0.0 or top:
                raise ConfigError(
                    f"{where('epsilon')}: della needs epsilon >= 0 and density +/- epsilon inside (0, 1) for every "
                    f"density below 1; density spans [{density[0]}, {density[1]}], epsilon [{epsilon[0]}, {epsilon[1]}]"
                )

    def _check_complete(self) -> None:
        """A decoded recipe must give the engine every value it has no default for."""
        searched = {g.param for g in self.genes}
        needed = [p for p in PER_MODEL_PARAMS[self.method] if p not in PER_MODEL_DEFAULTS]
        needed += ["t"] if self.method == "slerp" else []
        for param in needed:
            if param not in searched and param not in self._fixed_per_model and param not in self._fixed_global:
                raise ConfigError(f"space.genes.{param}: {self.method} needs {param}; search it (genes) or fix it (fixed)")

    # ------------------------------------------------------------------ the genome
    def decode(self, genome: Sequence[float] | np.ndarray, seed: int | None = None) -> Recipe:
        """The recipe of a genome; ``seed`` (default: the space's) drives DARE/DELLA masks."""
        x = self.validate(genome)
        parameters = dict(self._fixed_global)
        groups: dict[str, dict[str, dict[str, float]]] = {}
        if self._fixed_per_model:
            groups["*"] = {"*": dict(self._fixed_per_model)}
        for gene, value in zip(self.genes, x):
            if gene.group is None:
                parameters[gene.param] = float(value)
            else:
                groups.setdefault(gene.group, {}).setdefault(gene.model, {})[gene.param] = float(value)
        return Recipe(
            method=self.method, models=self.models, base=self.base, parameters=parameters,
            groups=groups, seed=self.config.seed if seed is None else seed,
        )

    # ------------------------------------------------------------------ the inverse
    def _tensor_groups(self) -> list[TensorGroup]:
        layers = [TensorGroup("layer", i, part) for i in range(self.num_layers) for part in ("attn", "mlp")]
        return [TensorGroup("embed"), *layers, TensorGroup("norm"), TensorGroup("head")]

    def _resolved(self, recipe: Recipe) -> dict[tuple[str, str, str], float | None]:
        """What the engine reads from ``recipe``: each (tensor group, model, parameter)."""
        params = PER_MODEL_PARAMS[self.method] + (("t",) if self.method == "slerp" else ())
        out = {}
        for tg in self._tensor_groups():
            for model in self.models:
                resolved = {**PER_MODEL_DEFAULTS, **recipe.model_params(tg, model)}
                if self.method == "slerp":
                    resolved.setdefault("t", recipe.parameters.get("t"))
                for p in params:
                    out[(_describe(tg), model, p)] = resolved.get(p)
        return out

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe this space can express (same merge, tensor for tensor);
        SpaceError naming the first gene or parameter that does not fit."""
        for what, theirs, ours in (("method", recipe.method, self.method), ("models", recipe.models, self.models),
                                   ("base", recipe.base, self.base)):
            if theirs != ours:
                raise SpaceError(f"recipe.{what}: {theirs!r}, the space has {ours!r}")
        finer = [k for k in recipe.groups if k.startswith("tensor:")]
        if finer:
            raise SpaceError(f"recipe.groups.{finer[0]}: per-tensor entries are finer than any space")
        cells = self._resolved(recipe)
        x = []
        for gene in self.genes:
            if gene.group is None and not (self.method == "slerp" and gene.param == "t"):
                if gene.param not in recipe.parameters:
                    raise SpaceError(f"recipe.parameters.{gene.param}: missing, the space searches it")
                x.append(recipe.parameters[gene.param])
                continue
            values = {cells[key] for key in self._cells(gene)}
            if len(values) != 1 or None in values:
                shown = sorted(values, key=lambda v: (v is None, v or 0.0))
                raise SpaceError(f"recipe: gene {gene.name} takes one value, the recipe gives {shown} across its tensors")
            x.append(values.pop())
        genome = self.validate(x)
        ours, theirs = self._resolved(self.decode(genome)), cells
        for key in ours:
            if ours[key] != theirs[key]:
                raise SpaceError(f"recipe: {key[2]} of {key[1]!r} in {key[0]} is {theirs[key]}, the space can only give {ours[key]}")
        globals_ = {k: v for k, v in recipe.parameters.items() if not (self.method == "slerp" and k == "t")}
        expected = {k: v for k, v in self.decode(genome).parameters.items() if not (self.method == "slerp" and k == "t")}
        if globals_ != expected:
            key = sorted(set(globals_.items()) ^ set(expected.items()))[0][0]
            raise SpaceError(f"recipe.parameters.{key}: {globals_.get(key)!r}, the space gives {expected.get(key)!r}")
        return genome

    def _cells(self, gene: Gene) -> list[tuple[str, str, str]]:
        """The (tensor group, model, parameter) cells a gene sets."""
        models = self.models if gene.model in ("*", None) else (gene.model,)
        every = gene.scope in ("model", "global")
        tgs = [tg for tg in self._tensor_groups() if every or self.group_of(tg) == gene.group]
        return [(_describe(tg), m, gene.param) for tg in tgs for m in models]


def _describe(group: TensorGroup) -> str:
    return f"layers.{group.layer}.{group.part}" if group.kind == "layer" else group.kind


def _num_layers(config: SpaceConfig, model_config: Mapping[str, Any] | None) -> int:
    from_model = (model_config or {}).get("num_hidden_layers")
    n = config.num_layers if config.num_layers is not None else from_model
    if n is None:
        raise ConfigError("space.num_layers: not set and no model config with num_hidden_layers given")
    if from_model is not None and config.num_layers is not None and from_model != config.num_layers:
        raise ConfigError(f"space.num_layers: {config.num_layers}, but the model config has {from_model} layers")
    if int(n) < 1:
        raise ConfigError(f"space.num_layers: must be at least 1, got {n}")
    return int(n)
