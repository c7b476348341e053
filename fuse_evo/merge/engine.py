"""MergeEngine: task vectors computed once and kept resident; a recipe written into a live model.

A search materializes thousands of candidates from the same sources, so everything that does
not depend on the candidate is done once: the fp32 task vectors (source - base), and, the first
time a magnitude method needs them, per-tensor magnitude tables (density -> threshold is then a
lookup) and DELLA's rank norms. ``materialize`` reads no file and allocates nothing the size of
the model: one tensor at a time is merged and copied into the live model's parameters.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Callable

import torch

from ..errors import FuseEvoError
from ..models import ModelPool
from ..recipe import Recipe, RecipeError, TensorGroup
from ..registry import PER_MODEL_DEFAULTS, spec
from . import methods as ops

_RESCALE_KIND = {None: None, False: None, True: "l1", "l1": "l1", "l2": "l2", "linf": "linf", "keep_prob": "keep_prob"}


def tensor_seed(recipe_seed: int, tensor: str) -> int:
    """Each tensor's own stream, fixed by the recipe's seed: same recipe, same masks."""
    digest = hashlib.sha256(f"{recipe_seed}:{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class NonFiniteMerge(FuseEvoError):
    """A recipe whose merged weights overflow: that candidate's failure, never a model scored 0."""


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
        # fp32 base and task vectors stacked per tensor, flat ([numel], [N, numel]: fresh
        # tensors, so a compiled kernel sees one layout whatever the tensor's rank); the
        # per-model dicts are shaped views of the stacks
        self.shapes = {k: t.shape for k, t in self.base.items()}
        self.base32 = {k: t.reshape(-1).to(torch.float32, copy=True) for k, t in self.base.items()}
        self.order = {name: i for i, name in enumerate(pool.sources)}
        self.stacked = {
            k: torch.stack([ops.task_vector(b, src.tensors[k].to(self.device).reshape(-1)) for src in pool.sources.values()])
            for k, b in self.base32.items()
        }
        self.deltas: dict[str, dict[str, torch.Tensor]] = {
            name: {k: stack[i].view(self.shapes[k]) for k, stack in self.stacked.items()}
            for name, i in self.order.items()
        }
        self._tables: dict[tuple[str, str], ops.MagnitudeTable] = {}
        self._rank_stack: dict[str, torch.Tensor] = {}
        self._norms: dict[tuple[str, str], torch.Tensor] = {}
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
        method = spec(recipe.method)
        extra = set(recipe.parameters) - method.global_params
        if extra:
            raise RecipeError(
                f"recipe.parameters: {sorted(extra)} do not apply to {recipe.method} "
                f"(it takes {sorted(method.global_params)})"
            )
        least, most = method.models
        if most == 1 and len(recipe.models) != 1:
            raise RecipeError(f"recipe.models: {recipe.method} interpolates the base and exactly one model")
        if len(recipe.models) < least:
            count = {2: "two", 3: "three"}.get(least, str(least))
            raise RecipeError(f"recipe.models: {recipe.method} needs at least {count} fine-tuned models")
        exact = any(k.startswith("tensor:") for k in recipe.groups)
        unknown = [k[7:] for k in recipe.groups if k.startswith("tensor:") and k[7:] not in self.base]
        if unknown:
            raise RecipeError(f"recipe.groups: no tensor {unknown[0]!r} in the base model")
        # every distinct group (and, with tensor: entries, every tensor) once, in tensor order
        seen = {(None if not exact else n, g): (n, g) for n, g in self.pool.groups.items()}
        g = method.resolved(recipe.parameters) if method.family == "gta" else {}
        if g and not _hashable_in(g["rescale"], _RESCALE_KIND):
            raise RecipeError(f"recipe.parameters.rescale: {g['rescale']!r}, expected one of {list(_RESCALE_KIND)}")
        if g and not _hashable_in(g["consensus"], (None, "sum", "count")):
            raise RecipeError(f"recipe.parameters.consensus: {g['consensus']!r}, expected sum, count or null")
        for name, group in seen.values():
            per = {model: self._per_model(recipe, group, model, name) for model in recipe.models}
            for model, params in per.items():
                if "density" in params:
                    try:
                        ops.check_sparsity(recipe.method, params["density"], params.get("gamma"), params.get("epsilon"))
                    except ValueError as e:
                        raise RecipeError(f"recipe: {e} (model {model!r}, {_where(group)})") from None
            if g and g["consensus"] is None and g["normalize"] and not sum(p["weight"] for p in per.values()):
                raise RecipeError(f"recipe: weights sum to zero in {_where(group)}, cannot normalize")
            if method.family == "slerp":
                self._slerp_t(recipe, group, name)

    def _per_model(self, recipe: Recipe, group: TensorGroup, model: str, tensor: str) -> dict[str, float]:
        params = recipe.model_params(group, model, tensor)
        wanted = spec(recipe.method).per_model
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
            self._cosines[key] = ops.slerp_cosine(self.base32[tensor], self.base32[tensor] + self.stacked[tensor][self.order[model]])
        return self._cosines[key]

    @torch.no_grad()
    def merge_tensor(self, recipe: Recipe, name: str) -> torch.Tensor:
        """The merged value of one tensor (fp32 accumulation; fp32 or the base's dtype out,
        ``materialize`` casts to the live model's dtype as it copies)."""
        group = self.pool.groups[name]
        base = self.base[name]
        models = recipe.models
        g = recipe.parameters
        family = spec(recipe.method).family
        if family == "slerp":
            # s0 base + s1 (base + d) = (s0 + s1) base + s1 d: one pass, angle cached per tensor
            s0, s1 = ops.slerp_weights(self._cosine(models[0], name), self._slerp_t(recipe, group, name))
            coefficients = self._per_source({models[0]: s1})
            merged = ops.combine_task_vectors(self.base32[name], self.stacked[name], coefficients, s0 + s1)
            return merged.view(self.shapes[name])
        if family == "model_stock":
            deltas = [self.deltas[m][name] for m in models]
            return ops.model_stock(base, [base.float() + d for d in deltas],
                                   filter_wise=bool(g.get("filter_wise", False)))
        per = [self._per_model(recipe, group, m, name) for m in models]
        weights = [p["weight"] for p in per]
        if family == "linear":
            return self._linear_family(recipe, name, weights)
        return self._gta(recipe, name, per)

    def _per_source(self, values: dict[str, float], fill: float = 0.0, dtype=torch.float32) -> torch.Tensor:
        """A [N] vector over the pool's stacked sources; sources the recipe leaves out get ``fill``."""
        vector = [fill] * len(self.order)
        for model, value in values.items():
            vector[self.order[model]] = value
        return torch.tensor(vector, dtype=dtype, device=self.device)

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
        merged = ops.combine_task_vectors(self.base32[name], self.stacked[name], coefficients, base_scale)
        return merged.view(self.shapes[name])

    def _gta(self, recipe: Recipe, name: str, per: list[dict[str, float]]) -> torch.Tensor:
        """Every sparsify-then-combine method through one fused kernel (``ops.gta_stacked``):
        thresholds from the magnitude tables, random masks drawn in the kernel from the same
        streams the operators use, rescale norms cached per tensor. fp32 out."""
        method, models = recipe.method, recipe.models
        s = spec(method)
        g = s.resolved(recipe.parameters)
        rescale = _RESCALE_KIND[g["rescale"]]
        vec = self._per_source
        args: dict[str, Any] = {
            "weights": vec({m: p["weight"] for m, p in zip(models, per)}),
            "density": vec({m: p["density"] for m, p in zip(models, per)}, fill=1.0),
            "rescale": rescale,
            "consensus": g.get("consensus"),
            "normalize": bool(g["normalize"]),
            "lambda_": float(g["lambda"]),
        }
        if s.sparsify in ("magnitude", "outliers"):
            low, high = {}, {}
            for m, p in zip(models, per):
                low[m], high[m] = self._magnitude_bounds(m, name, p["density"], p.get("gamma"))
            args["low"] = vec(low)
            if s.sparsify == "outliers":  # an upper bound only where there is one: a cheaper kernel
                args["high"] = vec(high, fill=math.inf)
        else:  # random masks: source j of the recipe draws from stream (tensor seed, j), as the operators
            seed = tensor_seed(recipe.seed, name)
            args["keys"] = vec({m: ops.random_key(seed, j) for j, m in enumerate(models)}, dtype=torch.int32)
            if s.sparsify == "ranked":
                args["epsilon"] = vec({m: p["epsilon"] if p["density"] < 1 else 0.0 for m, p in zip(models, per)})
                args["rank_norms"] = self._rank_norms(name)
        stacked = self.stacked[name]
        if rescale in ("l1", "l2", "linf"):
            args["norms"] = self._norm(name, rescale)
            mask = {k: args.get(k) for k in ("density", "low", "high", "keys", "epsilon", "rank_norms")}
            args["after"] = _fused(ops.masked_norm)(stacked, **mask, kind=rescale)
        merged = _fused(ops.gta_stacked)(self.base32[name], stacked, **args)
        return merged.view(self.shapes[name])

    def _magnitude_bounds(self, model: str, name: str, density: float, gamma: float | None) -> tuple[float, float]:
        """|delta| bounds a source keeps: TIES the top ``density`` (no upper bound), breadcrumbs
        the ranks below the top ``gamma`` outliers; density 1 keeps everything."""
        if density >= 1:
            return 0.0, math.inf
        table = self._table(model, name)
        if gamma is None:
            return float(table.threshold(density)), math.inf
        first, last = ops.outlier_ranks(table.numel, density, gamma)
        return float(table.at_rank(last)), float(table.at_rank(first))

    def _norm(self, name: str, kind: str) -> torch.Tensor:
        key = (name, kind)
        if key not in self._norms:
            self._norms[key] = ops.stacked_norm(self.stacked[name], kind)
        return self._norms[key]

    def _rank_norms(self, name: str) -> torch.Tensor:
        """DELLA's per-row magnitude ranks of every source's task vector, stacked flat; built once."""
        if name not in self._rank_stack:
            self._rank_stack[name] = torch.stack([ops.row_rank_norm(self.deltas[m][name]).reshape(-1) for m in self.order])
        return self._rank_stack[name]

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
        finite = []  # one flag per float tensor, read once at the end: no device sync per tensor
        for name in self.base:
            target = targets[name]
            target.copy_(self.merge_tensor(recipe, name))
            if target.is_floating_point():
                finite.append((name, torch.isfinite(target).all()))
        if finite and not bool(torch.stack([f for _, f in finite]).all()):
            name = next(n for n, f in finite if not bool(f))
            raise NonFiniteMerge(f"merged tensor {name!r} is not finite (inf or nan) in "
                                 f"{targets[name].dtype}: the recipe's coefficients overflow it")
        return into


_FUSED: dict[Callable, Callable] = {}
_VARIANTS = 64


def _fused(fn: Callable) -> Callable:
    """``fn`` compiled once per process (torch.compile, dynamic shapes) so its elementwise ops
    run as one fused pass; if compiling fails (no C++ compiler, an unsupported backend) the
    eager function is used, with one warning, and results are the same."""
    if fn not in _FUSED:
        compiled = torch.compile(fn, dynamic=True)

        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            try:
                # each option set (method, rescale, consensus...) is one more variant: past
                # dynamo's default of 8 it would fall back to eager without a word
                with torch._dynamo.config.patch(recompile_limit=_VARIANTS):
                    return compiled(*args, **kwargs)
            except Exception as e:  # compilation is an optimization, never a failure
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running eager")
                _FUSED[fn] = fn
                return fn(*args, **kwargs)

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


def _hashable_in(value: Any, allowed) -> bool:
    try:
        return value in allowed
    except TypeError:  # a list or mapping where a scalar belongs
        return False


def _where(group: TensorGroup) -> str:
    if group.kind != "layer":
        return f"group {group.kind}"
    return f"group layers.{group.layer}.{group.part}"
