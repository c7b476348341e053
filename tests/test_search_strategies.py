"""Strategies: every backend improves on its initial point, survives failures, and continues
identically after a state round trip; bad configs, tells and checkpoints are refused."""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace

import numpy as np
import pytest

from fuse_evo.errors import ConfigError
from fuse_evo.config import GeneConfig, GranularityConfig, SpaceConfig, StrategyConfig
from fuse_evo.search import SearchSpace, StrategyError, make_strategy

BACKENDS = [
    ("nevergrad", "CMA"), ("nevergrad", "DE"), ("nevergrad", "TwoPointsDE"), ("nevergrad", "NGOpt"),
    ("nevergrad", "PortfolioDiscreteOnePlusOne"), ("optuna", "cmaes"), ("optuna", "tpe"), ("optuna", "nsga2"),
    ("random", None), ("grid", None),
]
POPULATION = {"CMA": 6, "DE": 6, "TwoPointsDE": 6, "cmaes": 6, "nsga2": 8}
TARGET = np.linspace(0.15, 0.85, 6)


def loss(x: np.ndarray) -> float:
    """A shifted sphere; the initial point (a uniform merge, all 1/3) is far from its minimum."""
    return float(((x - TARGET) ** 2).sum())


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    """Six genes: a weight per model (3) for the embed/norm/head group and for layer 0."""
    return SearchSpace(SpaceConfig(
        method="task_arithmetic", models=["a", "b", "c"], num_layers=1, genes={"weight": GeneConfig(0.0, 1.0)},
        granularity=GranularityConfig(embed_norm_head="shared"),
    ))


def config(backend: str, optimizer: str | None, **kw) -> StrategyConfig:
    return StrategyConfig(**{"backend": backend, "optimizer": optimizer, "population_size": POPULATION.get(optimizer),
                             "budget": 40, "seed": 3, **kw})


def step(strategy, failed: bool = False) -> np.ndarray:
    candidate = strategy.ask()
    assert np.all(candidate.genome >= 0.0) and np.all(candidate.genome <= 1.0)
    strategy.tell(candidate, failed=failed) if failed else strategy.tell(candidate, [loss(candidate.genome)])
    return candidate.genome


@pytest.mark.parametrize("backend, optimizer", [b for b in BACKENDS if b[0] != "grid"])  # 6 genes: a 2^6 grid
def test_improves_on_the_initial_point_despite_failures(space, backend, optimizer):
    with make_strategy(config(backend, optimizer), space) as strategy:
        assert not strategy.multi_objective and strategy.budget == 40
        first = strategy.ask()
        np.testing.assert_array_equal(first.genome, space.initial())  # the uniform merge is asked first
        strategy.tell(first, [loss(first.genome)])
        best = np.inf
        for i in range(1, strategy.budget):
            candidate = strategy.ask()
            if i % 7 == 0:
                strategy.tell(candidate, failed=True)  # a crash in the worker
            elif i % 11 == 0:
                strategy.tell(candidate, [float("nan")])  # a NaN score counts as a failure
            else:
                best = min(best, loss(candidate.genome))
                strategy.tell(candidate, [loss(candidate.genome)])
        assert strategy.n_told == strategy.budget and not strategy.pending()
        assert best < loss(space.initial())


class History:
    """What the archive records of a run: every ask (id, genome, tells before it) and tell."""

    def __init__(self, strategy):
        self.strategy, self.asks, self.tells = strategy, [], []

    def ask(self):
        c = self.strategy.ask()
        self.asks.append((c.id, c.genome.tolist(), len(self.tells)))
        return c

    def tell(self, c, losses=None):
        self.strategy.tell(c, losses, failed=losses is None)
        self.tells.append((c.id, losses))

    def step(self, losses_of, failed=False):
        c = self.ask()
        self.tell(c, None if failed else losses_of(c.genome))
        return c.genome


def restore(history: History, b) -> None:
    """``b`` takes over where ``history``'s strategy is: from its pickled state where the
    backend pickles (the run's cache), else by replaying the history (the archive), exactly."""
    try:
        blob = pickle.dumps(history.strategy.state_dict())
    except TypeError:  # optuna 5.1's NSGAIISampler holds a thread lock
        assert b.replay(history.asks, history.tells) == 0  # no ask diverged
        return
    b.load_state_dict(pickle.loads(blob))


@pytest.mark.parametrize("backend, optimizer", BACKENDS)
def test_state_round_trip_continues_identically(space, backend, optimizer):
    cfg = config(backend, optimizer)
    with make_strategy(cfg, space) as a, make_strategy(cfg, space) as b:
        history = History(a)
        for i in range(9):
            history.step(lambda g: [loss(g)], failed=i == 4)
        in_flight = history.ask()
        restore(history, b)
        assert [c.id for c in b.pending()] == [in_flight.id]
        np.testing.assert_array_equal(b.pending()[0].genome, in_flight.genome)
        a.tell(in_flight, [loss(in_flight.genome)])
        b.tell(b.pending()[0], [loss(in_flight.genome)])
        for _ in range(8):
            np.testing.assert_array_equal(step(a), step(b))
        assert (a.n_asked, a.n_told) == (b.n_asked, b.n_told) == (18, 18)


@pytest.mark.parametrize("backend, optimizer", [("nevergrad", "DE"), ("optuna", "nsga2"), ("optuna", "tpe")])
def test_multi_objective(space, backend, optimizer):
    with make_strategy(config(backend, optimizer, num_objectives=2), space) as strategy:
        assert strategy.multi_objective
        for i in range(12):
            c = strategy.ask()
            if i == 5:
                strategy.tell(c, failed=True)
            else:
                strategy.tell(c, [loss(c.genome), float(c.genome.sum())])
        with pytest.raises(StrategyError, match="has 1 losses, the strategy minimizes 2"):
            strategy.tell(strategy.ask(), [1.0])


@pytest.mark.parametrize("backend, optimizer", [("nevergrad", "DE"), ("optuna", "nsga2"), ("optuna", "tpe")])
def test_multi_objective_state_round_trip(space, backend, optimizer):
    """A multi-objective strategy (Nevergrad's with its reference point) continues
    identically from its state."""
    def losses(genome):
        return [loss(genome), float(genome.sum())]

    cfg = config(backend, optimizer, num_objectives=2)
    with make_strategy(cfg, space, reference=[10.0, 10.0]) as a, \
            make_strategy(cfg, space, reference=[10.0, 10.0]) as b:
        history = History(a)
        for _ in range(7):
            history.step(losses)
        restore(history, b)
        for _ in range(6):
            ca, cb = a.ask(), b.ask()
            np.testing.assert_array_equal(ca.genome, cb.genome)
            a.tell(ca, losses(ca.genome))
            b.tell(cb, losses(cb.genome))
        if backend == "nevergrad":
            assert np.allclose(b.optimizer._hypervolume_pareto._upper_bounds, [10.0, 10.0])


def test_optuna_database_storage_resumes(space, tmp_path):
    """With an RDB storage the trials live in the database and the state names the study."""
    cfg = config("optuna", "tpe", storage=f"sqlite:///{tmp_path / 'a.db'}", study_name="search")
    with make_strategy(cfg, space) as a:
        for _ in range(6):
            step(a)
        in_flight = a.ask()
        state = a.state_dict()
        shutil.copy(tmp_path / "a.db", tmp_path / "b.db")  # the database as the crash left it
        b = make_strategy(replace(cfg, storage=f"sqlite:///{tmp_path / 'b.db'}"), space)
        b.load_state_dict(state)
        assert b.study.study_name == "search" and len(b.study.trials) == 7
        a.tell(in_flight, [loss(in_flight.genome)])
        b.tell(b.pending()[0], [loss(in_flight.genome)])
        for _ in range(3):
            np.testing.assert_array_equal(step(a), step(b))
        with pytest.raises(StrategyError, match="in-memory vs database"):
            make_strategy(replace(cfg, storage=None), space).load_state_dict(state)


def test_sequential_nevergrad_optimizers_take_one_candidate_at_a_time(space):
    """NGOpt with one worker runs scipy's COBYLA in a thread: a second ask would wait forever."""
    with make_strategy(config("nevergrad", "NGOpt"), space) as strategy:
        strategy.ask()
        with pytest.raises(StrategyError, match="evaluates one candidate at a time; tell candidate 0 first"):
            strategy.ask()
    with make_strategy(config("nevergrad", "NGOpt", num_workers=2), space) as strategy:
        first, second = strategy.ask(), strategy.ask()  # NGOpt picks a parallel optimizer
        strategy.tell(second, [loss(second.genome)])
        strategy.tell(first, failed=True)


def test_bad_tells_are_refused(space):
    strategy = make_strategy(config("random", None), space)
    c = strategy.ask()
    with pytest.raises(StrategyError, match="no losses and is not marked failed"):
        strategy.tell(c)
    strategy.tell(c, [0.5])
    with pytest.raises(StrategyError, match=f"candidate {c.id} was not asked or was already told"):
        strategy.tell(c, [0.5])


def test_checkpoints_of_another_run_are_refused(space):
    a = make_strategy(config("random", None), space)
    step(a)
    a.ask()
    state = a.state_dict()
    with pytest.raises(StrategyError, match="written with strategy 'random'"):
        make_strategy(config("optuna", "tpe"), space).load_state_dict(state)
    with pytest.raises(StrategyError, match="written with seed 3, this run has 4"):
        make_strategy(config("random", None, seed=4), space).load_state_dict(state)
    other = SearchSpace(replace(space.config, num_layers=2))
    with pytest.raises(StrategyError, match="space of 6 genes"):
        make_strategy(config("random", None), other).load_state_dict(state)
    tampered = {**state, "pending": [[1, [0.5] * 5 + [1.5]]]}
    with pytest.raises(StrategyError, match=r"pending candidate 1: genome: gene layers.0/c/weight = 1.5 is outside"):
        make_strategy(config("random", None), space).load_state_dict(tampered)
    short = {**state, "pending": [[1, [0.5] * 5]]}
    with pytest.raises(StrategyError, match="5 values, the space has 6 genes"):
        make_strategy(config("random", None), space).load_state_dict(short)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(backend="hyperopt"), r"strategy.backend: 'hyperopt' is not one of nevergrad, optuna, random"),
        (dict(optimizer="CMAES"), r"strategy.optimizer: nevergrad has no optimizer 'CMAES'"),
        (dict(optimizer="NGOpt", population_size=8), r"strategy.population_size: nevergrad's NGOpt takes none"),
        (dict(optimizer="Cobyla", num_workers=2), r"strategy.num_workers: nevergrad's Cobyla evaluates one candidate"),
        (dict(backend="optuna", optimizer="gp"), r"strategy.optimizer: optuna samplers are cmaes, tpe, nsga2"),
        (dict(backend="optuna", optimizer="tpe", population_size=8), r"strategy.population_size: optuna's tpe"),
        (dict(backend="optuna", optimizer="cmaes", num_objectives=2), r"strategy.optimizer: optuna's cmaes is single-objective"),
        (dict(backend="random", optimizer="CMA"), r"strategy.optimizer: random search has none"),
        (dict(backend="grid", optimizer="CMA"), r"strategy.optimizer: grid search has none"),
        (dict(budget=0), r"strategy.budget: must be at least 1"),
        (dict(initial="zeros"), r"strategy.initial: 'uniform', null or a genome"),
        (dict(initial=[0.5] * 5), r"strategy.initial: genome: 5 values, the space has 6 genes"),
        (dict(initial=[0.5] * 5 + [2.0]), r"strategy.initial: genome: gene layers.0/c/weight = 2.0 is outside"),
    ],
)
def test_bad_configs_name_the_key(space, change, message):
    with pytest.raises(ConfigError, match=message):
        make_strategy(replace(StrategyConfig(), **change), space)


def test_initial_point_from_config(space):
    genome = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    for backend, optimizer in (("nevergrad", "CMA"), ("optuna", "cmaes"), ("random", None)):
        with make_strategy(config(backend, optimizer, initial=genome), space) as s:
            np.testing.assert_allclose(s.ask().genome, genome)
    # no initial point: the first candidate is the optimizer's own
    with make_strategy(config("random", None, initial=None), space) as s:
        assert not np.allclose(s.ask().genome, space.initial())
    assert make_strategy(StrategyConfig(), space).name == "nevergrad/NGOpt"
    assert make_strategy(StrategyConfig(backend="optuna"), space).name == "optuna/tpe"


def test_grid_covers_an_even_grid_once_in_a_seeded_order():
    one = SearchSpace(SpaceConfig(method="task_arithmetic", models=["a", "b"], num_layers=1,
                                  genes={"lambda": GeneConfig(0.0, 2.0)}, fixed={"weight": 1.0}))
    with make_strategy(StrategyConfig(backend="grid", budget=21, initial=None, seed=1), one) as grid:
        asked = [grid.ask() for _ in range(21)]
        values = sorted(float(c.genome[0]) for c in asked)
        np.testing.assert_allclose(values, np.linspace(0.0, 2.0, 21))  # one gene: budget points, ends included
        assert [float(c.genome[0]) for c in asked] != values  # visited in a shuffled order
        again = make_strategy(StrategyConfig(backend="grid", budget=21, initial=None, seed=1), one)
        assert [float(again.ask().genome[0]) for _ in range(21)] == [float(c.genome[0]) for c in asked]
        assert float(grid.ask().genome[0]) == float(asked[0].genome[0])  # past the end: round again
    two = SearchSpace(SpaceConfig(method="task_arithmetic", models=["a", "b"], num_layers=1,
                                  genes={"weight": GeneConfig(0.0, 1.0, scope="model")}))
    with make_strategy(StrategyConfig(backend="grid", budget=10, initial=None), two) as grid:
        assert grid.points_per_gene == 4 and grid.size == 16  # 4 x 4 >= 10
        points = {tuple(np.round(grid.ask().genome, 6)) for _ in range(16)}
        assert points == {(a, b) for a in np.round(np.linspace(0, 1, 4), 6) for b in np.round(np.linspace(0, 1, 4), 6)}
