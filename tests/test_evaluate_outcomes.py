"""Per-document outcomes: compact storage, pairing by document, the paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuse_evo.errors import FuseEvoError
from fuse_evo.evaluate.outcomes import Difference, aligned, pack, paired_bootstrap, unpack


def _outcomes(values: dict[str, list[float]], docs: list[int] | None = None, task: str = "t") -> dict:
    n = len(next(iter(values.values())))
    return {"docs": {task: docs if docs is not None else list(range(n))}, "values": {task: values}}


def test_outcomes_survive_packing_and_1000_documents_take_little_room():
    rng = np.random.default_rng(0)
    o = _outcomes({"acc,none": rng.integers(0, 2, 1000).astype(float).tolist(),
                   "f1,none": rng.random(1000).round(3).tolist()}, docs=rng.permutation(5000)[:1000].tolist())
    assert unpack(pack(o)) == o
    binary = pack(_outcomes({"acc,none": o["values"]["t"]["acc,none"]}, docs=list(range(1000))))
    assert len(binary) < 300, len(binary)  # 0/1 outcomes of 1000 consecutive documents
    assert unpack(None) is None


def test_aligned_pairs_the_documents_both_scored():
    a = _outcomes({"acc,none": [1.0, 0.0, 1.0, 1.0]}, docs=[7, 3, 5, 9])
    b = _outcomes({"acc,none": [0.0, 1.0, 0.0]}, docs=[5, 7, 3])
    x, y = aligned(a, b, "t", "acc,none")
    assert x.tolist() == [1.0, 0.0, 1.0] and y.tolist() == [1.0, 0.0, 0.0]  # docs 7, 3, 5
    with pytest.raises(FuseEvoError, match="no per-document values of t/exact_match,none in the first"):
        aligned(a, b, "t", "exact_match,none")


def test_the_bootstrap_interval_matches_the_normal_closed_form():
    """For a mean of n i.i.d. paired differences the bootstrap's interval tends to
    mean +- 1.96 sd / sqrt(n): with n = 2000 they agree within a few percent."""
    rng = np.random.default_rng(1)
    n = 2000
    a = (rng.random(n) < 0.62).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # paired: b agrees with a on ~80% of the documents
    per, mean = paired_bootstrap({"x": (a, b)}, iters=4000, seed=0)
    d = a - b
    half = 1.959964 * d.std(ddof=0) / math.sqrt(n)
    assert per["x"].value == pytest.approx(d.mean(), abs=1e-12) and per["x"].n == n
    assert per["x"].low == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert per["x"].high == pytest.approx(d.mean() + half, abs=0.08 * half)
    assert mean == Difference(per["x"].value, per["x"].low, per["x"].high, n)  # one key: the mean is that key


def test_noise_and_a_real_margin_are_told_apart():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.7).astype(float)
    same, _ = paired_bootstrap({"x": (a, a)}, iters=500)
    assert same["x"].within_noise and same["x"].low == same["x"].high == 0.0
    better = a.copy()
    better[a == 0] = 1.0  # right wherever a was wrong: a +0.3 margin on 300 documents
    (per, mean) = paired_bootstrap({"x": (better, a), "y": (a, a)}, iters=500)
    assert not per["x"].within_noise and per["x"].low > 0.2
    assert mean.value == pytest.approx(per["x"].value / 2) and not mean.within_noise
    assert "within noise" in same["x"].text() and "within noise" not in per["x"].text()
    # weights: a run's scalar (a minimized objective counts negatively)
    _, signed = paired_bootstrap({"x": (better, a), "y": (a, a)}, {"x": -2.0, "y": 1.0}, iters=200)
    assert signed.value == pytest.approx(-2.0 * per["x"].value) and signed.high < 0


def test_bad_comparisons_are_refused():
    with pytest.raises(FuseEvoError, match="nothing to compare"):
        paired_bootstrap({})
    with pytest.raises(FuseEvoError, match="x: the two sides must pair the same"):
        paired_bootstrap({"x": ([1.0, 0.0], [1.0])})
    with pytest.raises(FuseEvoError, match="share no document"):
        aligned(_outcomes({"a": [1.0]}, docs=[1]), _outcomes({"a": [1.0]}, docs=[2]), "t", "a")


def test_race_stages_are_nested_seeded_and_cover_every_document():
    from fuse_evo.evaluate.outcomes import race_stages

    stages = race_stages({"a": 40, "b": 3}, [0.125, 0.25, 0.5, 1.0], seed=0)
    assert [{t: len(p) for t, p in s.items()} for s in stages] == [{"a": 5, "b": 1}, {"a": 5}, {"a": 10, "b": 1},
                                                                   {"a": 20, "b": 1}]
    for task, n in (("a", 40), ("b", 3)):
        added = [i for s in stages for i in s.get(task, [])]
        assert sorted(added) == list(range(n))  # each document once, all of them by the last stage
    assert race_stages({"a": 40, "b": 3}, [0.125, 0.25, 0.5, 1.0], seed=0) == stages  # the same for every candidate
    assert race_stages({"a": 40}, [0.125, 0.25, 0.5, 1.0], seed=1)[0]["a"] != stages[0]["a"]
    for bad in ([0.5, 0.25, 1.0], [0.5], [0.0, 1.0]):
        with pytest.raises(FuseEvoError, match="increasing fractions"):
            race_stages({"a": 4}, bad)


def _race(cand, inc, z=2.326):
    """The stage at which a candidate is stopped (None: it reached the full split)."""
    from fuse_evo.evaluate.outcomes import race_stages, race_upper_bound

    n = len(cand)
    seen: list[int] = []
    for k, stage in enumerate(race_stages({"t": n}, [0.125, 0.25, 0.5, 1.0], seed=3)):
        seen += stage["t"]
        if len(seen) == n:
            return None
        _, upper = race_upper_bound({"t": (cand[seen], inc[seen])}, {"t": n}, {"t": 1.0}, z)
        if upper < 0:
            return k
    return None


def test_racing_stops_the_hopeless_at_once_and_never_a_winner_in_a_constructed_case():
    rng = np.random.default_rng(4)
    n = 800
    inc = (rng.random(n) < 0.7).astype(float)
    assert _race(np.zeros(n), inc) == 0  # wrong everywhere the incumbent is right: the first stage stops it
    # a winner that looks worse where racing looks first: 5 documents fewer right in stage 1's 100
    # (and none more), 40 more right elsewhere: +35 of 800 on the full split
    order = np.random.default_rng([3, __import__("zlib").crc32(b"t")]).permutation(n)
    cand = inc.copy()
    first = order[:100]
    cand[first[inc[first] == 1][:5]] = 0.0
    rest = order[100:]
    cand[rest[inc[rest] == 0][:40]] = 1.0
    assert cand.mean() > inc.mean() and cand[first].mean() < inc[first].mean()
    assert _race(cand, inc) is None
    # many random candidates: those better on the full split are (almost) never stopped; most
    # clearly worse ones stop before the full split
    stopped_winners, winners, stopped_losers, losers = 0, 0, 0, 0
    for i in range(300):
        flip = rng.random(n) < rng.uniform(0.05, 0.4)
        cand = np.where(flip, (rng.random(n) < rng.uniform(0.3, 0.9)).astype(float), inc)
        diff = cand.mean() - inc.mean()
        stop = _race(cand, inc)
        if diff > 0:
            winners += 1
            stopped_winners += stop is not None
        elif diff < -0.05:
            losers += 1
            stopped_losers += stop is not None
    assert winners > 20 and losers > 20
    assert stopped_winners <= 0.02 * winners, (stopped_winners, winners)
    assert stopped_losers >= 0.8 * losers, (stopped_losers, losers)
