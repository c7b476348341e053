"""MergeEngine: task vectors computed once and kept resident; a recipe written into a live model.

A search materializes thousands of candidates from the same sources, so everything that does
not depend on the candidate is done once: the fp32 task vectors (source - base), and, the first
time a magnitude method needs them, per-tensor magnitude tables (density -> threshold is then a
lookup) and DELLA's rank norms. ``materialize`` reads no file and allocates nothing the size of
the model: one tensor at a time is merged and copied into the live model's parameters.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable

import torch

from ..errors import FuseEvoError
from ..models import ModelPool, TensorGroup
from ..recipe import GLOBAL_PARAMS as _GLOBAL
from ..recipe import PER_MODEL_DEFAULTS
from ..recipe import PER_MODEL_PARAMS as _PER_MODEL
from ..recipe import Recipe, RecipeError
from . import methods as ops

_MAGNITUDE = {"ties", "breadcrumbs", "breadcrumbs_ties"}
_RANKED = {"della", "della_linear"}
_STOCHASTIC = {"dare_ties", "dare_linear", "della", "della_linear"}


def tensor_seed(recipe_seed: int, tensor: str) -> int:
    """Each tensor's own stream, fixed by the recipe's seed: same recipe, same masks."""
    digest = hashlib.sha256(f"{recipe_seed}:{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MergeEngine:
    """Resident task vectors for one ModelPool; ``materialize(recipe, into=model)`` in place.

    ``device``: where the resident tensors live and merges are computed (default: CUDA when
    available, else CPU). ``table_resolution``: ranks kept per magnitude table. None (the
    default) keeps all of them: thresholds are exact (mergekit parity) and a table is as large
    as its task vector; R ranks cut that to R+1 values with the kept count off by at most
    numel/(2R), for models whose tables would not fit.
    """

    def __init__(
        self,
        pool: ModelPool,
        device: str | torch.device | None = None,
        table_resolution: int | None = None,
    ):
        self.pool = pool
        self.device = torch.device(device) if device is not None else _default_device(pool)
        self.table_resolution = table_resolution
        self.base = {k: t.to(self.device) for k, t in pool.base.tensors.items()}
        # fp32 base and task vectors stacked per tensor ([N, *shape]); the per-model dicts are
        # views of the stacks, so linear methods run as one pass (combine_task_vectors)
        self.base32 = {k: t.float() for k, t in self.base.items()}
        self.order = {name: i for i, name in enumerate(pool.sources)}
        self.stacked = {
            k: torch.stack([ops.task_vector(b, src.tensors[k].to(self.device)) for src in pool.sources.values()])
            for k, b in self.base32.items()
        }
        self.deltas: dict[str, dict[str, torch.Tensor]] = {
            name: {k: stack[i] for k, stack in self.stacked.items()} for name, i in self.order.items()
        }
        self._tables: dict[tuple[str, str], ops.MagnitudeTable] = {}
        self._rank_norms: dict[tuple[str, str], torch.Tensor] = {}
        self._cosines: dict[tuple[str, str], float] = {}
        self._checked: set[str] = set()

    # ------------------------------------------------------------------ checks
    def check(self, recipe: Recipe) -> None:
        """Reject a recipe this pool cannot materialize, before touching the live model."""
        unknown = [m for m in recipe.models if m not in self.deltas]
        if unknown:
            raise RecipeError(f"recipe.models: {unknown} not in the pool ({list(self.deltas)})")
        if recipe.base != self.pool.base.name:
            raise RecipeError(f"recipe.base: {recipe.base!r}, the pool's base is {self.pool.base.name!r}")
        extra = set(recipe.parameters) - _GLOBAL[recipe.method]
        if extra:
            raise RecipeError(
                f"recipe.parameters: {sorted(extra)} do not apply to {recipe.method} "
                f"(it takes {sorted(_GLOBAL[recipe.method])})"
            )
        if recipe.method == "slerp" and len(recipe.models) != 1:
            raise RecipeError("recipe.models: slerp interpolates the base and exactly one model")
        if recipe.method == "model_stock" and len(recipe.models) < 2:
            raise RecipeError("recipe.models: model_stock needs at least two fine-tuned models")
        exact = any(k.startswith("tensor:") for k in recipe.groups)
        unknown = [k[7:] for k in recipe.groups if k.startswith("tensor:") and k[7:] not in self.base]
        if unknown:
            raise RecipeError(f"recipe.groups: no tensor {unknown[0]!r} in the base model")
        # every distinct group (and, with tensor: entries, every tensor) once, in tensor order
        seen = {(None if not exact else n, g): (n, g) for n, g in self.pool.groups.items()}
        for name, group in seen.values():
            for model in recipe.models:
                self._per_model(recipe, group, model, name)
            if recipe.method == "slerp":
                self._slerp_t(recipe, group, name)

    def _per_model(self, recipe: Recipe, group: TensorGroup, model: str, tensor: str) -> dict[str, float]:
        params = recipe.model_params(group, model, tensor)
        wanted = _PER_MODEL[recipe.method]
        extra = set(params) - set(wanted) - ({"t"} if recipe.method == "slerp" else set())
        if extra:
            raise RecipeError(f"recipe: {sorted(extra)} do not apply to {recipe.method} (model {model!r}, {_where(group)})")
        missing = [p for p in wanted if p not in params and p not in PER_MODEL_DEFAULTS]
        if missing:
            raise RecipeError(f"recipe: no {missing[0]} for model {model!r} in {_where(group)}")
        return {**{p: PER_MODEL_DEFAULTS[p] for p in wanted if p in PER_MODEL_DEFAULTS}, **params}

    def _slerp_t(self, recipe: Recipe, group: TensorGroup, tensor: str) -> float:
        t = recipe.model_params(group, recipe.models[0], tensor).get("t", recipe.parameters.get("t"))
        if t is None:
            raise RecipeError(f"recipe: slerp needs t (in parameters or in the groups) for {_where(group)}")
        return float(t)

    # ------------------------------------------------------------------ merging
    def _table(self, model: str, tensor: str) -> ops.MagnitudeTable:
        key = (model, tensor)
        if key not in self._tables:
            self._tables[key] = ops.MagnitudeTable(self.deltas[model][tensor], self.table_resolution)
        return self._tables[key]

    def _cosine(self, model: str, tensor: str) -> float:
        key = (model, tensor)
        if key not in self._cosines:
            self._cosines[key] = ops.slerp_cosine(self.base32[tensor], self.base32[tensor] + self.deltas[model][tensor])
        return self._cosines[key]

    def _rank_norm(self, model: str, tensor: str) -> torch.Tensor:
        key = (model, tensor)
        if key not in self._rank_norms:
            self._rank_norms[key] = ops.row_rank_norm(self.deltas[model][tensor])
        return self._rank_norms[key]

    @torch.no_grad()
    def merge_tensor(self, recipe: Recipe, name: str) -> torch.Tensor:
        """The merged value of one tensor (fp32 accumulation; fp32 or the base's dtype out,
        ``materialize`` casts to the live model's dtype as it copies)."""
        group = self.pool.groups[name]
        base = self.base[name]
        models = recipe.models
        deltas = [self.deltas[m][name] for m in models]
        g = recipe.parameters
        method = recipe.method
        if method == "slerp":
            # s0 base + s1 (base + d) = (s0 + s1) base + s1 d: one pass, angle cached per tensor
            s0, s1 = ops.slerp_weights(self._cosine(models[0], name), self._slerp_t(recipe, group, name))
            coefficients = self._per_source({models[0]: s1})
            return ops.combine_task_vectors(self.base32[name], self.stacked[name], coefficients, s0 + s1)
        if method == "model_stock":
            return ops.model_stock(base, [base.float() + d for d in deltas],
                                   filter_wise=bool(g.get("filter_wise", False)))
        per = [self._per_model(recipe, group, m, name) for m in models]
        weights = [p["weight"] for p in per]
        if method in ("linear", "task_arithmetic"):
            return self._linear_family(recipe, name, weights)
        if method == "ties" and not g.get("rescale", False) and g.get("consensus", "sum") == "sum":
            return self._ties(recipe, name, weights, [p["density"] for p in per])
        kw: dict[str, Any] = {"deltas_given": True}
        for key, arg in (("normalize", "normalize"), ("lambda", "lambda_"), ("rescale", "rescale"),
                         ("consensus", "consensus")):
            if key in g:
                kw[arg] = g[key]
        kw["densities"] = [p["density"] for p in per]
        if method in _MAGNITUDE:
            kw["tables"] = [self._table(m, name) for m in models]
            if method != "ties":
                kw["gamma"] = [p["gamma"] for p in per]
        if method in _STOCHASTIC:
            kw["seed"] = tensor_seed(recipe.seed, name)
        if method in _RANKED:
            kw["epsilon"] = [p["epsilon"] for p in per]
            kw["rank_norms"] = [self._rank_norm(m, name) for m in models]
        fn: Callable[..., torch.Tensor] = getattr(ops, method)
        return fn(base, deltas, weights, **kw)

    def _per_source(self, values: dict[str, float]) -> torch.Tensor:
        """A [N] vector over the pool's stacked sources; sources the recipe leaves out get 0."""
        vector = [0.0] * len(self.order)
        for model, value in values.items():
            vector[self.order[model]] = value
        return torch.tensor(vector, dtype=torch.float32, device=self.device)

    def _linear_family(self, recipe: Recipe, name: str, weights: list[float]) -> torch.Tensor:
        """linear and task_arithmetic as one matrix product over the stacked task vectors:
        linear = (normalize ? 1 : sum w) base + sum w_i d_i (/ sum w); task arithmetic =
        base + lambda sum w_i d_i (/ sum w if normalize). fp32 out."""
        g = recipe.parameters
        total = float(sum(weights))
        linear = recipe.method == "linear"
        normalize = bool(g.get("normalize", linear))
        if normalize and total == 0:
            raise RecipeError(f"recipe: weights sum to zero in tensor {name!r}, cannot normalize")
        scale = (1.0 / total if normalize else 1.0) * (1.0 if linear else float(g.get("lambda", 1.0)))
        coefficients = self._per_source({m: w * scale for m, w in zip(recipe.models, weights)})
        base_scale = total if linear and not normalize else 1.0
        return ops.combine_task_vectors(self.base32[name], self.stacked[name], coefficients, base_scale)

    def _ties(self, recipe: Recipe, name: str, weights: list[float], densities: list[float]) -> torch.Tensor:
        """TIES over the stacked task vectors with table thresholds, through the fused kernel."""
        for model, density in zip(recipe.models, densities):
            ops._check_density(density, f"ties (model {model!r}, tensor {name!r})")
        w = self._per_source(dict(zip(recipe.models, weights)))
        thr = self._per_source({m: float(self._table(m, name).threshold(d)) for m, d in zip(recipe.models, densities)})
        g = recipe.parameters
        return _fused(ops.ties_stacked)(self.base32[name], self.stacked[name], w, thr,
                                        float(g.get("lambda", 1.0)), bool(g.get("normalize", True)))

    @torch.no_grad()
    def materialize(self, recipe: Recipe, into: torch.nn.Module) -> torch.nn.Module:
        """Write the recipe's merge into ``into`` (a model of the base's architecture) in place."""
        if recipe.key not in self._checked:  # the search re-materializes recipes: check once
            self.check(recipe)
            self._checked.add(recipe.key)
        targets = into.state_dict()
        missing = [k for k in self.base if k not in targets]
        if missing:
            raise FuseEvoError(f"the live model has no tensor {missing[0]!r}: not a model of the base's architecture")
        for name in self.base:
            targets[name].copy_(self.merge_tensor(recipe, name))
        return into


_FUSED: dict[Callable, Callable] = {}


def _fused(fn: Callable) -> Callable:
    """``fn`` compiled once per process (torch.compile, dynamic shapes) so its elementwise ops
    run as one fused pass; if compiling fails (no C++ compiler, an unsupported backend) the
    eager function is used, with one warning, and results are the same."""
    if fn not in _FUSED:
        compiled = torch.compile(fn, dynamic=True)

        def run(*args: Any) -> torch.Tensor:
            try:
                return compiled(*args)
            except Exception as e:  # compilation is an optimization, never a failure
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running eager")
                _FUSED[fn] = fn
                return fn(*args)

        _FUSED[fn] = run
    return _FUSED[fn]


def _default_device(pool: ModelPool, headroom: float = 0.8) -> torch.device:
    """CUDA when present and the resident set (fp32 task vectors + base) fits in most of its
    free memory; the CPU otherwise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    numel = sum(t.numel() for t in pool.base.tensors.values())
    # fp32 task vectors + fp32 base + the base in its own dtype
    resident = numel * (4 * len(pool.sources) + 4 + pool.base.tensors[pool.tensor_names[0]].element_size())
    free, _ = torch.cuda.mem_get_info()
    return torch.device("cuda") if resident < headroom * free else torch.device("cpu")


def _where(group: TensorGroup) -> str:
    if group.kind != "layer":
        return f"group {group.kind}"
    return f"group layers.{group.layer}.{group.part}"
