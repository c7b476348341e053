"""MergeEngine: the sources read in their own dtype; a recipe written into a live model.

A search materializes thousands of candidates from the same sources, so the engine keeps only
what the sources are (the base and each source in the dtype it was saved in: on the CPU,
views of the memory-mapped files that every worker on a node shares) and per-tensor
structures a few hundred KB each: magnitude histograms (TIES and breadcrumbs thresholds,
exact), rescale norms, slerp angles. Task vectors are never stored: every kernel computes
source - base in fp32 registers as it merges. ``materialize`` reads no file and allocates
nothing the size of the model: one tensor at a time is merged and copied into the live model.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Callable, Iterator

import torch

from ..device import return_freed_tensors_to_the_os
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
    """The sources of one ModelPool, resident; ``materialize(recipe, into=model)`` in place.

    ``device``: where the sources live and merges are computed (default: CUDA when available
    and the sources fit, else CPU). The pool's tensors are used as they are on the CPU (no
    copy, no dtype conversion); on another device they are copied there once, in their dtype.
    ``cache_bytes``: what DELLA's per-row rank tables may hold (recomputed past it; default
    2% of the sources' bytes). ``stream``: keep the sources in pinned host memory and copy
    them to ``device`` (CUDA) a tensor at a time, the next tensor's copy overlapping the
    current merge (the memory plan's ``stream`` placement).
    """

    def __init__(self, pool: ModelPool, device: str | torch.device | None = None,
                 cache_bytes: int | None = None, stream: bool = False):
        self.pool = pool
        return_freed_tensors_to_the_os()  # the merges' and scoring's transients never stay in the heap
        self.device = torch.device(device) if device is not None else _default_device(pool)
        if stream and self.device.type != "cuda":
            raise FuseEvoError(f"the streaming placement copies sources to a CUDA device, not {self.device}")
        self.stream = stream
        home = torch.device("cpu") if stream else self.device
        self.shapes = {k: t.shape for k, t in pool.base.tensors.items()}
        # flat views ([numel]: a compiled kernel sees one layout whatever the tensor's rank)
        self.base = {k: _resident(t, home, stream) for k, t in pool.base.tensors.items()}
        self.order = {name: i for i, name in enumerate(pool.sources)}
        self.sources = {k: [_resident(src.tensors[k], home, stream) for src in pool.sources.values()]
                        for k in self.base}
        self._window: dict[str, list[torch.Tensor]] = {}  # streaming: the tensor being merged, on device
        held = [*self.base.values(), *(t for ts in self.sources.values() for t in ts)]
        self.nbytes = sum(t.numel() * t.element_size() for t in held)  # the sources' and base's bytes
        self.cache_bytes = int(0.02 * self.nbytes) if cache_bytes is None else cache_bytes
        self._tables: dict[tuple[str, str], ops.MagnitudeTable | ops.MagnitudeHistogram] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._norms: dict[tuple[str, str], torch.Tensor] = {}
        self._kept: dict[tuple[str, str, str], ops.KeptNorms] = {}  # one random stream per source tensor
        self._streams_seen: dict[str, tuple] = {}  # per tensor: the last random streams a recipe drew
        self._cosines: dict[tuple[str, str], float] = {}
        self._checked: set[str] = set()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # the table passes' buffers, during one materialize

    def source(self, model: str, tensor: str) -> torch.Tensor:
        """Source ``model``'s tensor ``tensor``, flat, in its own dtype, on the merge device."""
        window = self._window.get(tensor)
        return window[1 + self.order[model]] if window else self.sources[tensor][self.order[model]]

    def _base(self, tensor: str) -> torch.Tensor:
        window = self._window.get(tensor)
        return window[0] if window else self.base[tensor]

    def task_vector(self, model: str, tensor: str) -> torch.Tensor:
        """fp32 ``source - base`` of one tensor, shaped: computed on demand, never kept."""
        return ops.task_vector(self._base(tensor), self.source(model, tensor)).view(self.shapes[tensor])

    def _buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """A scratch buffer of ``n`` elements, reused by every chunk of every table pass within
        one ``materialize`` (released at its end). With glibc's mmap threshold fixed, a fresh
        tensor-sized transient per pass is a fresh mapping whose page faults cost more than the
        pass itself (4x the histogram kernel's time, measured at 1.1B parameters)."""
        held = self._scratch.get(dtype)
        if held is None or held.numel() < n:
            held = self._scratch[dtype] = torch.empty(n, dtype=dtype, device=self.device)
        return held[:n]

    @property
    def table_bytes(self) -> int:
        """Bytes held by the magnitude tables, the kept-norm tables, DELLA's rank tables and the norms."""
        tables = sum(t.nbytes for t in [*self._tables.values(), *self._kept.values()])
        return tables + sum(r.numel() * r.element_size() for r in self._ranks.values()) + sum(
            n.numel() * n.element_size() for n in self._norms.values())

    # ------------------------------------------------------------------ checks
    def check(self, recipe: Recipe) -> None:
        """Reject a recipe this pool cannot materialize, before touching the live model."""
        unknown = [m for m in recipe.models if m not in self.order]
        if unknown:
            raise RecipeError(f"recipe.models: {unknown} not in the pool ({list(self.order)})")
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
    def _table(self, model: str, tensor: str) -> ops.MagnitudeTable | ops.MagnitudeHistogram:
        """The |delta| order statistics of one source's tensor, built on first use: a sorted
        copy for small tensors (at most 8K values: norms, biases), else a histogram from one streaming pass."""
        key = (model, tensor)
        if key not in self._tables:
            base, source = self._base(tensor), self.source(model, tensor)
            if base.numel() <= _SORTED_UP_TO:
                self._tables[key] = ops.MagnitudeTable(ops.task_vector(base, source))
            else:
                counts = torch.zeros(2 * ops.BUCKETS, dtype=torch.int64, device=self.device)
                for start, end in _chunks(base.numel()):
                    index = self._buffer(torch.int32, end - start)
                    _into(ops.magnitude_counts)([index], base[start:end], source[start:end])
                    counts += torch.bincount(index, minlength=2 * ops.BUCKETS)
                # the tensors looked up when a bucket is refined (during this tensor's merge),
                # never held by the table: a streamed source is on the device only then
                self._tables[key] = ops.MagnitudeHistogram(counts, lambda bucket: self._bucket_members(
                    model, tensor, bucket))
        return self._tables[key]

    def _bucket_members(self, model: str, tensor: str, bucket: int) -> torch.Tensor:
        """The |delta| bits of one source tensor's impure members of ``bucket`` (their order
        unspecified), in chunked passes."""
        base, source = self._base(tensor), self.source(model, tensor)
        which = torch.tensor(bucket, dtype=torch.int32, device=self.device)  # a tensor: no recompile per bucket
        found = []
        for start, end in _chunks(base.numel()):
            bits = self._buffer(torch.int32, end - start)
            _into(ops.bucket_members)([bits], base[start:end], source[start:end], which)
            found.append(bits[bits != 0])
        return torch.cat(found)

    def _cosine(self, model: str, tensor: str) -> float:
        key = (model, tensor)
        if key not in self._cosines:
            self._cosines[key] = ops.slerp_cosine(self._base(tensor), self.source(model, tensor))
        return self._cosines[key]

    @torch.no_grad()
    def merge_into(self, recipe: Recipe, name: str, out: torch.Tensor) -> torch.Tensor:
        """Write one tensor's merge into ``out`` (any float dtype, the tensor's numel) in one
        pass: fp32 inside, cast once as it is written. Returns a 0-d flag, True when every
        written value is finite (read it once per model: no device sync per tensor)."""
        group = self.pool.groups[name]
        base = self._base(name)
        models = recipe.models
        g = recipe.parameters
        family = spec(recipe.method).family
        flat = out.view(-1)
        if family == "slerp":
            # s0 base + s1 source = (s0 + s1) base + s1 (source - base): one pass, angle cached
            s0, s1 = ops.slerp_weights(self._cosine(models[0], name), self._slerp_t(recipe, group, name))
            return _writer(ops.combine_task_vectors)(flat, base, [self.source(models[0], name)],
                                                     self._vector([s1]), s0 + s1)
        if family == "model_stock":
            merged = ops.model_stock(base.view(self.shapes[name]),
                                     [self.source(m, name).view(self.shapes[name]) for m in models],
                                     filter_wise=bool(g.get("filter_wise", False)))
            flat.copy_(merged.reshape(-1))
            return torch.isfinite(flat).all()
        per = [self._per_model(recipe, group, m, name) for m in models]
        if family == "linear":
            return self._linear_family(recipe, name, [p["weight"] for p in per], flat)
        return self._gta(recipe, name, per, flat)

    def merged(self, recipe: Recipe, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor's merge as a new tensor (default: the base's dtype), shaped; for
        writers that save a merge tensor by tensor."""
        out = torch.empty(self.shapes[name], dtype=dtype or self.base[name].dtype, device=self.device)
        self._fetch_now(name)
        try:
            finite = bool(self.merge_into(recipe, name, out))
        finally:
            self._scratch = {}
        if not finite:
            raise NonFiniteMerge(f"merged tensor {name!r} is not finite (inf or nan) in {out.dtype}: "
                                 "the recipe's coefficients overflow it")
        return out

    def _vector(self, values: list[float], dtype=torch.float32) -> torch.Tensor:
        """A [N] vector over the recipe's sources, on the engine's device."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _linear_family(self, recipe: Recipe, name: str, weights: list[float], out: torch.Tensor) -> torch.Tensor:
        """linear and task_arithmetic as one pass over the recipe's sources:
        linear = (normalize ? 1 : sum w) base + sum w_i d_i (/ sum w); task arithmetic =
        base + lambda sum w_i d_i (/ sum w if normalize)."""
        g = recipe.parameters
        total = float(sum(weights))
        linear = recipe.method == "linear"
        normalize = bool(g.get("normalize", linear))
        if normalize and total == 0:
            raise RecipeError(f"recipe: weights sum to zero in tensor {name!r}, cannot normalize")
        scale = (1.0 / total if normalize else 1.0) * (1.0 if linear else float(g.get("lambda", 1.0)))
        base_scale = total if linear and not normalize else 1.0
        sources = [self.source(m, name) for m in recipe.models]
        return _writer(ops.combine_task_vectors)(out, self._base(name), sources,
                                                 self._vector([w * scale for w in weights]), base_scale)

    def _gta(self, recipe: Recipe, name: str, per: list[dict[str, float]], out: torch.Tensor) -> torch.Tensor:
        """Every sparsify-then-combine method through one fused kernel (``ops.gta_fused``) over
        the recipe's sources: thresholds from the magnitude tables, random masks drawn in the
        kernel from the same streams the operators use, rescale norms cached per tensor."""
        method, models = recipe.method, recipe.models
        s = spec(method)
        g = s.resolved(recipe.parameters)
        rescale = _RESCALE_KIND[g["rescale"]]
        vec = self._vector
        args: dict[str, Any] = {
            "weights": vec([p["weight"] for p in per]),
            "density": vec([p["density"] for p in per]),
            "rescale": rescale,
            "consensus": g.get("consensus"),
            "normalize": bool(g["normalize"]),
            "lambda_": float(g["lambda"]),
        }
        if s.sparsify in ("magnitude", "outliers"):
            bounds = [self._magnitude_bounds(m, name, p["density"], p.get("gamma")) for m, p in zip(models, per)]
            args["low"] = vec([low for low, _ in bounds])
            if s.sparsify == "outliers":  # an upper bound only where there is one: a cheaper kernel
                args["high"] = vec([high for _, high in bounds])
        else:  # random masks: source j of the recipe draws from stream (tensor seed, j), as the operators
            seed = tensor_seed(recipe.seed, name)
            keys = [ops.random_key(seed, j) for j in range(len(models))]
            args["keys"] = vec(keys, dtype=torch.int32)
            if s.sparsify == "ranked":
                args["epsilon"] = vec([p["epsilon"] if p["density"] < 1 else 0.0 for p in per])
                args["rank_norms"] = [self._rank_norm(m, name) for m in models]
            else:
                cutoffs = [ops.random_cutoff(p["density"]) for p in per]
                args["cutoffs"] = vec(cutoffs, dtype=torch.int32)
        base, sources = self._base(name), [self.source(m, name) for m in models]
        if rescale in ("l1", "l2", "linf"):
            norms = torch.stack([self._norm(m, name, rescale) for m in models])
            kept = self._kept_norms(models, name, keys, rescale) if "cutoffs" in args else None
            if kept:  # DARE's masked norms without a pass over the tensor
                after = vec([table.norm(cutoff) for table, cutoff in zip(kept, cutoffs)])
            else:
                mask = {k: args.get(k) for k in ("density", "low", "high", "keys", "epsilon", "rank_norms", "cutoffs")}
                after = _fused(ops.masked_norm)(base, sources, **mask, kind=rescale)
            args["factors"] = ops.rescale_factors(norms, after)  # out of the kernel's loop
        return _writer(ops.gta_fused)(out, base, sources, **args)

    def _magnitude_bounds(self, model: str, name: str, density: float, gamma: float | None) -> tuple[float, float]:
        """|delta| bounds a source keeps: TIES the top ``density`` (no upper bound), breadcrumbs
        the ranks below the top ``gamma`` outliers; density 1 keeps everything."""
        if density >= 1:
            return 0.0, math.inf
        table = self._table(model, name)
        if gamma is None:
            return float(table.at_rank(ops._keep_count(density, table.numel) - 1)), math.inf
        first, last = ops.outlier_ranks(table.numel, density, gamma)
        return float(table.at_rank(last)), float(table.at_rank(first))

    def _kept_norms(self, models: list[str], name: str, keys: list[int], kind: str) -> list[ops.KeptNorms] | None:
        """The kept-norm tables of one tensor's sources for their random streams ``keys``, or
        None where a masked pass is the better buy: a small tensor, or streams seen for the
        first time (a search keeps one seed, so its streams come back every candidate; a
        recipe with a new seed each time never pays a table's build)."""
        base = self._base(name)
        bits = ops.KeptNorms.bits_for(base.numel(), base.element_size())
        if bits is None:
            return None
        tables = [self._kept.get((m, name, kind)) for m in models]
        if all(t is not None and t.key == k for t, k in zip(tables, keys)):
            return tables
        streams = (tuple(models), tuple(keys), kind)
        if self._streams_seen.get(name) != streams:
            self._streams_seen[name] = streams
            return None
        return [t if t is not None and t.key == k else self._build_kept_norms(m, name, k, kind, bits)
                for m, t, k in zip(models, tables, keys)]

    def _build_kept_norms(self, model: str, name: str, key: int, kind: str, bits: int) -> ops.KeptNorms:
        """One source tensor's kept-norm table, in chunked passes (bounded transients)."""
        base, source = self._base(name), self.source(model, name)
        stats = torch.zeros(1 << bits, device=self.device)
        stream = torch.tensor(key, dtype=torch.int32, device=self.device)
        for start, end in _chunks(base.numel()):
            bucket, value = self._buffer(torch.int32, end - start), self._buffer(torch.float32, end - start)
            _into(ops.draw_buckets)([bucket, value], base[start:end], source[start:end], stream, start, 24 - bits, kind)
            if kind == "linf":
                stats.scatter_reduce_(0, bucket.long(), value, "amax")
            else:  # fp32 per bucket (a few hundred values each), cumulated in fp64 by the table
                stats.add_(torch.bincount(bucket, weights=value, minlength=1 << bits))
        numel = base.numel()

        def members(first: int, stop: int) -> torch.Tensor:
            words = _fused(ops.draw_preimages)(first << 8, (stop - first) << 8, stream)
            at = words[words < numel]
            return self.source(model, name)[at].float() - self._base(name)[at].float()

        table = self._kept[(model, name, kind)] = ops.KeptNorms(stats, bits, key, kind, members)
        return table

    def _norm(self, model: str, name: str, kind: str) -> torch.Tensor:
        key = (model, name, kind)
        if key not in self._norms:
            self._norms[key] = _fused(ops.task_vector_norms)(self._base(name), [self.source(model, name)], kind)[0]
        return self._norms[key]

    def _rank_norm(self, model: str, name: str) -> torch.Tensor:
        """DELLA's per-row magnitude ranks of one source's task vector (exact: one sort per
        row), kept while they fit ``cache_bytes``, else computed again at the next use."""
        key = (model, name)
        if key in self._ranks:
            return self._ranks[key]
        ranks = ops.row_rank_norm(self.task_vector(model, name)).reshape(-1)
        held = sum(r.numel() * r.element_size() for r in self._ranks.values())
        if held + ranks.numel() * ranks.element_size() <= self.cache_bytes:
            self._ranks[key] = ranks
        return ranks

    def _fetch(self, name: str, copier: "torch.cuda.Stream") -> tuple[list[torch.Tensor], "torch.cuda.Event"]:
        """Start copying one tensor's base and sources to the device on ``copier``."""
        with torch.cuda.stream(copier):
            tensors = [t.to(self.device, non_blocking=True) for t in [self.base[name], *self.sources[name]]]
            event = torch.cuda.Event()
            event.record(copier)
        return tensors, event

    def _arrived(self, tensors: list[torch.Tensor], event: "torch.cuda.Event") -> list[torch.Tensor]:
        """The fetched tensors, once their copy is done, owned by the merging stream."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            t.record_stream(current)
        return tensors

    def _fetch_now(self, name: str) -> None:
        """Streaming, outside ``materialize``: one tensor's sources onto the device now."""
        if self.stream and name not in self._window:
            self._window = {name: self._arrived(*self._fetch(name, torch.cuda.Stream(self.device)))}

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
        names = list(self.base)
        copier = torch.cuda.Stream(self.device) if self.stream else None
        pending = self._fetch(names[0], copier) if copier else None
        try:
            for i, name in enumerate(names):
                if copier:  # this tensor's copy done; the next one's starts while it merges
                    self._window = {name: self._arrived(*pending)}
                    pending = self._fetch(names[i + 1], copier) if i + 1 < len(names) else None
                target = targets[name]
                if target.is_floating_point() and target.device == self.device:
                    finite.append((name, self.merge_into(recipe, name, target)))
                else:  # another device (the live model on the GPU, the sources merged on the host)
                    merged = torch.empty(self.shapes[name], dtype=target.dtype if target.is_floating_point()
                                         else self.base[name].dtype, device=self.device)
                    finite.append((name, self.merge_into(recipe, name, merged)))
                    target.copy_(merged)
        finally:
            self._window = {}
            self._scratch = {}
        if finite and not bool(torch.stack([f for _, f in finite]).all()):
            name = next(n for n, f in finite if not bool(f))
            raise NonFiniteMerge(f"merged tensor {name!r} is not finite (inf or nan) in "
                                 f"{targets[name].dtype}: the recipe's coefficients overflow it")
        return into


_WRITERS: dict[Callable, Callable] = {}


def _writer(kernel: Callable) -> Callable:
    """``write(out, *args)``: ``kernel(*args)`` cast to ``out``'s dtype and written into it, with
    the flag "all finite in that dtype", compiled as one pass (the merged values never reach
    memory in fp32, and the check reads nothing again)."""
    if kernel not in _WRITERS:
        def write(out: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            merged = kernel(*args, **kwargs).reshape(-1)
            out.copy_(merged.to(out.dtype))
            # on the fp32 values: the compiler drops a cast back from out's dtype, so isfinite of
            # the cast would miss an fp16 overflow; NaN fails the compare too
            return (merged.abs() < overflow_bound(out.dtype)).all()

        write.__name__ = f"write_{kernel.__name__}"
        _WRITERS[kernel] = write
    return _fused(_WRITERS[kernel])


def overflow_bound(dtype: torch.dtype) -> float:
    """The least fp32 magnitude that rounds to inf in ``dtype`` (round to nearest even): 65520
    for fp16, inf for fp32 and wider."""
    info = torch.finfo(dtype)
    if info.bits >= 32:
        return math.inf
    mantissa = round(-math.log2(info.eps))
    return (2 - 2.0 ** -(mantissa + 1)) * 2.0 ** math.floor(math.log2(info.max))


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


_CHUNK = 1 << 24  # elements per pass when a table is built: bounded transients (64 MB per buffer)


def _chunks(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, _CHUNK):
        yield start, min(start + _CHUNK, numel)


_FILLERS: dict[Callable, Callable] = {}


def _into(kernel: Callable) -> Callable:
    """``fill(outs, *args)``: the tensor(s) ``kernel(*args)`` returns written into ``outs``
    (preallocated buffers) by one compiled pass."""
    if kernel not in _FILLERS:
        def fill(outs: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
            results = kernel(*args, **kwargs)
            for out, result in zip(outs, results if isinstance(results, tuple) else (results,), strict=True):
                out.copy_(result)

        fill.__name__ = f"fill_{kernel.__name__}"
        _FILLERS[kernel] = fill
    return _fused(_FILLERS[kernel])


_SORTED_UP_TO = 1 << 13  # tensors this small (norms, biases) keep a sorted |delta| (<= 32 KB)


def _resident(tensor: torch.Tensor, device: torch.device, pinned: bool = False) -> torch.Tensor:
    """One tensor flat on ``device`` in its own dtype: on the CPU the pool's view itself
    (``pinned``: a copy in page-locked memory, for asynchronous copies to the GPU)."""
    flat = tensor.reshape(-1).to(device)
    return flat.pin_memory() if pinned else flat


def _default_device(pool: ModelPool, headroom: float = 0.8) -> torch.device:
    """CUDA when present and the sources (in their own dtype) fit in most of its free memory;
    the CPU otherwise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    resident = sum(t.numel() * t.element_size() for m in [pool.base, *pool.sources.values()]
                   for t in m.tensors.values())
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
