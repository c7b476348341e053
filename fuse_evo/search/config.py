"""Structured configs of ``fuse-evo search`` and its groups (Hydra ConfigStore): ``models``,
``space``, ``strategy``, ``evaluator`` (``fuse_evo.config.EvaluatorConfig``), ``run`` and
``cluster``.

The YAMLs under ``search_spaces/`` extend ``space_schema``, so a misspelt key fails when Hydra
composes the config, naming the key. Values that only make sense together (a gene the method
does not read, bounds a method refuses) are checked when the SearchSpace / Strategy is built,
again naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..config import EvaluatorConfig, ZooConfig


@dataclass
class GeneConfig:
    """One searched parameter: its bounds, its starting value and how widely it is shared.

    ``scope``: ``group_model`` (a gene per tensor group and source model), ``group`` (per group,
    shared by the models), ``model`` (per model, for every group) or ``global`` (one gene).
    Left out, it is ``group_model`` for per-model parameters (weight, density, ...), ``group``
    for slerp's ``t`` and ``global`` for ``lambda``. ``init`` left out: the method's natural
    value (weight 1/N: a uniform merge; mergekit's defaults for the others), clipped into
    the bounds.
    """

    low: float = MISSING
    high: float = MISSING
    init: Optional[float] = None
    scope: Optional[str] = None


@dataclass
class GranularityConfig:
    """How finely the layers are cut into tensor groups, each with its own genes."""

    layers_per_block: int = 1  # 1: a group per layer; k: blocks of k consecutive layers
    split_attn_mlp: bool = False  # attention and MLP halves of a block get separate genes
    embed_norm_head: str = "own"  # own: a group each; shared: one "*" group for the three


@dataclass
class DataFlowSpaceConfig:
    """A data-flow space (``space.method: dataflow``): ``models``: whose layers are laid out
    (default: the search's source models; ``base`` and ``merged`` may be named too);
    ``io_model``: whose embedding, final norm and head frame the path (default the first);
    ``repeats``: how often the layer sequence is repeated; ``scale_*``: the transition
    scales' bounds and start; ``max_path_length``: longer paths are refused (null: no limit);
    ``merged_from``: a finished parameter-space run directory whose best recipe becomes the
    model ``merged`` (the hybrid search: parameter space first, then data flow);
    ``merge_stage``: instead, an experiment run first as this search's first stage (into
    ``RUN_DIR/stages/NAME``, on the same models, seed and cluster; resumed or skipped when
    the command runs again), whose best recipe becomes ``merged``."""

    models: list[str] = field(default_factory=list)
    io_model: Optional[str] = None
    num_layers: Optional[int] = None
    repeats: int = 2
    scale_low: float = 0.5
    scale_high: float = 2.0
    scale_init: float = 1.0
    max_path_length: Optional[int] = None
    merged_from: Optional[str] = None
    merge_stage: Optional[str] = None


@dataclass
class SpaceConfig:
    """A search space: the merge method, its searched genes and the fixed rest.

    ``models``, ``base`` and ``num_layers`` describe the models being merged; an experiment
    fills them from its models group (``num_layers`` may also come from the base's HF config).
    ``fixed`` holds per-model parameters (the same for every group and model) and global ones
    (normalize, rescale, lambda, ...) that are not searched.
    """

    method: str = MISSING
    models: list[str] = field(default_factory=list)
    base: str = "base"
    num_layers: Optional[int] = None
    genes: dict[str, GeneConfig] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    granularity: GranularityConfig = field(default_factory=GranularityConfig)
    seed: int = 0  # the seed of stochastic methods (DARE, DELLA) in every decoded recipe
    dataflow: Optional[DataFlowSpaceConfig] = None  # with method: dataflow, the layer-path space


@dataclass
class StrategyConfig:
    """Which optimizer proposes genomes, and how long it runs.

    ``backend``: ``nevergrad`` (``optimizer``: a registry name such as CMA, DE, TwoPointsDE,
    NGOpt, PortfolioDiscreteOnePlusOne; default NGOpt), ``optuna`` (``optimizer``: cmaes, tpe,
    nsga2; default tpe), ``random`` or ``grid`` (an even grid over a space of a few genes; no
    optimizer). ``initial``: ``uniform`` (the space's initial point), null
    (none) or a genome, asked first. ``failure_loss`` is what Nevergrad and random search are
    told for each objective of a failed candidate (Optuna marks the trial failed instead); it
    must be worse than any real loss. ``storage``/``study_name``: an Optuna RDB URL and study
    (in-memory when null).
    """

    backend: str = "nevergrad"
    optimizer: Optional[str] = None
    budget: int = 100
    population_size: Optional[int] = None
    num_objectives: Optional[int] = 1  # 1: the weighted sum; null (or their number): each objective
    num_workers: Optional[int] = None  # candidates in flight at once (null: the cluster's workers)
    seed: int = 0
    initial: Any = "uniform"
    failure_loss: float = 1.0e6
    storage: Optional[str] = None
    study_name: Optional[str] = None


@dataclass
class ModelsConfig:
    """The models merged: a zoo (built if missing, its base and every specialist, or the
    ``sources`` named from it), or an explicit ``base`` folder (or hub id) and ``sources``
    (name -> folder or hub id).

    With a zoo, ``sources`` may list specialist names (``[ft_increment, ft_shift]`` as a
    mapping ``{ft_increment: null}``) to merge only those; paths come from zoo.json.
    """

    zoo: Optional[ZooConfig] = None
    base: Optional[str] = None
    sources: dict[str, Optional[str]] = field(default_factory=dict)
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class RunConfig:
    """Where a search lives and how long it runs.

    ``dir``: the run directory (config.yaml, archive.db, strategy.pkl, search.log); running
    the same command on it again resumes. ``budget``: candidates evaluated in all (scored,
    failed and duplicates of an earlier recipe alike: each is one archive row and one tell).
    ``overwrite``: start afresh in a directory holding another experiment (or this one).
    ``db_url``: an SQLAlchemy URL for a shared archive database (default: sqlite in ``dir``).
    ``id``: the run's id in the database (default: made up at the first start, kept in
    ``dir``/config.yaml). ``device``/``dtype``: where and in which precision a worker keeps
    the live model (default: CUDA when available, the checkpoint's dtype). ``threads``:
    torch CPU threads (null: torch's default). ``dashboard``: mirror every evaluation into an
    Optuna study in the archive database, so ``optuna-dashboard DB_URL`` shows the run.
    ``trust_checkpoint``: also use a ``strategy.pkl`` cache another user owns (a pickle runs
    what it says when loaded); without it such a cache is ignored and the strategy rebuilt
    from the archive, as for any cache whose checksum the archive does not vouch for.
    """

    dir: str = "runs/${name}"
    budget: int = 100
    overwrite: bool = False
    db_url: Optional[str] = None
    id: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    threads: Optional[int] = None
    progress: bool = True
    dashboard: bool = True
    trust_checkpoint: bool = False


@dataclass
class ClusterConfig:
    """Where candidates are scored: ``serial`` (one worker in the search's own process) or
    ``ray`` (``num_workers`` Ray actors, each with the sources resident, one live model and
    one evaluator).

    ``address``: null starts a local Ray for the run (``num_cpus`` CPUs, default the workers'
    total, or every CPU; GPUs detected; dashboard off) and stops it at the end; ``auto``,
    ``HOST:PORT`` or ``ray://HOST:10001`` joins a running cluster (every node must reach the
    model paths). ``num_workers`` null (Ray only): one worker per GPU of the cluster, or per
    ``cpus_per_worker`` CPUs when it has none. ``cpus_per_worker``/``gpus_per_worker``: each
    actor's Ray resource request (``gpus_per_worker`` null: 1 when the cluster has GPUs, else
    0; a worker's torch threads default to its CPUs). ``mode``: ``async`` gives a free worker the next
    candidate at once; ``generational`` dispatches ``num_workers`` candidates, waits for all
    and reports them in candidate order (a barrier, as a serial run orders them).
    ``max_retries``: how often a candidate is retried after its worker process died (the
    worker is restarted and its sources reloaded first); then it is archived as failed.
    ``max_restarts``: worker restarts in all before the run stops (resumable); a worker killed
    while it loads the models (a signal, the OOM killer) is restarted like one killed
    mid-candidate. ``start_timeout_s``: how long a (re)started worker may take to load the
    models before the run stops (resumable); a run whose Ray nodes all died stops at once.
    """

    backend: str = "serial"
    address: Optional[str] = None
    num_workers: Optional[int] = 1
    num_cpus: Optional[float] = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: Optional[float] = 0.0
    mode: str = "async"
    max_retries: int = 2
    max_restarts: int = 20
    start_timeout_s: float = 1800.0


@dataclass
class SearchCommand:
    """``fuse-evo search``: evolve merge recipes of ``models`` in ``space`` with ``strategy``,
    scored by ``evaluator`` (its ``objectives``), archived and checkpointed in ``run.dir``."""

    name: str = "search"
    seed: int = 0
    models: ModelsConfig = field(default_factory=ModelsConfig)
    space: SpaceConfig = MISSING
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="space", name="space_schema", node=SpaceConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="models", name="models_schema", node=ModelsConfig)
    cs.store(group="run", name="run_schema", node=RunConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(name="search_schema", node=SearchCommand)


register()
