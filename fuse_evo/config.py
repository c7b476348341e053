"""Structured configs (dataclasses) registered with Hydra's ConfigStore.

Every YAML under ``configs/`` extends one of these schemas, so a misspelt key or a value of the
wrong type fails when Hydra composes the config, before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ZooConfig:
    """How to build a zoo: a base pretrained on a broad mix, then one gentle fine-tune per skill.

    Every field except ``out_dir`` determines the weights (it is part of the cache key).
    """

    name: str = "tiny"
    out_dir: Optional[str] = None  # default: $FUSE_EVO_CACHE (or ~/.cache/fuse_evo)/zoo/<name>
    seed: int = 0
    threads: int = 2  # torch CPU threads; fixed so a build is reproducible across machines
    skills: list[str] = field(default_factory=lambda: ["increment", "reverse", "shift"])
    generation_skill: Optional[str] = "increment"  # also written as a generate_until task
    # model shape (LlamaForCausalLM)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64
    # evaluation data: disjoint splits per skill, never shown in training
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
    # on that skill reaches finetune_target (so each stays as near the base as it can)
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
class EvaluatorConfig:
    """What a worker's Evaluator scores, and how its numbers become objectives."""

    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)  # folders of custom task YAMLs
    limit: Optional[float] = None  # documents per task (a fraction if < 1), as lm-eval's --limit
    limits: dict[str, float] = field(default_factory=dict)  # per-task limit, overrides `limit`
    samples: dict[str, list[int]] = field(default_factory=dict)  # fixed document ids per task
    num_fewshot: Optional[int] = None
    fewshot_seed: int = 1234
    batch_size: int = 64
    objectives: list[ObjectiveConfig] = field(default_factory=list)


def check_limits(cfg: EvaluatorConfig, prefix: str = "evaluator") -> None:
    """``limit``/``limits`` must be > 0 (lm-eval reads 0 as "every document"), checked when
    the command is planned, before any folder is made or model loaded."""
    from .errors import ConfigError

    keyed = [(f"{prefix}.limit", cfg.limit)] + [(f"{prefix}.limits.{t}", v) for t, v in cfg.limits.items()]
    for key, value in keyed:
        if value is not None and not value > 0:
            raise ConfigError(f"{key}: must be > 0 (documents per task, or a fraction of them below 1), got {value}")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="zoo_command_schema", node=ZooCommand)
    cs.store(group="zoo", name="zoo_schema", node=ZooConfig)
    cs.store(group="evaluator", name="evaluator_schema", node=EvaluatorConfig)


register()
