"""Pareto bookkeeping on constructed points: dominance and ties, the front, hypervolume against
hand-computed values (and Optuna's independent implementation on random fronts), its history,
a spread of K members, and the archive's view (failures excluded, a duplicate counted once,
the reference point and where it comes from)."""

from __future__ import annotations

import numpy as np
import pytest

from fuse_evo.search import pareto
from fuse_evo.search.archive import Archive, ArchiveError, Trial, default_url


def test_dominance_and_ties():
    assert pareto.dominates([1, 2], [2, 2]) and not pareto.dominates([2, 2], [1, 2])
    assert not pareto.dominates([1, 2], [1, 2])  # equal points: neither dominates
    assert not pareto.dominates([1, 3], [2, 2]) and not pareto.dominates([2, 2], [1, 3])
    points = [[1, 3], [2, 2], [2, 2], [3, 1], [3, 3], [2, 3]]
    assert pareto.front_indices(points) == [0, 1, 2, 3]  # both copies of (2, 2) stay
    assert pareto.front_indices([[5.0]]) == [0] and pareto.front_indices([[2.0], [1.0], [1.0]]) == [1, 2]


def test_to_losses_follows_each_direction():
    assert pareto.to_losses({"acc": 0.8, "params": 5.0}, {"acc": "max", "params": "min"}) == [-0.8, 5.0]


def test_hypervolume_by_hand():
    # a staircase: 3 + 2 + 1
    assert pareto.hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    # a dominated point and a copy change nothing; a point beyond the reference adds nothing
    assert pareto.hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2], [5, 0]], [4, 4]) == pytest.approx(6.0)
    assert pareto.hypervolume([[4, 1]], [4, 4]) == 0.0  # on the reference's edge: no volume
    assert pareto.hypervolume([], [1, 1]) == 0.0
    # 3 objectives: one box 1 x 2 x 3; two boxes 4 + 2 overlapping in a unit cube
    assert pareto.hypervolume([[1, 1, 1]], [2, 3, 4]) == pytest.approx(6.0)
    assert pareto.hypervolume([[0, 0, 1], [1, 1, 0]], [2, 2, 2]) == pytest.approx(5.0)
    # 1 objective: the distance to the reference
    assert pareto.hypervolume([[0.25], [0.5]], [1.0]) == pytest.approx(0.75)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_hypervolume_matches_optuna_on_random_fronts(dims):
    from optuna._hypervolume import compute_hypervolume  # an independent implementation (WFG)

    rng = np.random.default_rng(dims)
    for _ in range(5):
        points = rng.random((30, dims))
        ref = np.full(dims, 1.1)
        front = points[pareto.front_indices(points)]
        assert pareto.hypervolume(points, ref) == pytest.approx(compute_hypervolume(front, ref), rel=1e-9)


def test_history_is_the_hypervolume_of_each_prefix():
    rng = np.random.default_rng(0)
    points = [list(p) for p in rng.random((25, 2))]
    points[3] = points[7] = None  # failures add nothing
    ref = [1.0, 1.0]
    history = pareto.hypervolume_history(points, ref)
    assert len(history) == len(points)
    for n in range(1, len(points) + 1):
        assert history[n - 1] == pytest.approx(pareto.hypervolume([p for p in points[:n] if p is not None], ref))
    assert all(b >= a for a, b in zip(history, history[1:]))


def test_spread_takes_the_extremes_first_and_spreads_the_rest():
    front = [[i / 10, 1 - i / 10] for i in range(11)]
    chosen = pareto.spread(front, 3)
    assert set(chosen[:2]) == {0, 10} and chosen[2] == 5
    assert sorted(pareto.spread(front, 50)) == list(range(11))
    assert len(set(pareto.spread(front, 6))) == 6


def _archive(tmp_path, objectives) -> Archive:
    archive = Archive(default_url(tmp_path), "r", create=True)
    archive.start_run("t", "{}", {"objectives": objectives})
    return archive


def _record(archive: Archive, values: dict | None, status: str = "complete", duplicate_of=None, key=None) -> Trial:
    n = archive.count()
    ok = status != "failed" and values is not None
    return archive.record(Trial(
        number=-1, candidate_id=n, status=status, genome=[0.0], recipe={"method": "linear"},
        recipe_key=key or f"k{n}", objectives=values or {}, scalar=sum(values.values()) if ok else None,
        duplicate_of=duplicate_of, error=None if ok else "boom"))


def test_archive_front_excludes_failures_and_counts_duplicates_once(tmp_path):
    archive = _archive(tmp_path, [{"name": "a", "direction": "max", "metric": "t/acc", "weight": 1.0},
                                  {"name": "b", "direction": "max", "metric": "u/acc", "weight": 1.0}])
    _record(archive, {"a": 0.9, "b": 0.1})          # 0: front
    _record(archive, {"a": 0.5, "b": 0.5})          # 1: front
    _record(archive, None, status="failed")         # 2: never counts
    _record(archive, {"a": 0.5, "b": 0.5}, status="duplicate", duplicate_of=1, key="k1")  # 3: counted once
    _record(archive, {"a": 0.4, "b": 0.4})          # 4: dominated by 1
    _record(archive, {"a": 0.1, "b": 0.8})          # 5: front
    assert [t.number for t in archive.pareto_front()] == [0, 1, 5]
    point, source = archive.reference_point()
    assert point == {"a": 0.0, "b": 0.0} and source == {"a": "default", "b": "default"}
    history = archive.hypervolume_history()
    by_hand = [0.09, 0.09 + 0.4 * 0.5, None, None, None, 0.09 + 0.4 * 0.5 + 0.1 * 0.3]
    assert len(history) == 6
    for got, want in zip(history, by_hand):
        if want is not None:
            assert got == pytest.approx(want)
    assert history[2] == history[3] == history[4] == history[1]
    with pytest.raises(ArchiveError, match="reference point covers"):
        archive.hypervolume_history({"a": 0.0})
    archive.close()


def test_reference_point_stated_or_worst_seen(tmp_path):
    archive = _archive(tmp_path, [{"name": "acc", "direction": "max", "metric": "t/acc", "weight": 1.0,
                                   "reference": 0.2},
                                  {"name": "params", "direction": "min", "cost": "params", "metric": None,
                                   "weight": 0.0}])
    assert archive.reference_point() == ({"acc": 0.2}, {"acc": "stated"})  # nothing seen yet
    _record(archive, {"acc": 0.5, "params": 100.0})
    _record(archive, {"acc": 0.7, "params": 300.0})
    point, source = archive.reference_point()
    assert point == {"acc": 0.2, "params": 300.0} and source == {"acc": "stated", "params": "worst seen"}
    # the worst-seen point itself spans nothing in params: only trial 0 counts, (0.5-0.2) x (300-100)
    assert archive.hypervolume_history()[-1] == pytest.approx(0.3 * 200.0)
    archive.close()
