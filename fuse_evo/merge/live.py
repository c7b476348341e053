"""LiveMerge: the one place a live model is assembled from a ModelPool.

Every caller that turns candidates into a model to run (a search worker, ``fuse-evo merge``,
export, report, held-out scoring) builds it here: the pool's sources resident in a
MergeEngine, one live model of the base's architecture merged into in place, the base's
tokenizer, and for data-flow runs a Router over resident source models. ``load(candidate)``
makes the live model that candidate (a Recipe merged in place, a LayerPath routed) and
returns it; nothing is loaded from disk after construction.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import FuseEvoError
from ..models import ModelPool
from ..recipe import Candidate, DataFlowError, LayerPath
from .dataflow import build_router
from .engine import MergeEngine

DTYPES: Mapping[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str | None, where: str) -> torch.dtype | None:
    """The torch dtype named ``name`` (None: the checkpoint's own), or an error naming ``where``."""
    if name is None:
        return None
    if name not in DTYPES:
        raise FuseEvoError(f"{where}: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


class LiveMerge:
    """A pool's engine and live model, ready to become any candidate.

    ``device``: where the live model lives and, without a ``placement``, the sources too
    (default: CUDA when the sources fit, else CPU). ``placement``: the memory plan's choice
    (``merge.placement``): ``gpu``, ``stream`` or ``cpu`` (sources merged on the host). ``dtype``: the live model's precision (a name in ``DTYPES``;
    None: the checkpoint's). ``dataflow``: a data-flow search's ``{"io_model", "models",
    "initial", "merged"}``; its ``merged`` model (the hybrid's recipe) is the live model
    itself when ``route_only`` (a worker that only routes), else a model of its own, so the
    live model stays free for recipes (export and report load both kinds).
    """

    def __init__(self, pool: ModelPool, device: str | torch.device | None = None, dtype: str | None = None,
                 dataflow: Mapping[str, Any] | None = None, route_only: bool = False, placement: str | None = None):
        self.pool = pool
        self.dtype = dtype
        torch_type = torch_dtype(dtype, "dtype")
        if placement is None:  # the sources where the live model is (default: CUDA when they fit)
            self.engine = MergeEngine(pool, device=device)
            scoring = self.engine.device
        else:  # the memory plan's choice; the live model on the scoring device in every case
            scoring = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.engine = MergeEngine(pool, device="cpu" if placement == "cpu" else scoring,
                                      stream=placement == "stream")
        self.placement = placement
        self.model = pool.new_model(dtype=torch_type, device=scoring)
        self.tokenizer = pool.tokenizer()
        self.router = None
        if dataflow:
            merged = self.model if route_only else (
                pool.new_model(dtype=torch_type, device=scoring) if dataflow.get("merged") else None)
            self.router = build_router(pool, self.engine, merged, dataflow, torch_type, scoring)
        self.live: nn.Module = self.router.model if route_only and self.router is not None else self.model

    @property
    def device(self) -> torch.device:
        """The scoring device: where the live model is."""
        return next(self.model.parameters()).device

    def load(self, candidate: Candidate) -> nn.Module:
        """Make the live model ``candidate``: a Recipe merged into it in place (checked first,
        once per recipe), a LayerPath routed; returns the model to run."""
        if isinstance(candidate, LayerPath):
            if self.router is None:
                raise DataFlowError("a layer path, but these models were not laid out for data flow")
            self.live = self.router.route(candidate)
        else:
            self.engine.materialize(candidate, into=self.model)
            self.live = self.model
        return self.live
