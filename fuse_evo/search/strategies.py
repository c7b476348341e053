"""Strategies: one small ask/tell interface over Nevergrad, Optuna, random and grid search.

The only module that imports nevergrad, and optuna's one home besides ``mirror.py`` (the dashboard view). A strategy proposes genomes inside the
space's bounds (``ask``) and learns losses to minimize (``tell``). A strategy keeps no state
that its history lacks: ``replay(asks, tells)`` brings a fresh, seeded strategy to where a
run stopped from the archived asks and tells alone (the search's resume path), including the
candidates asked but not yet told, which the search re-dispatches. ``state_dict`` /
``load_state_dict`` (a pickle where the backend allows one) are a cache that saves replay
time, never the truth.
"""

from __future__ import annotations

import math
import pickle
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import nevergrad as ng
import numpy as np
import optuna
from nevergrad.optimization.base import Optimizer as NgOptimizer
from nevergrad.optimization.optimizerlib import NGOptBase
from nevergrad.optimization.recaster import RecastOptimizer
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from ..errors import ConfigError, FuseEvoError
from ..recipe import DATAFLOW
from ..config import StrategyConfig
from .space import SearchSpace, SpaceError

_STATE_FORMAT = 1


class StrategyError(FuseEvoError):
    """A tell or a checkpoint the strategy cannot accept (the message says which)."""


@dataclass(frozen=True, eq=False)
class Proposal:
    """One proposed genome; ``id`` is unique within the strategy (0, 1, ... in the order asked)."""

    id: int
    genome: np.ndarray


class Strategy(ABC):
    """ask() -> Proposal; tell(candidate, losses | failed); state_dict() / load_state_dict().

    Losses are minimized, one per objective. A failed candidate (an exception, NaN or
    infinite losses) is told as a failure in the backend's own way and never stops the run.
    """

    backend: str

    def __init__(self, config: StrategyConfig, space: SearchSpace):
        self.config = config
        self.space = space
        self.name = f"{self.backend}/{config.optimizer}" if config.optimizer else self.backend
        self.multi_objective = config.num_objectives > 1
        self.budget = config.budget
        self.population_size = config.population_size
        self.n_asked = 0
        self.n_told = 0
        self.max_in_flight: int | None = None  # candidates asked and not told at once (None: any number)
        self._next_id = 0
        self._pending: dict[int, tuple[Proposal, Any]] = {}  # id -> (candidate, backend handle)

    # ------------------------------------------------------------------ the interface
    def ask(self) -> Proposal:
        cid, genome, handle = self._ask()
        # backends' bound handling may land a rounding error outside: the space refuses that
        genome = np.clip(np.asarray(genome, dtype=np.float64), self.space.lower, self.space.upper)
        candidate = Proposal(cid, genome)
        self._pending[cid] = (candidate, handle)
        self.n_asked += 1
        return candidate

    def tell(self, candidate: Proposal, values: Sequence[float] | None = None, failed: bool = False) -> None:
        """Report a candidate's losses (to minimize), or that it failed. Non-finite losses
        count as a failure."""
        if candidate.id not in self._pending:
            raise StrategyError(f"tell: candidate {candidate.id} was not asked or was already told")
        losses = None
        if not failed:
            if values is None:
                raise StrategyError(f"tell: candidate {candidate.id} has no losses and is not marked failed")
            losses = [float(v) for v in values]
            if len(losses) != self.config.num_objectives:
                raise StrategyError(f"tell: candidate {candidate.id} has {len(losses)} losses, the strategy "
                                    f"minimizes {self.config.num_objectives} objective(s)")
            if not all(math.isfinite(v) for v in losses):
                losses = None
        _, handle = self._pending.pop(candidate.id)
        self._tell(handle, losses)
        self.n_told += 1

    def replay(self, asks: Sequence[tuple[int, Sequence[float], int]],
               tells: Sequence[tuple[int, Sequence[float] | None]]) -> int:
        """Bring this fresh strategy to where a run stopped, from its history alone.

        ``asks``: (candidate id, genome, tells made before it) in the order asked; ``tells``:
        (candidate id, losses or None for a failure) in the order told. The asks are asked
        again and the tells told again, interleaved as they were; seeded backends then propose
        exactly the archived genomes. Where one proposes another genome (a backend that is
        not deterministic, or a history written by another version), the archived genome is
        adopted in its place, so the strategy still learns every archived result and continues
        from the archive correctly, if not identically. Candidates asked and not told stay
        pending, under their archived ids. Returns how many asks diverged."""
        self._reset()
        told = 0
        diverged = 0

        def tell_up_to(n: int) -> None:
            nonlocal told
            while told < min(n, len(tells)):
                cid, losses = tells[told]
                if cid not in self._pending:
                    raise StrategyError(f"replay: tell {told} is of candidate {cid}, which was never asked")
                candidate = self._pending[cid][0]
                self.tell(candidate, losses, failed=losses is None)
                told += 1

        for cid, genome, after in asks:
            tell_up_to(after)
            expected = np.asarray(genome, dtype=np.float64)
            candidate = self.ask()
            _, handle = self._pending.pop(candidate.id)
            if candidate.genome.shape != expected.shape or not np.allclose(candidate.genome, expected,
                                                                          rtol=1e-9, atol=1e-12):
                diverged += 1
                handle = self._adopt(handle, expected)
                candidate = Proposal(cid, expected)
            self._pending[cid] = (Proposal(cid, candidate.genome), handle)
            self._next_id = max(self._next_id, cid + 1)
        tell_up_to(len(tells))
        if told < len(tells):
            raise StrategyError(f"replay: {len(tells) - told} tells of candidates never asked")
        return diverged

    def _reset(self) -> None:
        """Forget everything told (a strategy about to replay its history); built fresh, most
        backends have nothing to forget."""

    def _adopt(self, handle: Any, genome: np.ndarray) -> Any:
        """A handle that tells the backend ``genome``'s result, for an ask whose replay
        proposed another genome (``handle``'s). Default: the handle is the genome itself or
        unused (random, grid, path_es)."""
        return genome if isinstance(handle, np.ndarray) else handle

    def close(self) -> None:
        """Release what the backend holds beyond memory (Nevergrad's optimizer threads)."""

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pending(self) -> list[Proposal]:
        """Candidates asked and not yet told (after a resume: the ones to re-dispatch)."""
        return [c for c, _ in self._pending.values()]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: picklable (backend state as bytes)."""
        return {
            "format": _STATE_FORMAT,
            "strategy": self.name,
            "num_objectives": self.config.num_objectives,
            "seed": self.config.seed,
            "genes": self.space.names,
            "lower": self.space.lower.tolist(),
            "upper": self.space.upper.tolist(),
            "n_asked": self.n_asked,
            "n_told": self.n_told,
            "next_id": self._next_id,
            "pending": [[c.id, c.genome.tolist()] for c, _ in self._pending.values()],
            "backend": self._save({cid: h for cid, (_, h) in self._pending.items()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict; a checkpoint of another strategy or space is refused."""
        if state.get("format") != _STATE_FORMAT:
            raise StrategyError(f"checkpoint: format {state.get('format')!r}, this version reads {_STATE_FORMAT}")
        for key, ours in (("strategy", self.name), ("num_objectives", self.config.num_objectives),
                          ("seed", self.config.seed)):
            if state[key] != ours:
                raise StrategyError(f"checkpoint: written with {key} {state[key]!r}, this run has {ours!r}")
        space = (self.space.names, self.space.lower.tolist(), self.space.upper.tolist())
        if (state["genes"], state["lower"], state["upper"]) != space:
            raise StrategyError(f"checkpoint: written for a space of {len(state['genes'])} genes "
                                f"(or other bounds), this run's space has {self.space.dimension}")
        pending = {}
        for cid, genome in state["pending"]:
            try:
                pending[cid] = Proposal(cid, self.space.validate(genome))
            except SpaceError as e:
                raise StrategyError(f"checkpoint: pending candidate {cid}: {e}") from None
        handles = self._load(state["backend"])
        if set(handles) != set(pending):
            raise StrategyError(f"checkpoint: pending candidates {sorted(pending)} do not match the backend's {sorted(handles)}")
        self._pending = {cid: (pending[cid], handles[cid]) for cid in pending}
        self.n_asked, self.n_told, self._next_id = state["n_asked"], state["n_told"], state["next_id"]

    # ------------------------------------------------------------------ backends
    def _initial(self) -> np.ndarray | None:
        initial = self.config.initial
        if initial is None:
            return None
        if isinstance(initial, str):
            if initial != "uniform":
                raise ConfigError(f"strategy.initial: 'uniform', null or a genome, got {initial!r}")
            return self.space.initial()
        try:
            return self.space.validate(list(initial))
        except SpaceError as e:
            raise ConfigError(f"strategy.initial: {e}") from None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    @abstractmethod
    def _ask(self) -> tuple[int, np.ndarray, Any]:
        """(id, genome, handle the backend needs at tell time)."""

    @abstractmethod
    def _tell(self, handle: Any, losses: list[float] | None) -> None:
        """losses None: the candidate failed."""

    @abstractmethod
    def _save(self, handles: dict[int, Any]) -> Any:
        """The backend's state, with the handles of pending candidates."""

    @abstractmethod
    def _load(self, blob: Any) -> dict[int, Any]:
        """Restore the backend; return the pending candidates' handles."""


# ---------------------------------------------------------------------------- Nevergrad
# optimizers whose population size we can set, as the registry entries of the same name
_NG_POPULATION = {
    "CMA": lambda k: ng.families.ParametrizedCMA(popsize=k),
    "DE": lambda k: ng.families.DifferentialEvolution(popsize=k),
    "TwoPointsDE": lambda k: ng.families.DifferentialEvolution(crossover="twopoints", popsize=k),
}


class NevergradStrategy(Strategy):
    """A Nevergrad optimizer by registry name over one bounded ``ng.p.Array``.

    Failures are told as ``failure_loss`` per objective (Nevergrad has no failure state).
    State: the optimizer pickled (its parametrization holds the random state), except for
    optimizers that run a library's minimize loop in a thread (NGOpt with one worker picks
    scipy's COBYLA, Powell, ...): they cannot be pickled, so their state is the log of asks
    and tells, replayed into a fresh optimizer on load. Such an optimizer evaluates one
    candidate at a time, and its thread is not a daemon: ``close()`` (or ``with``) stops it,
    or an interpreter still holding the strategy at exit waits for it forever.
    """

    backend = "nevergrad"

    def __init__(self, config: StrategyConfig, space: SearchSpace, reference: Sequence[float] | None = None):
        super().__init__(config, space)
        self._reference = None if reference is None or not self.multi_objective else [float(r) for r in reference]
        name = config.optimizer
        if name not in ng.optimizers.registry:
            raise ConfigError(f"strategy.optimizer: nevergrad has no optimizer {name!r}; try CMA, DE, "
                              "TwoPointsDE, NGOpt, PortfolioDiscreteOnePlusOne (or any ng.optimizers.registry name)")
        if config.population_size is None:
            self._family = ng.optimizers.registry[name]
        elif name in _NG_POPULATION:
            self._family = _NG_POPULATION[name](config.population_size)
        else:
            raise ConfigError(f"strategy.population_size: nevergrad's {name} takes none (only "
                              f"{', '.join(_NG_POPULATION)} do); set it to null")
        if getattr(self._family, "no_parallelization", False) and config.num_workers > 1:
            raise ConfigError(f"strategy.num_workers: nevergrad's {name} evaluates one candidate at a time; set "
                              "strategy.num_workers=1 (the other workers then idle) or pick another optimizer")
        self._start = self._initial()
        self.optimizer = self._build()
        chosen = self.optimizer.optim if isinstance(self.optimizer, NGOptBase) else self.optimizer
        self._one_at_a_time = chosen.name if chosen.no_parallelization else None
        self.max_in_flight = 1 if self._one_at_a_time else None
        self._replay = any(isinstance(o, RecastOptimizer) for o in _ng_tree(self.optimizer))
        self._log: list[list] = []  # when replayed: ["ask", genome] and ["tell", id, loss]

    def _build(self) -> NgOptimizer:
        """A fresh optimizer: the same one on every call, given the config."""
        init = self.space.initial() if self._start is None else self._start
        parametrization = ng.p.Array(init=init, lower=self.space.lower, upper=self.space.upper)
        parametrization.random_state = np.random.RandomState(self.config.seed)
        optimizer = self._family(parametrization, budget=self.config.budget, num_workers=self.config.num_workers)
        if self._reference is not None:  # multi-objective: the hypervolume's reference point, before any tell
            optimizer.tell(ng.p.MultiobjectiveReference(), self._reference)
        if self._start is not None:
            optimizer.suggest(self._start)
        return optimizer

    def _ask(self):
        if self._one_at_a_time and self._pending:
            raise StrategyError(f"ask: nevergrad's {self._one_at_a_time} (from {self.name}) evaluates one candidate "
                                f"at a time; tell candidate {next(iter(self._pending))} first, or set "
                                "strategy.num_workers to the candidates in flight (NGOpt then picks another)")
        with _quiet_cma():
            param = self.optimizer.ask()
        cid = self._new_id()
        if self._replay:
            self._log.append(["ask", param.value.tolist()])
        return cid, np.array(param.value), (cid, param)

    def _tell(self, handle, losses):
        cid, param = handle
        loss = [self.config.failure_loss] * self.config.num_objectives if losses is None else losses
        loss = loss if self.multi_objective else loss[0]
        with _quiet_cma():
            self.optimizer.tell(param, loss)
        if self._replay:
            self._log.append(["tell", cid, loss])

    def _adopt(self, handle, genome):
        cid, asked = handle
        if self._one_at_a_time:  # its minimize thread waits for the point it asked: give it the archived loss
            return cid, asked
        return cid, self.optimizer.parametrization.spawn_child(new_value=genome)  # told as not asked

    def _save(self, handles):
        if self._replay:
            return {"log": [list(event) for event in self._log]}
        return pickle.dumps((self.optimizer, handles))

    def _load(self, blob):
        self.close()
        if not self._replay:
            self.optimizer, handles = pickle.loads(blob)
            return handles
        self.optimizer, self._log, params = self._build(), [], {}
        for event in blob["log"]:
            if event[0] == "ask":  # ids count the asks from 0
                param = self.optimizer.ask()
                if not np.allclose(param.value, event[1], rtol=1e-9, atol=1e-12):
                    raise StrategyError(f"checkpoint: replaying nevergrad's {self.name} gave another candidate "
                                        f"{len(params)} than the run it continues")
                params[len(params)] = param
            else:
                self.optimizer.tell(params[event[1]], event[2])
            self._log.append(list(event))
        told = {event[1] for event in self._log if event[0] == "tell"}
        return {cid: (cid, param) for cid, param in params.items() if cid not in told}

    def close(self) -> None:
        for optimizer in _ng_tree(self.optimizer):
            if isinstance(optimizer, RecastOptimizer) and optimizer._messaging_thread is not None:
                optimizer._messaging_thread.stop()


def _ng_tree(optimizer: NgOptimizer, seen: set[int] | None = None) -> Iterator[NgOptimizer]:
    """An optimizer and every optimizer it delegates to (NGOpt's choice is made here)."""
    seen = set() if seen is None else seen
    if id(optimizer) in seen:
        return
    seen.add(id(optimizer))
    yield optimizer
    if isinstance(optimizer, NGOptBase):
        yield from _ng_tree(optimizer.optim, seen)
    for value in vars(optimizer).values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(sub, NgOptimizer):
                yield from _ng_tree(sub, seen)


@contextmanager
def _quiet_cma() -> Iterator[None]:
    """Nevergrad's CMA injects suggested and told-not-asked points into pycma, which then
    warns each generation that they were 'orphanated': harmless, and noise in a long search."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="orphanated injected solution")
        yield


# ---------------------------------------------------------------------------- Optuna
class OptunaStrategy(Strategy):
    """An Optuna sampler (cmaes, tpe, nsga2) driven through ``study.ask(fixed_distributions)``.

    One FloatDistribution per gene, named by the gene. Failures are ``TrialState.FAIL``.
    Samplers are not stored in a study: the state pickles the sampler (its random state and
    settings) and, for in-memory storage, the storage with every trial; with an RDB
    ``storage`` URL the trials stay in the database and the state names the study.
    """

    backend = "optuna"
    SAMPLERS = ("cmaes", "tpe", "nsga2")

    def __init__(self, config: StrategyConfig, space: SearchSpace):
        super().__init__(config, space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our loop logs candidates itself
        self._distributions = {g.name: FloatDistribution(g.low, g.high) for g in space.genes}
        self._url = config.storage
        self._open(fresh=False)

    def _open(self, fresh: bool) -> None:
        """The study: in memory, or in the RDB ``storage`` (there an existing study of the name is
        loaded, or with ``fresh`` deleted first: a replay rebuilds it from the archive)."""
        c = self.config
        if fresh and c.storage and c.study_name:
            try:
                optuna.delete_study(study_name=c.study_name, storage=c.storage)
            except KeyError:  # no such study yet
                pass
        self._memory = None if c.storage else optuna.storages.InMemoryStorage()
        self.study = optuna.create_study(
            storage=c.storage or self._memory, sampler=self._sampler(), study_name=c.study_name,
            directions=["minimize"] * c.num_objectives, load_if_exists=c.storage is not None,
        )
        initial = self._initial()
        if initial is not None and not self.study.trials:  # a resumed RDB study has its first trial
            self.study.enqueue_trial(dict(zip(self.space.names, initial.tolist())))

    def _reset(self):
        if self._url:
            self._open(fresh=True)

    def _sampler(self) -> optuna.samplers.BaseSampler:
        c = self.config
        if c.optimizer not in self.SAMPLERS:
            raise ConfigError(f"strategy.optimizer: optuna samplers are {', '.join(self.SAMPLERS)}; got {c.optimizer!r}")
        if c.optimizer == "cmaes":
            if self.multi_objective:
                raise ConfigError("strategy.optimizer: optuna's cmaes is single-objective; use nsga2 or tpe")
            return optuna.samplers.CmaEsSampler(seed=c.seed, popsize=c.population_size)
        if c.optimizer == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=c.seed, population_size=c.population_size or 50)
        if c.population_size is not None:
            raise ConfigError("strategy.population_size: optuna's tpe has no population; set it to null")
        return optuna.samplers.TPESampler(seed=c.seed)

    def _ask(self):
        trial = self.study.ask(self._distributions)
        return self._new_id(), np.array([trial.params[n] for n in self.space.names]), trial.number

    def _adopt(self, handle, genome):
        self.study.tell(handle, state=TrialState.FAIL)  # samplers model complete trials only
        self.study.enqueue_trial(dict(zip(self.space.names, genome.tolist())))
        return self.study.ask(self._distributions).number

    def _tell(self, handle, losses):
        if losses is None:
            self.study.tell(handle, state=TrialState.FAIL)
        else:
            self.study.tell(handle, losses if self.multi_objective else losses[0])

    def _save(self, handles):
        return pickle.dumps({"storage": self._memory, "study_name": self.study.study_name,
                             "sampler": self.study.sampler, "trials": handles})

    def _load(self, blob):
        state = pickle.loads(blob)
        if (state["storage"] is None) != (self._url is not None):
            raise StrategyError("checkpoint: written with another optuna storage (in-memory vs database)")
        self._memory = state["storage"]
        self.study = optuna.load_study(study_name=state["study_name"], storage=self._url or self._memory,
                                       sampler=state["sampler"])
        return state["trials"]


# ---------------------------------------------------------------------------- random search
class RandomSearch(Strategy):
    """Uniform samples inside the bounds: the honest baseline every strategy must beat."""

    backend = "random"

    def __init__(self, config: StrategyConfig, space: SearchSpace):
        super().__init__(config, space)
        self._rng = np.random.default_rng(config.seed)
        self._first = self._initial()

    def _ask(self):
        if self._first is not None:
            genome, self._first = self._first, None
        else:
            genome = self._rng.uniform(self.space.lower, self.space.upper)
        return self._new_id(), genome, None

    def _tell(self, handle, losses):
        pass  # random search learns nothing

    def _save(self, handles):
        first = None if self._first is None else self._first.tolist()
        return {"rng": self._rng.bit_generator.state, "first": first, "handles": handles}

    def _load(self, blob):
        self._rng.bit_generator.state = blob["rng"]
        self._first = None if blob["first"] is None else np.array(blob["first"])
        return blob["handles"]


# ---------------------------------------------------------------------------- grid search
class GridSearch(Strategy):
    """An even grid over the bounds, ``k`` points per gene with ``k**d >= budget`` (a space of
    one gene: exactly ``budget`` points, ends included), visited in a seeded random order so
    a budget smaller than the grid samples it without bias. For spaces of a few genes: the
    uniform-merge baseline (one global scale, grid-searched at the search's budget). Asks
    past the grid's end go round it again (repeats, which the run scores once).
    """

    backend = "grid"

    def __init__(self, config: StrategyConfig, space: SearchSpace):
        super().__init__(config, space)
        d = space.dimension
        if d > 6:
            raise ConfigError(f"strategy.backend: a grid over {d} genes is too coarse to be useful; "
                              "use it for spaces of a few genes (a global scale), or another strategy")
        k = max(2, math.ceil(round(config.budget ** (1.0 / d), 9)))
        self.points_per_gene = k
        self.size = k**d
        self._order = np.random.default_rng(config.seed).permutation(self.size)
        self._first = self._initial()
        self._position = 0

    def point(self, index: int) -> np.ndarray:
        """The grid point ``index`` (0 .. size-1), genes' indices in row-major order."""
        steps = np.unravel_index(index, (self.points_per_gene,) * self.space.dimension)
        fraction = np.asarray(steps, dtype=np.float64) / (self.points_per_gene - 1)
        return self.space.lower + fraction * (self.space.upper - self.space.lower)

    def _ask(self):
        if self._first is not None:
            genome, self._first = self._first, None
        else:
            genome = self.point(int(self._order[self._position % self.size]))
            self._position += 1
        return self._new_id(), genome, None

    def _tell(self, handle, losses):
        pass  # a grid learns nothing

    def _save(self, handles):
        first = None if self._first is None else self._first.tolist()
        return {"position": self._position, "first": first, "handles": handles}

    def _load(self, blob):
        self._position = int(blob["position"])
        self._first = None if blob["first"] is None else np.array(blob["first"])
        return blob["handles"]


# ---------------------------------------------------------------------------- data-flow paths
class PathEvolution(Strategy):
    """A (1 + lambda) evolution strategy that knows a data-flow genome's structure: a child
    flips each inclusion bit with probability ``flip_rate / slots`` (at least one change), and
    perturbs (log-normal, ``scale_sigma``) only the scale genes of transitions on its own path:
    a scale off the path does nothing, so mutating it would waste the evaluation. The parent
    is the best candidate told so far (steady state: any tell may replace it).
    """

    backend = "path_es"
    FLIP_RATE = 1.5
    SCALE_SIGMA = 0.2

    def __init__(self, config: StrategyConfig, space: SearchSpace):
        super().__init__(config, space)
        if getattr(space, "method", None) != DATAFLOW:
            raise ConfigError("strategy.backend: path_es searches data-flow spaces (space=dfs); this space merges "
                              "parameters")
        self._rng = np.random.default_rng(config.seed)
        first = self._initial()
        self._first = first
        start = space.initial() if first is None else first
        self._parent = self._snap(start)
        self._parent_loss = math.inf

    def _snap(self, genome: np.ndarray) -> np.ndarray:
        """Inclusion genes at 0 or 1 (what they mean), scales as they are."""
        x = np.array(genome, dtype=np.float64)
        n = self.space.num_slots
        x[:n] = (x[:n] > 0.5).astype(np.float64)
        return x

    def _child(self) -> np.ndarray:
        x, n = self._parent.copy(), self.space.num_slots
        flips = self._rng.random(n) < self.FLIP_RATE / n
        x[:n] = np.where(flips, 1.0 - x[:n], x[:n])
        scales = self.space.used_scales(x)
        moved = [j for j in scales if self._rng.random() < 0.5]
        for j in moved:
            x[j] *= math.exp(self._rng.normal(0.0, self.SCALE_SIGMA))
        if not flips.any() and not moved:  # always change something
            if scales:
                j = scales[self._rng.integers(len(scales))]
                x[j] *= math.exp(self._rng.normal(0.0, self.SCALE_SIGMA))
            else:
                k = self._rng.integers(n)
                x[k] = 1.0 - x[k]
        return np.clip(x, self.space.lower, self.space.upper)

    def _ask(self):
        if self._first is not None:
            genome, self._first = self._first, None
        else:
            genome = self._child()
        return self._new_id(), genome, genome

    def _tell(self, handle, losses):
        if losses is not None and losses[0] < self._parent_loss:  # single objective (checked at build)
            self._parent, self._parent_loss = self._snap(handle), losses[0]

    def _save(self, handles):
        first = None if self._first is None else self._first.tolist()
        return {"rng": self._rng.bit_generator.state, "first": first, "parent": self._parent.tolist(),
                "parent_loss": self._parent_loss, "handles": {k: v.tolist() for k, v in handles.items()}}

    def _load(self, blob):
        self._rng.bit_generator.state = blob["rng"]
        self._first = None if blob["first"] is None else np.array(blob["first"])
        self._parent, self._parent_loss = np.array(blob["parent"]), float(blob["parent_loss"])
        return {int(k): np.array(v) for k, v in blob["handles"].items()}


# ---------------------------------------------------------------------------- factory
BACKENDS: dict[str, type[Strategy]] = {"nevergrad": NevergradStrategy, "optuna": OptunaStrategy,
                                       "random": RandomSearch, "grid": GridSearch, "path_es": PathEvolution}
_DEFAULT_OPTIMIZER = {"nevergrad": "NGOpt", "optuna": "tpe", "random": None, "grid": None, "path_es": None}


def make_strategy(config: StrategyConfig, space: SearchSpace, reference: Sequence[float] | None = None) -> Strategy:
    """The strategy a config names, over ``space``; ConfigError naming the key at fault.
    ``reference``: a multi-objective run's hypervolume reference point (losses), which
    Nevergrad's multi-objective mode measures its front against (the others ignore it).
    ``num_objectives`` null counts as 1 here: a search fills it with its objectives first."""
    if config.backend not in BACKENDS:
        raise ConfigError(f"strategy.backend: {config.backend!r} is not one of {', '.join(BACKENDS)}")
    if config.backend in ("random", "grid", "path_es") and config.optimizer is not None:
        raise ConfigError(f"strategy.optimizer: {config.backend} search has none, got {config.optimizer!r}; "
                          "set it to null")
    for key, least in (("budget", 1), ("num_objectives", 1), ("num_workers", 1), ("population_size", 2)):
        value = getattr(config, key)
        if value is not None and value < least:
            raise ConfigError(f"strategy.{key}: must be at least {least}, got {value}")
    if config.num_workers is None:
        config = replace(config, num_workers=1)
    if config.num_objectives is None:
        config = replace(config, num_objectives=1)
    if config.backend == "path_es" and config.num_objectives != 1:
        raise ConfigError("strategy.num_objectives: path_es is single-objective (the weighted sum); use nsga2")
    if config.optimizer is None and _DEFAULT_OPTIMIZER[config.backend]:
        config = replace(config, optimizer=_DEFAULT_OPTIMIZER[config.backend])
    if config.backend == "nevergrad":
        return NevergradStrategy(config, space, reference=reference)
    return BACKENDS[config.backend](config, space)
