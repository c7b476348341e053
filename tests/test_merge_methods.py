"""Merge operators on constructed tensors: closed-form expectations, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fuse_evo.merge.methods import (
    BUCKETS,
    MagnitudeHistogram,
    MagnitudeTable,
    bucket_members,
    magnitude_counts,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    combine_task_vectors,
    magnitude_threshold,
    model_stock,
    row_rank_norm,
    slerp,
    sparsify_della,
    sparsify_magnitude,
    sparsify_outliers,
    sparsify_random,
    task_arithmetic,
    task_vector,
    ties,
)

T = torch.tensor


def test_task_arithmetic_adds_scaled_task_vectors():
    base = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 4.0, 0.0])
    out = task_arithmetic(base, [a, b], [1.0, 0.5], lambda_=0.5)
    expected = base + 0.5 * (1.0 * (a - base) + 0.5 * (b - base))
    assert torch.allclose(out, expected)
    assert torch.equal(task_arithmetic(base, [a, b], [0.0, 0.0]), base)


def test_task_arithmetic_normalize_divides_by_weight_sum():
    base = torch.zeros(4)
    a, b = torch.ones(4), 3 * torch.ones(4)
    assert torch.allclose(task_arithmetic(base, [a, b], [1.0, 1.0], normalize=True), 2 * torch.ones(4))


def test_operators_accumulate_in_fp32_and_keep_the_dtype():
    base = torch.full((8,), 1.0, dtype=torch.bfloat16)
    tiny = base + torch.tensor(2.0**-7, dtype=torch.bfloat16)  # one bf16 ulp above 1
    out = task_arithmetic(base, [tiny] * 4, [0.25] * 4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, tiny)


def test_linear_average_and_errors():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([2.0, 4.0])
    assert torch.allclose(linear([a, b], [1.0, 1.0]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(linear([a, b], [1.0, 1.0], normalize=False), torch.tensor([2.0, 6.0]))
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        linear([a, b], [1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        linear([a, b], [1.0, -1.0])


# ----------------------------------------------------------------------------- TIES

BASE5 = T([1.0, 1.0, 1.0, 1.0, 1.0])
DA = T([3.0, -0.2, 2.0, -1.0, 0.1])  # top-3 |.|: 3, 2, 1 -> [3, 0, 2, -1, 0]
DB = T([-1.0, 0.5, -4.0, 0.3, -2.0])  # top-3 |.|: 4, 2, 1 -> [-1, 0, -4, 0, -2]


def test_ties_trims_elects_sign_by_weighted_sum_and_takes_disjoint_mean():
    # weighted trimmed deltas: a = [3, 0, 2, -1, 0], 0.5*b = [-0.5, 0, -2, 0, -1]
    # sum = [2.5, 0, 0, -1, -1] -> elected sign + + + - -   (a zero sum elects +)
    # kept: i0 a | i1 none | i2 a (b disagrees) | i3 a | i4 b (weight 0.5)
    out = ties(BASE5, [BASE5 + DA, BASE5 + DB], [1.0, 0.5], 0.6)
    assert torch.allclose(out, BASE5 + T([3.0, 0.0, 2.0, -1.0, -1.0 / 0.5]))
    raw = ties(BASE5, [BASE5 + DA, BASE5 + DB], [1.0, 0.5], 0.6, normalize=False, lambda_=0.5)
    assert torch.allclose(raw, BASE5 + 0.5 * T([3.0, 0.0, 2.0, -1.0, -1.0]))


def test_ties_sum_and_count_consensus_differ_as_defined():
    base = torch.zeros(1)
    srcs = [T([3.0]), T([-1.0]), T([-1.0])]
    assert torch.allclose(ties(base, srcs, 1.0), T([3.0]))  # sum 1 > 0: keep +3 alone
    assert torch.allclose(ties(base, srcs, 1.0, consensus="count"), T([-1.0]))  # 2 of 3 negative


def test_ties_density_one_is_sign_consensus_only():
    base = torch.zeros(2)
    out = ties(base, [T([2.0, -1.0]), T([4.0, 3.0])], [1.0, 1.0])
    assert torch.allclose(out, T([3.0, 3.0]))  # i0 mean(2, 4); i1 sum 2 > 0 keeps 3 only


def test_magnitude_sparsifier_keeps_top_k_and_rescales():
    d = T([0.5, -4.0, 1.0, 3.0, -2.0])
    assert torch.equal(sparsify_magnitude(d, 0.4), T([0.0, -4.0, 0.0, 3.0, 0.0]))
    l1 = sparsify_magnitude(d, 0.4, rescale=True)  # l1 10.5 / kept 7
    assert torch.allclose(l1, T([0.0, -4.0, 0.0, 3.0, 0.0]) * 10.5 / 7)
    assert torch.equal(sparsify_magnitude(d, 0.01), T([0.0, -4.0, 0.0, 0.0, 0.0]))  # at least one kept
    assert torch.equal(sparsify_magnitude(d, 1.0), d)


# ----------------------------------------------------------------------------- magnitude tables


def _random_delta(n=1000, seed=3):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_magnitude_table_threshold_matches_kthvalue():
    d = _random_delta()
    table = MagnitudeTable(d)
    for density in (0.001, 0.1, 0.33, 0.5, 0.999, 1.0):
        k = max(1, int(density * d.numel()))
        assert magnitude_threshold(table, density) == torch.topk(d.abs(), k).values[-1]


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 0.9])
def test_table_and_fallback_paths_are_identical(density):
    d = _random_delta().reshape(25, 40)
    table = MagnitudeTable(d)
    fast = sparsify_magnitude(d, density, rescale=True, table=table)
    assert torch.equal(fast, sparsify_magnitude(d, density, rescale=True))
    assert int((fast != 0).sum()) == int(density * d.numel())
    for gamma in (0.0, 0.01, 0.2, 0.9):
        fast_bc = sparsify_outliers(d, density, gamma, table=table)
        assert torch.equal(fast_bc, sparsify_outliers(d, density, gamma))
    base = torch.zeros(25, 40)
    srcs = [base + d, base - 0.5 * d.flip(0)]
    tables = [MagnitudeTable(task_vector(base, s)) for s in srcs]
    assert torch.equal(ties(base, srcs, [1.0, 2.0], density, tables=tables), ties(base, srcs, [1.0, 2.0], density))
    assert torch.equal(
        breadcrumbs_ties(base, srcs, [1.0, 2.0], density, 0.05, tables=tables),
        breadcrumbs_ties(base, srcs, [1.0, 2.0], density, 0.05),
    )


def test_coarse_table_keeps_about_the_right_count():
    d = _random_delta(10_000)
    table = MagnitudeTable(d, resolution=100)  # 101 stored values instead of 10000
    for density in (0.05, 0.33, 0.8):
        kept = int((sparsify_magnitude(d, density, table=table) != 0).sum())
        assert abs(kept - density * d.numel()) <= d.numel() / 200 + 1


def test_table_for_another_tensor_is_rejected():
    with pytest.raises(ValueError, match="table built for 10 entries"):
        sparsify_magnitude(torch.ones(5), 0.5, table=MagnitudeTable(torch.ones(10)))


# ----------------------------------------------------------------------------- DARE


def test_dare_keeps_expected_fraction_and_rescales_by_inverse_density():
    base = torch.zeros(20_000)
    out = dare_linear(base, [base + 2.0], 1.0, 0.3, seed=7, rescale="keep_prob")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.015
    assert torch.allclose(out[kept], torch.full_like(out[kept], 2.0 / 0.3))


def test_dare_default_l1_rescale_preserves_the_task_vector_norm():
    base = torch.zeros(1000)
    d = _random_delta()
    out = dare_linear(base, [d], 1.0, 0.25, seed=1)
    assert torch.allclose(out.abs().sum(), d.abs().sum(), rtol=1e-5)
    assert torch.equal(out != 0, sparsify_random(d, 0.25, seed=1) != 0)


def test_dare_is_seeded_and_never_touches_the_global_rng():
    base, d = torch.zeros(1000), _random_delta()
    state = torch.get_rng_state()
    srcs = [d, -d.flip(0)]
    a = dare_ties(base, srcs, [1.0, 1.0], 0.5, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, dare_ties(base, srcs, [1.0, 1.0], 0.5, seed=11))
    assert torch.equal(a, dare_ties(base, srcs, [1.0, 1.0], 0.5, seed=11, rescale=True))
    assert not torch.equal(a, dare_ties(base, srcs, [1.0, 1.0], 0.5, seed=12))


def test_dare_masks_are_nested_across_densities_for_one_seed():
    d = _random_delta()
    low, high = sparsify_random(d, 0.2, seed=5) != 0, sparsify_random(d, 0.6, seed=5) != 0
    assert bool((low & ~high).sum() == 0) and low.sum() < high.sum()


def test_dare_ties_elects_among_surviving_entries():
    base = torch.zeros(4000)
    a, b = base + 1.0, base - 2.0  # each kept w.p. 0.5 and rescaled by 2 -> 2 and -4
    out = dare_ties(base, [a, b], [1.0, 1.0], 0.5, seed=3, rescale="keep_prob")
    # both kept: sum -2 elects -, so -4; only a: 2; only b: -4; neither: 0
    assert set(out.unique().tolist()) == {-4.0, 0.0, 2.0}
    assert abs((out == 2.0).float().mean().item() - 0.25) < 0.03


# ----------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_drops_largest_gamma_fraction_and_the_smallest():
    d = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # k = 5 kept, n_top = 1: |10| dropped as outlier, then 1..4 dropped as small
    assert torch.equal(sparsify_outliers(d, 0.5, 0.1), T([0, 0, 0, 0, 5.0, -6.0, 7.0, -8.0, 9.0, 0]))
    # gamma too large for density: outlier cut shrinks to n - k = 5, keeping 1..5
    assert torch.equal(sparsify_outliers(d, 0.5, 0.7), T([1.0, -2.0, 3.0, -4.0, 5.0, 0, 0, 0, 0, 0]))
    # gamma * n < 1: no outlier dropped (mergekit's git HEAD before 0.1.5 kept nothing here)
    assert torch.equal(sparsify_outliers(d, 0.3, 0.01), T([0, 0, 0, 0, 0, 0, 0, -8.0, 9.0, -10.0]))
    base = torch.full((10,), 0.5)
    out = breadcrumbs(base, [base + d, base + 2 * d], [1.0, 0.5], 0.5, 0.1)
    assert torch.allclose(out, base + 2 * sparsify_outliers(d, 0.5, 0.1))


def test_breadcrumbs_ties_uses_sign_election():
    base = torch.zeros(3)
    a, b = T([1.0, 2.0, 9.0]), T([-3.0, 1.0, 9.0])  # density 2/3, gamma 1/3 drops each |9|
    out = breadcrumbs_ties(base, [a, b], [1.0, 1.0], 2 / 3, 1 / 3)
    # a -> [1, 2, 0], b -> [-3, 1, 0]; sums [-2, 3, 0] elect - + +; no normalize
    assert torch.allclose(out, T([-3.0, 3.0, 0.0]))


# ----------------------------------------------------------------------------- DELLA


def test_della_drops_low_magnitude_entries_more_often():
    d = torch.arange(1.0, 1001.0)  # one row, rank = position
    kept = sparsify_della(d, 0.5, 0.4, seed=2) != 0  # p from 0.1 (smallest) to 0.9 (largest)
    assert kept[:200].float().mean() < 0.3 and kept[-200:].float().mean() > 0.7
    assert abs(kept.float().mean().item() - 0.5) < 0.05


def test_della_keep_prob_rescale_is_per_entry_and_rank_norm_precompute_matches():
    d = torch.arange(1.0, 11.0).flip(0)  # magnitude ranks 9..0
    out = sparsify_della(d, 0.5, 0.25, seed=4, rescale="keep_prob")
    p = 0.25 + torch.arange(9.0, -1.0, -1.0) / 9 * 0.5  # 0.25 for the smallest .. 0.75 for the largest
    kept = out != 0
    assert torch.allclose(out[kept], (d / p)[kept])
    assert torch.equal(row_rank_norm(d), torch.arange(9.0, -1.0, -1.0) / 9)
    two_rows = torch.stack([d, -d.flip(0)])
    assert torch.equal(row_rank_norm(two_rows)[1], torch.arange(10.0) / 9)  # ranked within each row
    base = torch.zeros(10)
    assert torch.equal(
        della(base, [d], 1.0, 0.5, 0.25, seed=9, rank_norms=[row_rank_norm(d)]),
        della(base, [d], 1.0, 0.5, 0.25, seed=9),
    )


def test_della_is_seeded_and_defaults_follow_mergekit():
    base, d = torch.zeros(1000), _random_delta()
    a = della(base, [d, 0.5 * d], [1.0, 1.0], 0.4, seed=1)
    assert torch.equal(a, della(base, [d, 0.5 * d], [1.0, 1.0], 0.4, seed=1))
    assert not torch.equal(a, della(base, [d, 0.5 * d], [1.0, 1.0], 0.4, seed=2))
    # della_linear = no sign election, no normalize; with one source both reduce to w * sparsified delta
    lin = della_linear(base, [d], 2.0, 0.4, seed=1)
    assert torch.allclose(lin, 2.0 * sparsify_della(d, 0.4, 0.15, seed=1, rescale=True))
    assert torch.allclose(della(base, [d], 2.0, 0.4, seed=1), lin / 2.0)  # normalize divides by w


# ----------------------------------------------------------------------------- SLERP


def test_slerp_endpoints_midpoint_and_colinear_fallback():
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    assert torch.allclose(slerp([e1, e2], 0.0), e1) and torch.allclose(slerp([e1, e2], 1.0), e2, atol=1e-7)
    h = math.sqrt(0.5)
    assert torch.allclose(slerp([e1, e2], 0.5), T([h, h]))
    assert torch.allclose(slerp([2 * e1, 2 * e2], 0.5), T([2 * h, 2 * h]))  # norms carried, not renormalized
    sixty = T([0.5, math.sqrt(3) / 2])
    assert torch.allclose(slerp([e1, sixty], 0.5), T([math.sqrt(3) / 2, 0.5]))  # 30 degrees
    a, b = T([1.0, 2.0]), T([2.0, 4.0])
    assert torch.allclose(slerp([a, b], 0.25), 0.75 * a + 0.25 * b)  # colinear -> lerp


# ----------------------------------------------------------------------------- Model Stock


def test_model_stock_t_from_the_angle_between_offsets():
    base = T([1.0, -1.0, 0.5])
    w1 = base + T([2.0, 0.0, 0.0])
    w2 = base + 3 * T([0.5, math.sqrt(3) / 2, 0.0])  # 60 degrees from w1's offset: cos = 1/2
    t = 2 * 0.5 / (1 + 0.5)  # N cos / (1 + (N-1) cos) = 2/3
    assert torch.allclose(model_stock(base, [w1, w2]), t * (w1 + w2) / 2 + (1 - t) * base)


def test_model_stock_three_models_average_pairwise_cosines():
    base = torch.zeros(3)
    ws = [T([1.0, 0.0, 0.0]), T([0.0, 2.0, 0.0]), T([1.0, 1.0, 0.0])]
    c = (0.0 + 2 * math.sqrt(0.5)) / 3
    t = 3 * c / (1 + 2 * c)
    assert torch.allclose(model_stock(base, ws), t * sum(ws) / 3)


def test_model_stock_filter_wise_and_singular_denominator():
    base = torch.zeros(2, 2)
    w1 = T([[1.0, 0.0], [1.0, 0.0]])
    w2 = T([[0.5, math.sqrt(3) / 2], [0.0, 1.0]])  # row 0: cos 1/2 -> t 2/3; row 1: cos 0 -> t 0
    out = model_stock(base, [w1, w2], filter_wise=True)
    assert torch.allclose(out, T([[2 / 3], [0.0]]) * (w1 + w2) / 2)
    assert torch.equal(model_stock(base, [w1, -w1]), base)  # cos -1: 1 + cos = 0 -> keep base


# ----------------------------------------------------------------------------- dtypes and errors

_B = torch.randn(64, generator=torch.Generator().manual_seed(0))
_S = [_B + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
OPERATORS = {
    "linear": lambda b, s: linear(s, [0.3, 0.7]),
    "task_arithmetic": lambda b, s: task_arithmetic(b, s, [0.3, 0.7]),
    "ties": lambda b, s: ties(b, s, [0.3, 0.7], 0.5),
    "dare_ties": lambda b, s: dare_ties(b, s, [0.3, 0.7], 0.5, seed=1),
    "dare_linear": lambda b, s: dare_linear(b, s, [0.3, 0.7], 0.5, seed=1),
    "breadcrumbs": lambda b, s: breadcrumbs(b, s, [0.3, 0.7], 0.5, 0.1),
    "breadcrumbs_ties": lambda b, s: breadcrumbs_ties(b, s, [0.3, 0.7], 0.5, 0.1),
    "della": lambda b, s: della(b, s, [0.3, 0.7], 0.5, seed=1),
    "della_linear": lambda b, s: della_linear(b, s, [0.3, 0.7], 0.5, seed=1),
    "slerp": lambda b, s: slerp(s, 0.3),
    "model_stock": lambda b, s: model_stock(b, s),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_bf16_in_bf16_out_computed_in_fp32(name):
    op = OPERATORS[name]
    b16, s16 = _B.bfloat16(), [s.bfloat16() for s in _S]
    out = op(b16, s16)
    assert out.dtype == torch.bfloat16
    # the bf16 call equals the fp32 computation on the same values, rounded once
    assert torch.equal(out, op(b16.float(), [s.float() for s in s16]).bfloat16())


@pytest.mark.parametrize("name", sorted(set(OPERATORS) - {"linear", "slerp", "model_stock"}))
def test_resident_task_vectors_give_the_same_merge(name):
    b16, s16 = _B.bfloat16(), [s.bfloat16() for s in _S]
    fn = globals()[name]
    kw = {} if name == "task_arithmetic" else {"densities": 0.5}
    kw.update({"seed": 1} if name.startswith(("dare", "della")) else {})
    deltas = [task_vector(b16, s) for s in s16]
    assert torch.equal(fn(b16, s16, [0.3, 0.7], **kw), fn(b16, deltas, [0.3, 0.7], deltas_given=True, **kw))


def test_combine_task_vectors_is_linear_and_task_arithmetic_in_one_pass():
    w = torch.tensor([0.3, 0.9])
    for normalize in (True, False):
        expected = linear(_S, [0.3, 0.9], normalize=normalize)
        coeff, beta = (w / w.sum(), 1.0) if normalize else (w, float(w.sum()))
        assert torch.allclose(combine_task_vectors(_B, _S, coeff, beta), expected, atol=1e-6)
    ta = task_arithmetic(_B, _S, [0.3, 0.9], lambda_=0.5)
    assert torch.allclose(combine_task_vectors(_B, _S, 0.5 * w), ta, atol=1e-6)
    # sources in their own dtype, mixed: fp32 inside, the output cast once
    b16, s16 = _B.bfloat16(), [_S[0].bfloat16(), _S[1].half()]
    merged = combine_task_vectors(b16, s16, 0.5 * w)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, b16.float() + 0.5 * (0.3 * (s16[0].float() - b16.float())
                                                            + 0.9 * (s16[1].float() - b16.float())),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="do not agree"):
        combine_task_vectors(_B, _S, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitude_histogram_gives_the_exact_order_statistics(dtype):
    """Every rank's |delta| equals the sorted one, for deltas of bf16/fp16 weights (pure
    buckets) and of fp32 weights (the boundary bucket refined from the tensor)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20000, generator=g).to(dtype)
    source = (base.float() + 0.02 * torch.randn(20000, generator=g)).to(dtype)
    source[:300] = base[:300]  # zero deltas, tied
    reads = []

    def members(bucket):
        reads.append(bucket)
        return bucket_members(base, source, bucket)

    counts = torch.bincount(magnitude_counts(base, source), minlength=2 * BUCKETS)
    table = MagnitudeHistogram(counts, members, keep=400)
    desc = torch.sort((source.float() - base.float()).abs(), descending=True).values
    ranks = [0, 1, 2, 17, 999, 5000, 10000, 19699, 19700, 19999]
    assert [table.at_rank(r) for r in ranks] == [float(desc[r]) for r in ranks]
    nonempty = int((counts.view(-1, 2).sum(1) > 0).sum())
    cached = sum(v.numel() for v in table._cached.values())
    assert table.numel == 20000 and table.nbytes == 16 * nonempty + 8 + 4 * cached  # nonempty buckets only
    if dtype == torch.float32:
        assert reads  # fp32 deltas fill buckets with distinct values: refined
        before = len(reads)
        table.at_rank(5000)
        assert len(reads) == before  # a refined bucket is kept for the next lookup
        assert sum(v.numel() for v in table._cached.values()) <= 400
    with pytest.raises(ValueError, match="rank 20000 outside"):
        table.at_rank(20000)


def test_invalid_inputs_raise_clear_value_errors():
    b, s = torch.zeros(4), [torch.ones(4), torch.ones(4)]
    with pytest.raises(ValueError, match="2 tensors but 3 weight"):
        ties(b, s, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="2 tensors but 1 density"):
        ties(b, s, 1.0, [0.5])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            dare_linear(b, s, 1.0, bad)
    with pytest.raises(ValueError, match="exactly 2 tensors, got 3"):
        slerp([b, b, b], 0.5)
    with pytest.raises(ValueError, match="at least 2 fine-tuned"):
        model_stock(b, [s[0]])
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic(b, [torch.ones(5)], [1.0])
    with pytest.raises(ValueError, match="consensus"):
        ties(b, s, 1.0, consensus="mean")
    with pytest.raises(ValueError, match="rescale"):
        dare_ties(b, s, 1.0, 0.5, rescale="l3")
    with pytest.raises(ValueError, match="gamma"):
        breadcrumbs(b, s, 1.0, 0.5, 1.5)
    with pytest.raises(ValueError, match="epsilon"):
        della(b, s, 1.0, 0.9, 0.15)  # 0.9 + 0.15 >= 1
    with pytest.raises(ValueError, match="sum to zero"):
        dare_linear(b, s, [1.0, -1.0], normalize=True)


def test_random_draws_are_uniform_independent_per_source_and_the_same_in_int64():
    from fuse_evo.merge.methods import hash_uniform, random_key

    index = torch.arange(200_000, dtype=torch.int32)
    keys = [torch.tensor(random_key(7, source), dtype=torch.int32) for source in (0, 1)]
    u0, u1 = (hash_uniform(index, k) for k in keys)
    assert 0.0 <= float(u0.min()) and float(u0.max()) < 1.0
    assert abs(float(u0.mean()) - 0.5) < 0.005
    assert abs(float((u0 < 0.1).float().mean()) - 0.1) < 0.005  # the keep rate DARE relies on
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.01  # sources independent
    assert abs(float(torch.corrcoef(torch.stack([u0[:-1], u0[1:]]))[0, 1])) < 0.01  # neighbours too
    # the int64 path (tensors of 2**31+ elements) draws the same values where both apply
    assert torch.equal(hash_uniform(index.long(), keys[0]), u0)
    assert random_key(7, 0) != random_key(8, 0) and random_key(7, 0) != random_key(7, 1)


def test_integer_cutoffs_and_the_inverted_hash_give_the_draws_exactly():
    """``hash_bits < random_cutoff(p)`` is the mask ``hash_uniform < p`` (densities at and
    between representable draws, 0, 1 and beyond), and :func:`draw_indices` finds exactly the
    elements whose draws fall in a range, by inverting the hash."""
    from fuse_evo.merge.methods import draw_indices, hash_bits, hash_uniform, random_cutoff, random_key

    numel = 300_007
    index = torch.arange(numel, dtype=torch.int32)
    key = random_key(11, 2)
    bits, u = hash_bits(index, torch.tensor(key, dtype=torch.int32)), hash_uniform(index, torch.tensor(key, dtype=torch.int32))
    for p in (0.0, 1e-9, 0.1, 0.5, 12345 / 2**24, 0.3333, 0.999999, 1.0, 1.5, -0.2):
        assert torch.equal(bits < random_cutoff(p), u < p), p
    for first, stop in ((0, 1000), (70_000, 70_913), (2**24 - 300, 2**24)):
        expected = ((bits >= first) & (bits < stop)).nonzero().flatten()
        assert torch.equal(torch.sort(draw_indices(first, stop, key, numel)).values, expected)


@pytest.mark.parametrize("kind", ["l1", "l2", "linf"])
def test_kept_norms_equal_the_masked_norm_for_any_density(kind):
    """The table of per-draw-bucket sums plus the inverted boundary bucket gives the norm of
    the masked task vector, as a full pass computes it in fp64, for densities in and at the
    edges of buckets."""
    from fuse_evo.merge.methods import KeptNorms, draw_buckets, draw_indices, hash_bits, random_cutoff, random_key

    torch.manual_seed(0)
    numel, bits, key = 400_003, 12, random_key(5, 1)
    base = torch.randn(numel).bfloat16()
    source = (base.float() + 0.01 * torch.randn(numel)).bfloat16()
    delta = source.float() - base.float()
    bucket, value = draw_buckets(base, source, torch.tensor(key, dtype=torch.int32), 0, 24 - bits, kind)
    if kind == "linf":
        stats = torch.zeros(1 << bits).scatter_reduce_(0, bucket.long(), value, "amax")
    else:
        stats = torch.zeros(1 << bits, dtype=torch.float64).index_add_(0, bucket, value.double())
    table = KeptNorms(stats, bits, key, kind, lambda first, stop: delta[draw_indices(first, stop, key, numel)])
    draws = hash_bits(torch.arange(numel, dtype=torch.int32), torch.tensor(key, dtype=torch.int32))
    for p in (0.0, 0.1, 0.25, 0.5, 0.3141, 0.9, 1.0):
        masked = torch.where(draws < random_cutoff(p), delta, 0.0).double()
        expected = {"l1": masked.abs().sum(), "l2": masked.norm(), "linf": masked.abs().max()}[kind].item()
        assert table.norm(random_cutoff(p)) == pytest.approx(expected, rel=1e-6, abs=1e-30), p
    assert table.nbytes == 4 * ((1 << bits) + 1)
    assert KeptNorms.bits_for(1000, 2) is None  # small tensors: a masked pass is cheaper
    assert KeptNorms.bits_for(5632 * 2048, 2) == 16  # a 1.1B MLP matrix: 256 KB, 1% of it


def test_dare_sources_draw_different_masks_from_one_seed():
    d = _random_delta()
    a = sparsify_random(d, 0.5, seed=3, source=0) != 0
    b = sparsify_random(d, 0.5, seed=3, source=1) != 0
    assert 0.4 < float((a == b).float().mean()) < 0.6  # independent halves agree about half the time
