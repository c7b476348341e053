"""Merge operators: pure functions on tensors, fp32 accumulation, output in the input dtype.

Sparsifiers (``sparsify_*``) take one task vector and return it sparsified in fp32; merges take
the base, the source tensors (or, with ``deltas_given``, their task vectors) and per-source
weights/densities (a float for all, or one per source).

mergekit's definitions (arcee-ai/mergekit 0.1.5 on PyPI: ``merge_methods/generalized_task_arithmetic.py``,
``sparsify.py``, ``slerp.py``, ``model_stock.py``, ``linear.py``, ``registry.py`` for per-method
defaults) are the reference semantics. Deliberate differences, each explained where it happens:

* Everything is computed in fp32 (task vectors, masks, sums) and cast once at the end;
  mergekit mostly works in the base dtype (bf16 task vectors, bf16 sums).
* Randomness comes from an explicit integer ``seed``, never the global RNG: a counter-based
  hash of (seed, source, element index) gives each element its uniform draw (mergekit:
  ``torch.bernoulli`` on the global generator). The draw is a pure function of its index, so a
  fused kernel computes it in registers with no random field in memory, eager and fused paths
  draw the same masks, and a Bernoulli mask is ``uniform < p``: for one seed a lower density
  keeps a subset of what a higher density keeps (smooth search landscape).
* Magnitude top-k is a threshold ``|delta| >= kth largest`` (entries tied with the k-th are all
  kept; mergekit's argsort keeps an arbitrary k of them), so it can come from a precomputed
  :class:`MagnitudeTable` in O(1) instead of a sort per call.
* Bad inputs raise ``ValueError``; mergekit skips/crops mismatched tensors, asserts, or
  silently divides by a replaced zero.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .. import registry

Floats = Union[float, Sequence[float]]
Rescale = Union[bool, str, None]
Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]  # (source index, fp32 delta) -> sparse delta

_RESCALES = (None, False, True, "l1", "l2", "linf", "keep_prob")
_NORM_EPS = 1e-7  # mergekit rescaled_masked_tensor: skip rescaling below this norm


# ----------------------------------------------------------------------------- validation


def _check(tensors: Sequence[torch.Tensor], weights: Sequence[float], what: str) -> None:
    if len(tensors) != len(weights):
        raise ValueError(f"{what}: {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        raise ValueError(f"{what}: nothing to merge")


def _check_shapes(ref: torch.Tensor, tensors: Sequence[torch.Tensor], what: str) -> None:
    """mergekit skips (or crops embeddings of) mismatched models; we refuse, the caller decides."""
    for i, t in enumerate(tensors):
        if t.shape != ref.shape:
            raise ValueError(f"{what}: tensor {i} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")


def _per_source(value: Floats, n: int, name: str, what: str) -> list[float]:
    """Broadcast a scalar per-source parameter, or check a sequence has one value per source."""
    try:
        values = [float(v) for v in value]
    except TypeError:  # a scalar (float, int, 0-d tensor): same value for every source
        return [float(value)] * n
    if len(values) != n:
        raise ValueError(f"{what}: {n} tensors but {len(values)} {name} values")
    return values


def _check_density(density: float, what: str) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{what}: density must be in (0, 1], got {density}")


def check_sparsity(what: str, density: float, gamma: Optional[float] = None, epsilon: Optional[float] = None) -> None:
    """Validate one source's density (and breadcrumbs' gamma, DELLA's epsilon) before merging."""
    _check_density(density, what)
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{what}: gamma must be in [0, 1], got {gamma}")
    if epsilon is not None and density < 1 and (epsilon < 0 or density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"{what}: need epsilon >= 0 and density +/- epsilon in (0, 1), got {density} +/- {epsilon}")


def _check_rescale(rescale: Rescale, what: str) -> None:
    if rescale not in _RESCALES:
        raise ValueError(f"{what}: rescale must be one of {_RESCALES}, got {rescale!r}")


def _keep_count(density: float, numel: int) -> int:
    """``max(1, int(density * numel))`` as mergekit 0.1.5's magnitude (older: assert k > 0):
    tiny biases at low density keep their largest entry instead of vanishing or aborting."""
    return max(1, int(density * numel))


# ----------------------------------------------------------------------------- randomness

_HASH_M1 = 0x7FEB352D  # lowbias32 (C. Wellons' hash-prospector): full avalanche in 2 multiplies
_HASH_M2 = 0x846CA68B - (1 << 32)  # the same constant as a signed int32
_U24 = 2.0**-24


def random_key(seed: int, source: int = 0) -> int:
    """The int32 key of one source's random stream for one seed (a splitmix64 step): the
    sources of one merge draw independent masks from one seed."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(source) + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = (z ^ (z >> 31)) & 0xFFFFFFFF
    return z - (1 << 32) if z >= 1 << 31 else z


def hash_bits(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """24 random bits (int32 in [0, 2**24)), one per (flat element ``index``, stream ``key``).

    int32 arithmetic that wraps on overflow, with logical shifts written as arithmetic shift +
    mask, so eager torch and a compiled kernel compute the same bits. ``index`` may be int64 for
    tensors of 2**31 elements or more: the high half is folded in, and indices below 2**31 give
    the same draws as with int32.

    The hash's first step (xor the key in, then xor-shift) is linear over GF(2), so it is done
    on the index and on the key apart (:func:`_premix`): a kernel drawing several sources' masks
    mixes each element's index once and each key once, and the bits are the same.
    """
    x = _premix(index) ^ _premix(key.to(torch.int32))
    x = x * _HASH_M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _HASH_M2
    x = x ^ ((x >> 16) & 0xFFFF)
    return (x >> 8) & 0xFFFFFF


def _premix(x: torch.Tensor) -> torch.Tensor:
    """The hash's linear first step on int32 ``x`` (int64: its high half folded into the low)."""
    if x.dtype == torch.int64:
        x = ((x ^ (x >> 32)) & 0xFFFFFFFF).to(torch.int32)
    return x ^ ((x >> 16) & 0xFFFF)


def hash_uniform(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1): :func:`hash_bits` / 2**24 (exact in fp32)."""
    return hash_bits(index, key).to(torch.float32) * _U24


def random_cutoff(density: float) -> int:
    """The integer form of ``hash_uniform(...) < density``: ``hash_bits(...) < cutoff``, exactly
    (the fp32 density times 2**24 is exact, and so is its ceiling). Compiled kernels compare
    integers: converting the bits to floats costs more than the hash."""
    p = float(torch.tensor(density, dtype=torch.float32))
    return int(min(max(math.ceil(p * _DRAWS), 0), _DRAWS))


_DRAWS = 1 << 24  # distinct values of hash_bits
_U32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x * m mod 2**32`` for int64 ``x`` in [0, 2**32): two 16-bit halves, no int64 overflow."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _U32


def _inverse32(m: int) -> int:
    return pow(m & _U32, -1, 1 << 32)


def draw_preimages(first_word: int, count: int, key: torch.Tensor) -> torch.Tensor:
    """The flat indices (int64, any below 2**32) whose 32-bit hash in stream ``key`` (an int
    tensor) is ``first_word + i`` for i < count: the hash is a bijection of 32-bit words, and
    this is its inverse (:func:`hash_bits` keeps the word's top 24 bits)."""
    x = torch.arange(count, dtype=torch.int64, device=key.device) + first_word
    x = x ^ (x >> 16)
    x = _mul32(x, _inverse32(_HASH_M2))
    x = x ^ (x >> 15) ^ (x >> 30)
    x = _mul32(x, _inverse32(_HASH_M1))
    return (x ^ (x >> 16)) ^ (key.long() & _U32)


def draw_indices(first: int, stop: int, key: int, numel: int, device=None) -> torch.Tensor:
    """The flat indices below ``numel`` (< 2**31) whose :func:`hash_bits` in stream ``key`` lie
    in [first, stop), found by inverting the hash (no pass over the tensor)."""
    words = draw_preimages(first << 8, (stop - first) << 8, torch.tensor(key, dtype=torch.int64, device=device))
    return words[words < numel]


def draw_buckets(base: torch.Tensor, source: torch.Tensor, key: torch.Tensor, start: int, shift: int,
                 kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk of flat elements from ``start``: each element's draw bucket
    (``hash_bits >> shift``) and its task vector's |delta| (l1, linf) or delta**2 (l2)."""
    delta = source.reshape(-1).float() - base.reshape(-1).float()
    index = torch.arange(delta.numel(), dtype=torch.int32, device=delta.device) + start
    value = delta.square() if kind == "l2" else delta.abs()
    return hash_bits(index, key) >> shift, value


def _bucket_stat(delta: torch.Tensor, kind: str) -> float:
    """What a :class:`KeptNorms` bucket holds of its members: sum |d|, sum d**2 or max |d|."""
    if kind == "linf":
        return float(delta.abs().amax()) if delta.numel() else 0.0
    return float(delta.square().sum() if kind == "l2" else delta.abs().sum())


class KeptNorms:
    """The norm (l1, l2 or linf) of one source's task vector over the elements its random mask
    (stream ``key``) keeps, for any density, without a pass over the tensor: sums (maxima for
    linf) of the elements grouped by the top ``bits`` bits of their draw (``stats``), cumulated,
    plus the boundary bucket's members, which ``members(first, stop)`` returns (the task
    vector's fp32 values at the indices whose draws lie in [first, stop), from
    :func:`draw_indices`; looked up only while a merge reads the tensor). Exact up to fp32
    summation order.
    """

    def __init__(self, stats: torch.Tensor, bits: int, key: int, kind: str,
                 members: Callable[[int, int], torch.Tensor]) -> None:
        self.kind, self.key, self._shift = kind, int(key), 24 - bits
        prefix = torch.cummax(stats, 0).values if kind == "linf" else torch.cumsum(stats.double(), 0)
        self.prefix = torch.cat([prefix.new_zeros(1), prefix]).float()  # prefix[b]: the buckets below b
        self._members = members

    @property
    def nbytes(self) -> int:
        return self.prefix.numel() * self.prefix.element_size()

    def norm(self, cutoff: int) -> float:
        """The norm over the elements with ``hash_bits < cutoff`` (:func:`random_cutoff`)."""
        bucket = cutoff >> self._shift
        full = float(self.prefix[bucket])
        rest = _bucket_stat(self._members(bucket << self._shift, cutoff), self.kind) \
            if cutoff > bucket << self._shift else 0.0
        if self.kind == "linf":
            return max(full, rest)
        return math.sqrt(full + rest) if self.kind == "l2" else full + rest

    @staticmethod
    def bits_for(numel: int, element_size: int, budget: float = 0.02) -> Optional[int]:
        """Bucket bits for a tensor: as many as ``budget`` of its bytes allow (at most 16: 256
        KB), if then a boundary bucket inverts at most numel/32 words; else None (smaller
        tensors: one masked pass over them costs less)."""
        if numel >= 2**31:
            return None
        room = budget * numel * element_size / 4 - 1
        if room < 2:
            return None
        bits = min(16, int(math.log2(room)))
        return bits if (1 << (32 - bits)) <= numel / 32 else None


def _flat_index(numel: int, device: torch.device) -> torch.Tensor:
    dtype = torch.int32 if numel < 2**31 else torch.int64
    return torch.arange(numel, dtype=dtype, device=device)


def uniform_like(delta: torch.Tensor, seed: int, source: int = 0) -> torch.Tensor:
    """The uniform draws of ``delta``'s elements in the stream (seed, source), shaped like it."""
    key = torch.tensor(random_key(seed, source), dtype=torch.int32, device=delta.device)
    return hash_uniform(_flat_index(delta.numel(), delta.device), key).view(delta.shape)


# ----------------------------------------------------------------------------- magnitude tables


def task_vector(base: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """fp32 ``tensor - base``: the delta every task-arithmetic operator (and its table) uses."""
    return tensor.float() - base.float()


class MagnitudeTable:
    """Descending-sorted |delta| of one task vector, built once, so each density's threshold is
    an index lookup instead of a sort/kthvalue per merge call.

    ``resolution=None`` keeps every value (exact, same memory as the delta in fp32);
    ``resolution=R`` keeps R+1 evenly spaced ranks, and lookups use the nearest stored rank
    (kept count off by at most numel/(2R)).
    """

    def __init__(self, delta: torch.Tensor, resolution: Optional[int] = None) -> None:
        mags = delta.detach().float().abs().flatten()
        self.numel = mags.numel()
        if self.numel == 0:
            raise ValueError("MagnitudeTable: empty tensor")
        # |x| >= 0, so IEEE order is the order of the bit patterns: an int32 sort (radix on
        # CPU, ~1.7x faster than the float sort) of the same values
        desc = torch.sort(mags.view(torch.int32), descending=True).values.view(torch.float32)
        if resolution is None or resolution + 1 >= self.numel:
            self._values, self._scale = desc, None
        else:
            if resolution < 1:
                raise ValueError(f"MagnitudeTable: resolution must be >= 1, got {resolution}")
            grid = torch.linspace(0, self.numel - 1, resolution + 1, dtype=torch.float64, device=desc.device)
            grid = grid.round().long()
            self._values, self._scale = desc[grid], resolution / (self.numel - 1)

    @property
    def nbytes(self) -> int:
        return self._values.numel() * self._values.element_size()

    def at_rank(self, rank: int) -> torch.Tensor:
        """|delta| of the entry at 0-based descending ``rank`` (0-d tensor, no device sync)."""
        if self._scale is None:
            return self._values[rank]
        return self._values[round(rank * self._scale)]

    def threshold(self, density: float) -> torch.Tensor:
        """Smallest magnitude kept when keeping the top ``density`` fraction."""
        _check_density(density, "MagnitudeTable.threshold")
        return self.at_rank(_keep_count(density, self.numel) - 1)


BUCKET_SHIFT = 13  # |delta|'s fp32 bits >> 13: sign (0), 8 exponent and 10 mantissa bits
BUCKETS = 1 << (31 - BUCKET_SHIFT)
_LOW_BITS = (1 << BUCKET_SHIFT) - 1


def magnitude_counts(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The int32 index ``2 * bucket + (low bits != 0)`` of every element's |source - base| (fp32
    bits): ``torch.bincount`` of it is a :class:`MagnitudeHistogram`'s one streaming pass."""
    bits = (source.reshape(-1).float() - base.reshape(-1).float()).abs().view(torch.int32)
    return ((bits >> BUCKET_SHIFT) << 1) | ((bits & _LOW_BITS) != 0).to(torch.int32)


def bucket_members(base: torch.Tensor, source: torch.Tensor, bucket: int | torch.Tensor) -> torch.Tensor:
    """The fp32 bits of |source - base| where they lie in ``bucket`` with nonzero low bits, 0
    elsewhere (the refinement pass of :class:`MagnitudeHistogram`)."""
    bits = (source.reshape(-1).float() - base.reshape(-1).float()).abs().view(torch.int32)
    inside = ((bits >> BUCKET_SHIFT) == bucket) & ((bits & _LOW_BITS) != 0)
    return torch.where(inside, bits, 0)


class MagnitudeHistogram:
    """Exact order statistics of one task vector's |delta| in tens of KB, whatever its size.

    |delta| >= 0, so its fp32 bit pattern orders like its value: the high 19 bits name one of
    2**18 buckets (1/1024 relative width), counted in one pass (``counts``: bincount of
    :func:`magnitude_counts`); only the nonempty buckets are kept (16 bytes each: a few
    thousand per tensor, tens of KB). A bucket's "pure" members (zero
    low bits) all equal its lower edge: for deltas of bf16 or fp16 weights, which carry few
    significant bits, nearly every member is pure. Only a rank that falls among a bucket's
    other ("impure") members needs their values: ``members(bucket)`` reads them from the tensor
    again (one pass; the nonzero entries of :func:`bucket_members`) and the table keeps the
    most recent ones, up to ``keep`` values (default 1% of the tensor), for the next lookup.
    """

    def __init__(self, counts: torch.Tensor, members: Callable[[int], torch.Tensor], keep: Optional[int] = None):
        counts = counts.to("cpu", torch.int64).reshape(BUCKETS, 2)
        total = counts.sum(1)
        self.numel = int(total.sum())
        if self.numel == 0:
            raise ValueError("MagnitudeHistogram: empty tensor")
        buckets = torch.nonzero(total).flatten().flip(0)  # nonempty buckets, largest first
        self._buckets = buckets.to(torch.int32)
        # _fewer[i]: elements in the i largest nonempty buckets (non-decreasing, _fewer[0] = 0)
        self._fewer = torch.cat([torch.zeros(1, dtype=torch.int64), total[buckets].cumsum(0)])
        self._impure = counts[buckets, 1].to(torch.int32)
        self._members = members
        self._keep = max(1, self.numel // 100) if keep is None else keep
        self._cached: dict[int, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held: the counts plus the cached members of impure buckets."""
        held = sum(t.numel() * t.element_size() for t in (self._buckets, self._fewer, self._impure))
        return held + sum(v.numel() * 4 for v in self._cached.values())

    def at_rank(self, rank: int) -> float:
        """|delta| of the entry at 0-based descending ``rank``."""
        if not 0 <= rank < self.numel:
            raise ValueError(f"MagnitudeHistogram: rank {rank} outside 0..{self.numel - 1}")
        i = int(torch.searchsorted(self._fewer, rank, right=True)) - 1  # _fewer[i] <= rank < _fewer[i + 1]
        bucket = int(self._buckets[i])
        within = rank - int(self._fewer[i])  # impure members (the larger ones) come first
        if within >= int(self._impure[i]):
            return _bits_to_float(bucket << BUCKET_SHIFT)
        return _bits_to_float(int(self._sorted_members(bucket)[within]))

    def _sorted_members(self, bucket: int) -> torch.Tensor:
        if bucket not in self._cached:
            values = self._members(bucket)
            values = torch.sort(values[values != 0].to("cpu"), descending=True).values
            while self._cached and sum(v.numel() for v in self._cached.values()) + values.numel() > self._keep:
                self._cached.pop(next(iter(self._cached)))  # the oldest first
            self._cached[bucket] = values
        return self._cached[bucket]


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def magnitude_threshold(table: MagnitudeTable, density: float) -> torch.Tensor:
    """Threshold for keeping the top ``density`` fraction of ``table``'s delta (a lookup)."""
    return table.threshold(density)


def _desc_value(mags: torch.Tensor, rank: int, table: Optional[MagnitudeTable]) -> torch.Tensor:
    """Value at descending ``rank`` of |delta|: from the table, else one kthvalue."""
    if table is not None:
        return table.at_rank(rank)
    return torch.kthvalue(mags.flatten(), mags.numel() - rank).values


def _check_table(table: Optional[MagnitudeTable], delta: torch.Tensor, what: str) -> None:
    if table is not None and table.numel != delta.numel():
        raise ValueError(f"{what}: table built for {table.numel} entries, delta has {delta.numel()}")


def row_rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """DELLA's per-row magnitude rank scaled to [0, 1] (0 = smallest); precompute once per delta.

    Rows are along dim 1 as in mergekit (1-D tensors are one row). Ties are ranked by position
    (stable sort; mergekit's argsort order is unspecified). A one-element row gets 0.5, i.e.
    keep probability = density (mergekit divides 0 by 0 there).
    """
    x = delta.detach().float()
    x = x.reshape(1, -1) if x.dim() < 2 else x
    m = x.shape[1]
    order = torch.argsort(x.abs(), dim=1, stable=True)  # one sort; the ranks scattered back
    ranks = torch.empty_like(x).scatter_(1, order, torch.arange(m, dtype=x.dtype, device=x.device).expand_as(x))
    norm = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    return norm.reshape(delta.shape)


# ----------------------------------------------------------------------------- sparsifiers


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: Rescale, keep_prob) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor (True = l1), plus ``keep_prob``: divide by P(keep)."""
    masked = delta * mask
    if rescale in (None, False):
        return masked
    if rescale == "keep_prob":  # DARE/DELLA papers' unbiased 1/p rescale
        return masked / keep_prob
    if rescale in (True, "l1"):
        before, after = delta.abs().sum(), masked.abs().sum()
    elif rescale == "l2":
        before, after = delta.norm(), masked.norm()
    else:
        before, after = delta.abs().max(), masked.abs().max()
    return masked * rescale_factors(before, after)


def sparsify_magnitude(
    delta: torch.Tensor, density: float, rescale: Rescale = None, table: Optional[MagnitudeTable] = None
) -> torch.Tensor:
    """Keep the top ``density`` fraction by |delta| (TIES trim); ``table`` skips the selection."""
    _check_density(density, "sparsify_magnitude")
    _check_rescale(rescale, "sparsify_magnitude")
    _check_table(table, delta, "sparsify_magnitude")
    delta = delta.float()
    if density >= 1:
        return delta
    mags = delta.abs()
    thr = _desc_value(mags, _keep_count(density, delta.numel()) - 1, table)
    return _rescaled(delta, mags >= thr, rescale, density)


def sparsify_outliers(
    delta: torch.Tensor,
    density: float,
    gamma: float = 0.01,
    rescale: Rescale = None,
    table: Optional[MagnitudeTable] = None,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction, then the smallest, keeping ``density``.

    Keeps descending ranks [n_top, n_top + k) with k = int(density*n), n_top = int(gamma*n)
    (cut to n - k when too large), as mergekit 0.1.5 (whose git HEAD before it sliced
    ``[n_bot:-n_top]``, keeping *nothing* when int(gamma*n) == 0). Differences: k is at least 1
    (mergekit keeps nothing when int(density*n) == 0), and entries tied in magnitude with a kept
    boundary rank are kept.
    """
    check_sparsity("sparsify_outliers", density, gamma=gamma)
    _check_rescale(rescale, "sparsify_outliers")
    _check_table(table, delta, "sparsify_outliers")
    delta = delta.float()
    if density >= 1:
        return delta
    mags = delta.abs()
    first, last = outlier_ranks(delta.numel(), density, gamma)
    low, high = _desc_value(mags, last, table), _desc_value(mags, first, table)
    return _rescaled(delta, (mags >= low) & (mags <= high), rescale, density)


def outlier_ranks(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' kept descending ranks [first, last] (both included) for density < 1."""
    k = _keep_count(density, numel)
    first = min(int(gamma * numel), numel - k)
    return first, first + k - 1


def sparsify_random(
    delta: torch.Tensor, density: float, seed: int = 0, rescale: Rescale = None, *, source: int = 0
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (mergekit ``bernoulli``), seeded;
    ``source`` picks the stream (each source of a merge draws its own)."""
    _check_density(density, "sparsify_random")
    _check_rescale(rescale, "sparsify_random")
    delta = delta.float()
    if density >= 1:
        return delta
    return _rescaled(delta, uniform_like(delta, seed, source) < density, rescale, density)


def sparsify_della(
    delta: torch.Tensor,
    density: float,
    epsilon: float = 0.15,
    seed: int = 0,
    rescale: Rescale = None,
    rank_norm: Optional[torch.Tensor] = None,
    *,
    source: int = 0,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with per-row magnitude rank, from
    density - epsilon (smallest) to density + epsilon (largest); ``rank_norm`` from
    :func:`row_rank_norm` skips the per-call sort."""
    check_sparsity("sparsify_della", density, epsilon=epsilon)
    _check_rescale(rescale, "sparsify_della")
    delta = delta.float()
    if density >= 1:
        return delta
    if rank_norm is None:
        rank_norm = row_rank_norm(delta)
    elif rank_norm.shape != delta.shape:
        raise ValueError(f"sparsify_della: rank_norm shape {tuple(rank_norm.shape)} != {tuple(delta.shape)}")
    probs = (density - epsilon) + rank_norm.float() * (2 * epsilon)
    return _rescaled(delta, uniform_like(delta, seed, source) < probs, rescale, probs)


# ----------------------------------------------------------------------------- combiners


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average of whole weights (mergekit ``linear``; ``normalize`` divides by sum w)."""
    _check(tensors, weights, "linear")
    _check_shapes(tensors[0], tensors, "linear")
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        acc.add_(t.float(), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear: weights sum to zero, cannot normalize")
        acc.div_(total)
    return acc.to(tensors[0].dtype)


def combine_task_vectors(
    base: torch.Tensor, sources: Sequence[torch.Tensor], coefficients: torch.Tensor, base_scale: float = 1.0,
) -> torch.Tensor:
    """``base_scale * base + sum_i c_i (source_i - base)``, every linear method (linear,
    task_arithmetic, slerp's two-term form) in one elementwise pass over the sources in their
    own dtype: each task vector exists only in registers, in fp32 (``coefficients``: [N]).
    Returns fp32."""
    if len(sources) != coefficients.shape[0] or any(x.shape != base.shape for x in sources):
        raise ValueError(
            f"combine_task_vectors: base {tuple(base.shape)}, sources {[tuple(x.shape) for x in sources]}, "
            f"coefficients {tuple(coefficients.shape)} do not agree"
        )
    base32 = base.float()
    acc = base32 * base_scale
    for i, source in enumerate(sources):
        acc = acc + coefficients[i] * (source.float() - base32)
    return acc


def _masked_row(
    row: torch.Tensor,
    i: int,
    density: torch.Tensor,
    low: Optional[torch.Tensor],
    high: Optional[torch.Tensor],
    keys: Optional[torch.Tensor],
    epsilon: Optional[torch.Tensor],
    rank_norms: Optional[torch.Tensor],
    cutoffs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ``i``'s sparsified task vector (``row``, flat) in ``gta_fused``, and its keep
    probability p (a scalar, or per element for DELLA). ``cutoffs``: each source's
    :func:`random_cutoff` of its density, the same mask as ``hash_uniform < density`` with
    an integer compare (half the kernel's time on a CPU)."""
    p = density[i]
    masked = row
    if low is not None:
        mags = row.abs()
        if high is not None:  # nested wheres: a bool `&` of two masks compiles to a slower loop
            masked = torch.where(mags <= high[i], row, 0.0)
        masked = torch.where(mags >= low[i], masked, 0.0)
    if keys is not None:
        if epsilon is not None and rank_norms is not None:
            p = (p - epsilon[i]) + rank_norms[i].reshape(-1).float() * (2 * epsilon[i])
        index = _flat_index(row.numel(), row.device)
        if cutoffs is not None and epsilon is None:
            keep = hash_bits(index, keys[i]) < cutoffs[i]
        else:
            keep = hash_uniform(index, keys[i]) < p
        masked = torch.where(keep, row, 0.0)
    return masked, p


def _norm(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return x.abs().sum()
    if kind == "l2":
        return x.square().sum().sqrt()
    return x.abs().amax()


def masked_norm(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    density: torch.Tensor,
    low: Optional[torch.Tensor] = None,
    high: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    epsilon: Optional[torch.Tensor] = None,
    rank_norms: Optional[torch.Tensor] = None,
    kind: str = "l1",
    cutoffs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[N] norms of the task vectors as ``gta_fused`` masks them (its ``after``). Compiled
    apart it is one cheap reduction per source; inside the main kernel it makes the compiler
    write the whole masked set to memory and read it back."""
    base32 = base.reshape(-1).float()
    return torch.stack([
        _norm(_masked_row(x.reshape(-1).float() - base32, i, density, low, high, keys, epsilon, rank_norms,
                          cutoffs)[0], kind)
        for i, x in enumerate(sources)
    ])


def gta_fused(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: torch.Tensor,
    low: Optional[torch.Tensor] = None,
    high: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    epsilon: Optional[torch.Tensor] = None,
    rank_norms: Optional[torch.Tensor] = None,
    norms: Optional[torch.Tensor] = None,
    after: Optional[torch.Tensor] = None,
    rescale: Optional[str] = None,
    consensus: Optional[str] = "sum",
    normalize: bool = True,
    lambda_: float = 1.0,
    cutoffs: Optional[torch.Tensor] = None,
    factors: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Every sparsify-then-combine method (mergekit's GTA family) over the sources in their own
    dtype, written so a compiler makes it one elementwise pass: each task vector
    (source - base, fp32) exists only in registers.

    Per-source [N] vectors: ``weights`` (0 removes a source), ``density``. The mask is either
    magnitude bounds (``low <= |delta|``, and ``<= high`` when given: TIES, breadcrumbs) or
    random (``keys``: each source's stream, keep where :func:`hash_uniform` < p with p = density,
    or with ``epsilon`` and ``rank_norms`` (one per source, :func:`row_rank_norm`) DELLA's
    p = density - epsilon + 2 epsilon rank; ``cutoffs``: the same masks for scalar p as
    integer compares, :func:`random_cutoff`). ``rescale``: None, "l1", "l2", "linf" (``norms``:
    each task vector's norm before masking; ``after``: after masking, from :func:`masked_norm`,
    computed here when not given) or "keep_prob" (divide by p); ``factors``: the l1/l2/linf
    rescale's per-source multipliers already computed (:func:`rescale_factors` of ``norms``
    and ``after``), which a caller that knows ``after`` should pass: a scalar expression in a
    compiled loop is evaluated again for every vector of elements, which made DARE's kernel
    a third slower. ``consensus``: "sum", "count"
    or None (plain weighted sum; ``normalize`` then divides by sum w). fp32 out.

    The sources are unrolled (N is small and fixed per pool): every per-source value is then a
    flat elementwise expression, which the compiler keeps in registers; reductions over an
    [N, numel] dimension instead make it write masked stacks to memory and read them back.
    """
    base32 = base.reshape(-1).float()
    kept = []
    for i, x in enumerate(sources):
        masked, p = _masked_row(x.reshape(-1).float() - base32, i, density, low, high, keys, epsilon, rank_norms,
                                cutoffs)
        scale = weights[i]
        if factors is not None:
            scale = scale * factors[i]
        elif rescale == "keep_prob":
            masked = masked / p
        elif rescale is not None and norms is not None:
            a = _norm(masked, rescale) if after is None else after[i]
            scale = scale * rescale_factors(norms[i], a)
        kept.append(masked * scale)
    if consensus is None:
        merged = sum(kept[1:], kept[0])
        if normalize:
            merged = merged / weights.sum()
    else:
        votes = kept if consensus == "sum" else [torch.sign(k) for k in kept]
        elected = torch.where(sum(votes[1:], votes[0]) >= 0, 1.0, -1.0)
        # agrees: the elected sign, never zero: one multiply and compare (torch.sign is four ops)
        agree = [k * elected > 0 for k in kept]
        merged = sum((torch.where(a, k, 0.0) for a, k in zip(agree[1:], kept[1:])), torch.where(agree[0], kept[0], 0.0))
        if normalize:
            divisor = sum((torch.where(a, weights[i + 1], 0.0) for i, a in enumerate(agree[1:])),
                          torch.where(agree[0], weights[0], 0.0))
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
    return (base32 + lambda_ * merged).view(base.shape)


def rescale_factors(norms: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """mergekit's rescale of a masked task vector: its norm before masking over its norm
    after, or 1 where either is below mergekit's epsilon (elementwise over sources)."""
    tiny = (norms < _NORM_EPS) | (after < _NORM_EPS)
    return torch.where(tiny, 1.0, norms / after)


def task_vector_norms(base: torch.Tensor, sources: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """[N] norms of the task vectors before masking, as ``gta_fused``'s rescale uses them."""
    base32 = base.reshape(-1).float()
    return torch.stack([_norm(x.reshape(-1).float() - base32, kind) for x in sources])


def _gta(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsify: Optional[Sparsifier],
    consensus: Optional[str],
    normalize: bool,
    lambda_: float,
    what: str,
    deltas_given: bool = False,
) -> torch.Tensor:
    """mergekit's GTATask: sparsify each delta, weight it, optional sign election, (disjoint) mean.

    Differences: fp32 throughout (mergekit: base dtype; its int8_mask option only changes the
    mask's dtype, so it has no equivalent here), and without consensus a zero weight sum with
    ``normalize`` raises (mergekit silently divides by 1 when |sum w| < 1e-8).
    ``deltas_given``: ``tensors`` already are task vectors (e.g. resident, from task_vector).
    """
    _check(tensors, weights, what)
    _check_shapes(base, tensors, what)
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"{what}: consensus must be 'sum', 'count' or None, got {consensus!r}")
    base32 = base.float()
    deltas = [t.float() if deltas_given else t.float() - base32 for t in tensors]
    if sparsify:
        deltas = [sparsify(i, d) for i, d in enumerate(deltas)]
    if consensus is None:
        mixed = torch.zeros_like(base32)
        for d, w in zip(deltas, weights):
            mixed.add_(d, alpha=float(w))
        if normalize:
            total = float(sum(weights))
            if total == 0:
                raise ValueError(f"{what}: weights sum to zero, cannot normalize")
            mixed.div_(total)
    else:
        stacked = torch.stack([d * float(w) for d, w in zip(deltas, weights)])
        signs = stacked.sign()
        elect = stacked.sum(0) if consensus == "sum" else signs.sum(0)
        mask = signs == torch.where(elect >= 0, 1.0, -1.0)  # zeros never vote for a sign
        mixed = (stacked * mask).sum(0)
        if normalize:
            w = torch.tensor([float(x) for x in weights], device=base32.device).view(-1, *[1] * base.dim())
            divisor = (w * mask).sum(0)
            mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base32 + lambda_ * mixed).to(base.dtype)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    *,
    deltas_given: bool = False,
) -> torch.Tensor:
    """base + lambda * sum_i w_i (t_i - base) (mergekit ``task_arithmetic``)."""
    return _gta(base, tensors, weights, None, None, normalize, lambda_, "task_arithmetic", deltas_given)


def _tables(tables, n: int, what: str) -> list:
    """Per-source precomputed structures (MagnitudeTable or rank_norm), None = compute."""
    tables = [None] * n if tables is None else list(tables)
    if len(tables) != n:
        raise ValueError(f"{what}: {n} tensors but {len(tables)} precomputed tables")
    return tables


def _densities(densities: Floats, n: int, what: str) -> list[float]:
    dens = _per_source(densities, n, "density", what)
    for d in dens:
        _check_density(d, what)
    return dens


def _magnitude_sparsifier(n: int, densities, gamma, rescale, tables, what: str) -> Sparsifier:
    """TIES trim (gamma None) or breadcrumbs, per source, with optional precomputed tables."""
    dens, tabs = _densities(densities, n, what), _tables(tables, n, what)
    _check_rescale(rescale, what)
    if gamma is None:
        return lambda i, d: sparsify_magnitude(d, dens[i], rescale, tabs[i])
    gam = _per_source(gamma, n, "gamma", what)
    return lambda i, d: sparsify_outliers(d, dens[i], gam[i], rescale, tabs[i])


def _random_sparsifier(n: int, densities, epsilon, seed, rescale, rank_norms, what: str) -> Sparsifier:
    """DARE (epsilon None) or DELLA, per source; source i draws from stream (seed, i)."""
    dens = _densities(densities, n, what)
    _check_rescale(rescale, what)
    if epsilon is None:
        return lambda i, d: sparsify_random(d, dens[i], seed, rescale, source=i)
    eps, ranks = _per_source(epsilon, n, "epsilon", what), _tables(rank_norms, n, what)
    return lambda i, d: sparsify_della(d, dens[i], eps[i], seed, rescale, ranks[i], source=i)


_SUMMARIES = {
    "ties": "TIES: magnitude trim, sign election (sum of weighted deltas, ties -> +), disjoint mean.",
    "breadcrumbs": "Model Breadcrumbs: drop top-gamma outliers and small entries, then task arithmetic.",
    "breadcrumbs_ties": "Breadcrumbs sparsification with TIES sign election.",
    "dare_ties": "DARE random drop + rescale, then TIES sign election (mergekit defaults: no normalize, l1 rescale).",
    "dare_linear": "DARE random drop + rescale, then plain task arithmetic.",
    "della": "DELLA: magnitude-rank-weighted random drop + rescale, sign election, disjoint mean.",
    "della_linear": "DELLA sparsification, then plain task arithmetic.",
}
_OPTIONS = {"normalize", "rescale", "lambda_", "consensus"}


def gta(
    method: str,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Floats,
    densities: Floats = 1.0,
    extra: Optional[Floats] = None,
    *,
    seed: int = 0,
    tables: Optional[Sequence[Optional[MagnitudeTable]]] = None,
    rank_norms: Optional[Sequence[Optional[torch.Tensor]]] = None,
    deltas_given: bool = False,
    **options: Any,
) -> torch.Tensor:
    """Any sparsify-then-combine method of the registry (``registry.SPECS``, family ``gta``),
    one tensor at a time: each source's delta sparsified (``extra``: breadcrumbs' gamma or
    DELLA's epsilon, per source or one for all; ``seed``: the random streams of DARE and
    DELLA; ``tables``/``rank_norms``: precomputed magnitude tables or rank norms), weighted,
    signs elected where the method does, combined. ``options``: ``normalize``, ``rescale``,
    ``lambda_``, ``consensus`` (where the method takes it), defaulting to the method's own."""
    s = registry.spec(method)
    if s.family != "gta":
        raise ValueError(f"gta: {method} is not a sparsify-then-combine method")
    allowed = _OPTIONS if "consensus" in s.global_params else _OPTIONS - {"consensus"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"{method}: unexpected option(s) {sorted(unknown)} (it takes {sorted(allowed)})")
    g = s.resolved({("lambda" if k == "lambda_" else k): v for k, v in options.items()})
    n = len(tensors)
    w = _per_source(weights, n, "weight", method)
    name = _extra_param(s)
    value = registry.PER_MODEL_DEFAULTS[name] if name and extra is None else extra
    if s.sparsify in ("magnitude", "outliers"):
        sp = _magnitude_sparsifier(n, densities, value, g["rescale"], tables, method)
    else:
        sp = _random_sparsifier(n, densities, value, seed, g["rescale"], rank_norms, method)
    return _gta(base, tensors, w, sp, g.get("consensus"), g["normalize"], g["lambda"], method, deltas_given)


def _extra_param(s: registry.MethodSpec) -> str | None:
    """The sparsifier's second per-source parameter (breadcrumbs' gamma, DELLA's epsilon): what
    the method reads after weight and density."""
    return s.per_model[2] if len(s.per_model) > 2 else None


def _operator(method: str) -> Callable[..., torch.Tensor]:
    """``method(base, tensors, weights, densities=1.0, [gamma|epsilon], **options)``: ``gta``
    for one registry method, with its own parameter name for the sparsifier's second value."""
    extra = _extra_param(registry.spec(method))

    def merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Floats, densities: Floats = 1.0,
              *args: Any, **kwargs: Any) -> torch.Tensor:
        if extra is not None and extra in kwargs:
            args = (kwargs.pop(extra), *args)
        return gta(method, base, tensors, weights, densities, *args, **kwargs)

    merge.__name__ = merge.__qualname__ = method
    merge.__doc__ = _SUMMARIES[method]
    return merge


ties = _operator("ties")
breadcrumbs = _operator("breadcrumbs")
breadcrumbs_ties = _operator("breadcrumbs_ties")
dare_ties = _operator("dare_ties")
dare_linear = _operator("dare_linear")
della = _operator("della")
della_linear = _operator("della_linear")


# ----------------------------------------------------------------------------- geometric


def slerp_cosine(v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> float:
    """cos of the angle between two whole flattened tensors (each normalized only if its norm
    exceeds eps, as mergekit), clamped to [-1, 1]. It does not depend on t: cache it."""
    a, b = v0.float(), v1.float()
    n0, n1 = float(a.norm()), float(b.norm())
    dot = float((a * b).sum()) / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    return min(1.0, max(-1.0, dot))


def slerp_weights(cosine: float, t: float, dot_threshold: float = 0.9995) -> tuple[float, float]:
    """(s0, s1) with slerp = s0 * v0 + s1 * v1; nearly colinear tensors fall back to lerp."""
    if abs(cosine) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(
    tensors: Sequence[torch.Tensor], t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from tensors[0] (t=0, mergekit's base) to tensors[1] (t=1).

    As mergekit: the angle comes from the whole flattened tensors (normalized only if
    norm > eps); |cos| > dot_threshold falls back to lerp; the sin weights are applied to the
    *unnormalized* tensors. Angle math here is in float64 on the fp32 dot (mergekit: fp32);
    mergekit passes a lone tensor through, we require exactly two.
    """
    if len(tensors) != 2:
        raise ValueError(f"slerp: needs exactly 2 tensors, got {len(tensors)}")
    _check_shapes(tensors[0], tensors, "slerp")
    s0, s1 = slerp_weights(slerp_cosine(tensors[0], tensors[1], eps), t, dot_threshold)
    return (s0 * tensors[0].float() + s1 * tensors[1].float()).to(tensors[0].dtype)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: pull the fine-tune average toward base by t = N cos / (1 + (N-1) cos).

    cos is the mean pairwise cosine of the offsets (w_i - base) over all pairs (mergekit's choice
    for N > 2), per whole tensor or per last-dim row with ``filter_wise``; pair norms are clamped
    at 1e-6 and cos to [-1, 1]; where 1 + (N-1) cos is within 1e-6 of 0, t = 0 (keep base), as
    mergekit 0.1.5 (older mergekit divided by ~0). Computed in fp32 (mergekit: input dtype).
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock: needs at least 2 fine-tuned tensors besides base, got {len(tensors)}")
    _check_shapes(base, tensors, "model_stock")
    w0 = base.float()
    ws = [t.float() for t in tensors]
    if filter_wise:
        view = (lambda x: x.unsqueeze(0)) if w0.dim() <= 1 else (lambda x: x)
    else:
        view = lambda x: x.reshape(-1)  # noqa: E731
    offsets = [view(w) - view(w0) for w in ws]
    norms = [o.norm(dim=-1) for o in offsets]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    avg = torch.stack([view(w) for w in ws]).mean(0)
    return (t * avg + (1 - t) * view(w0)).reshape(base.shape).to(base.dtype)


__all__ = [
    "MagnitudeTable",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "gta",
    "della_linear",
    "linear",
    "combine_task_vectors",
    "gta_fused",
    "task_vector_norms",
    "rescale_factors",
    "masked_norm",
    "MagnitudeHistogram",
    "magnitude_counts",
    "hash_uniform",
    "hash_bits",
    "random_cutoff",
    "draw_indices",
    "draw_preimages",
    "draw_buckets",
    "KeptNorms",
    "random_key",
    "uniform_like",
    "outlier_ranks",
    "check_sparsity",
    "magnitude_threshold",
    "model_stock",
    "row_rank_norm",
    "slerp",
    "slerp_cosine",
    "slerp_weights",
    "sparsify_della",
    "sparsify_magnitude",
    "sparsify_outliers",
    "sparsify_random",
    "task_arithmetic",
    "task_vector",
]
