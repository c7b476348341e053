"""DataFlowSpace: genome (a bounded real vector) <-> LayerPath, after Akiba et al. (2024).

The M models' layers are laid out in order (model 0's layers 0..L-1, then model 1's, ...) and
the sequence repeated ``repeats`` times: T = M x L x repeats slots, one inclusion gene each (a
slot is on the path when its gene is above 0.5). The path is the included slots in order.
An M x M matrix of scale genes gives the scale of the hidden state on each transition from a
layer of model i to a layer of model j; the first layer of the path gets scale 1. The path is
framed by the embedding, final norm and head of ``io_model``.

The inclusion genes are continuous in [0, 1] so every strategy can search them; a scale gene
only matters when its transition is on the path (a strategy that knows this structure is the
data-flow issue's next step). The starting genome is the io model itself: its own layers,
once, at unit scales.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..config import DataFlowSpaceConfig
from ..errors import ConfigError
from ..recipe import DATAFLOW, LayerPath
from .space import Gene, GenomeSpace, SpaceError

THRESHOLD = 0.5


class DataFlowSpace(GenomeSpace):
    """Inclusion genes ``slot.R.MODEL.LAYER`` then scale genes ``scale.FROM.TO``."""

    method = DATAFLOW

    def __init__(self, config: DataFlowSpaceConfig, model_config: Mapping[str, Any] | None = None):
        self.config = config
        self.models = tuple(config.models)
        if not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"space.models: name each model whose layers are laid out once, got {list(self.models)}")
        self.io_model = config.io_model or self.models[0]
        if self.io_model not in self.models:
            raise ConfigError(f"space.io_model: {self.io_model!r} is not one of space.models {list(self.models)}")
        self.num_layers = config.num_layers or int((model_config or {}).get("num_hidden_layers") or 0)
        if self.num_layers < 1:
            raise ConfigError("space.num_layers: unknown; give it, or a model config with num_hidden_layers")
        if config.repeats < 1:
            raise ConfigError(f"space.repeats: must be at least 1, got {config.repeats}")
        if not 0 < config.scale_low <= config.scale_init <= config.scale_high:
            raise ConfigError(f"space.scale_low/scale_init/scale_high: need 0 < low <= init <= high, got "
                              f"{config.scale_low}, {config.scale_init}, {config.scale_high} (a scale must stay "
                              "positive for the norms to absorb it)")
        if config.max_path_length is not None and config.max_path_length < 1:
            raise ConfigError(f"space.max_path_length: must be at least 1 or null, got {config.max_path_length}")
        self.slots = [(r, m, i) for r in range(config.repeats) for m in self.models for i in range(self.num_layers)]
        genes = [Gene(f"slot.{r}.{m}.{i}", "include", "slot", None, m, 0.0, 1.0,
                      0.75 if (r == 0 and m == self.io_model) else 0.25) for r, m, i in self.slots]
        self._scale_index = {}
        for a in self.models:
            for b in self.models:
                self._scale_index[(a, b)] = len(genes)
                genes.append(Gene(f"scale.{a}.{b}", "scale", "transition", None, b, config.scale_low,
                                  config.scale_high, config.scale_init))
        self._set_genes(genes)

    def decode(self, genome: Sequence[float] | np.ndarray) -> LayerPath:
        """The path a genome describes; SpaceError if it is empty or longer than the limit."""
        x = self.validate(genome)
        steps = [(m, i) for (r, m, i), g in zip(self.slots, x) if g > THRESHOLD]
        if not steps:
            raise SpaceError("genome: no slot is included (every inclusion gene <= 0.5): the path is empty")
        limit = self.config.max_path_length
        if limit is not None and len(steps) > limit:
            raise SpaceError(f"genome: the path has {len(steps)} layers, more than space.max_path_length {limit}")
        scales = [1.0] + [float(x[self._scale_index[(a[0], b[0])]]) for a, b in zip(steps, steps[1:])]
        return LayerPath(steps, scales, self.io_model)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def used_scales(self, genome: Sequence[float] | np.ndarray) -> list[int]:
        """Indices of the scale genes on the path a genome describes (the others do nothing)."""
        models = [m for (r, m, i), g in zip(self.slots, genome) if g > THRESHOLD]
        return sorted({self._scale_index[(a, b)] for a, b in zip(models, models[1:])})

    def encode(self, path: LayerPath) -> np.ndarray:
        """A genome decoding to ``path``: its layers matched in slot order, its transition
        scales into the matrix (unused transitions at their start value). SpaceError when the
        path is not a subsequence of the slots or asks two scales of one transition."""
        if path.io_model != self.io_model:
            raise SpaceError(f"path: io_model {path.io_model!r}, the space frames paths with {self.io_model!r}")
        x = np.array([0.0] * len(self.slots) + [g.init for g in self.genes[len(self.slots):]])
        position = 0
        for k, step in enumerate(path.steps):
            while position < len(self.slots) and self.slots[position][1:] != step:
                position += 1
            if position == len(self.slots):
                raise SpaceError(f"path step {k} {step}: not in the slots after the previous step ({len(self.slots)} "
                                 f"slots: {len(self.models)} models x {self.num_layers} layers x {self.config.repeats})")
            x[position] = 1.0
            position += 1
        if path.scales[0] != 1.0:
            raise SpaceError(f"path: the first step's scale is {path.scales[0]}; the space starts paths at 1")
        seen: dict[tuple[str, str], float] = {}
        for (a, _), (b, _), s in zip(path.steps, path.steps[1:], path.scales[1:]):
            if seen.setdefault((a, b), s) != s:
                raise SpaceError(f"path: transition {a} -> {b} has scales {seen[(a, b)]} and {s}; the space has one")
            x[self._scale_index[(a, b)]] = s
        return self.validate(x)
