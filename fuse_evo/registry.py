"""The merge methods, each declared once: what it reads and how it is computed.

A ``MethodSpec`` says which per-model parameters a method reads (and their defaults), which
global parameters it accepts (and their defaults), which kernel family computes it, and its
name in mergekit. Everything that knows about methods reads it from here: ``Recipe`` checks
a method's name, the engine picks its kernel and fills in defaults, ``methods.py`` builds its
operator, the mergekit reader and writer map its parameters, and the search space knows
which genes a method has. A new method is one entry here and, for a new family, one kernel.

Plain data (no torch, no imports), at the bottom of the package beside ``errors.py``: ``Recipe``
checks a method's name against it, so in ``merge/`` it would close a circle recipe <-> merge.
Defaults are mergekit 0.1.5's (``merge_methods/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# what a per-model parameter is when a recipe leaves it out (mergekit's defaults); weight has none
PER_MODEL_DEFAULTS: Mapping[str, float] = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}

FAMILIES = ("linear", "gta", "slerp", "model_stock")
SPARSIFIERS = (None, "magnitude", "outliers", "random", "ranked")


@dataclass(frozen=True)
class MethodSpec:
    """One merge method. ``family``: ``linear`` (one matrix product over the task vectors),
    ``gta`` (sparsify each task vector, weight, optionally elect signs, combine: one fused
    kernel), ``slerp`` or ``model_stock``. ``sparsify`` (gta only): ``magnitude`` (TIES
    trim), ``outliers`` (breadcrumbs), ``random`` (DARE) or ``ranked`` (DELLA), None for
    none. ``defaults``: the global parameters the method takes when a recipe leaves them out.
    ``models``: how many source models it merges (least, most; None: no limit)."""

    name: str
    family: str
    per_model: tuple[str, ...]
    global_params: frozenset[str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    sparsify: str | None = None
    mergekit: str | None = None  # its merge_method name in mergekit
    models: tuple[int, int | None] = (1, None)

    def __post_init__(self) -> None:
        assert self.family in FAMILIES and self.sparsify in SPARSIFIERS, self.name

    def resolved(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """The method's global parameters: its defaults, overridden by a recipe's."""
        return {**self.defaults, **parameters}


_GTA = frozenset({"normalize", "lambda", "rescale"})
_ELECT = _GTA | {"consensus"}


def _gta(name: str, per_model: tuple[str, ...], sparsify: str, normalize: bool, rescale: Any,
         consensus: str | None) -> MethodSpec:
    return MethodSpec(name, "gta", ("weight", *per_model), _ELECT if consensus else _GTA,
                      {"normalize": normalize, "rescale": rescale, "consensus": consensus, "lambda": 1.0},
                      sparsify=sparsify, mergekit=name)


SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("linear", "linear", ("weight",), frozenset({"normalize"}), {"normalize": True}, mergekit="linear"),
    MethodSpec("task_arithmetic", "linear", ("weight",), frozenset({"normalize", "lambda"}),
               {"normalize": False, "lambda": 1.0}, mergekit="task_arithmetic"),
    _gta("ties", ("density",), "magnitude", normalize=True, rescale=False, consensus="sum"),
    _gta("dare_ties", ("density",), "random", normalize=False, rescale=True, consensus="sum"),
    _gta("dare_linear", ("density",), "random", normalize=False, rescale=True, consensus=None),
    MethodSpec("slerp", "slerp", (), frozenset({"t"}), mergekit="slerp", models=(1, 1)),
    _gta("breadcrumbs", ("density", "gamma"), "outliers", normalize=False, rescale=False, consensus=None),
    _gta("breadcrumbs_ties", ("density", "gamma"), "outliers", normalize=False, rescale=False, consensus="sum"),
    _gta("della", ("density", "epsilon"), "ranked", normalize=True, rescale=True, consensus="sum"),
    _gta("della_linear", ("density", "epsilon"), "ranked", normalize=False, rescale=True, consensus=None),
    MethodSpec("model_stock", "model_stock", (), frozenset({"filter_wise"}), {"filter_wise": False},
               mergekit="model_stock", models=(2, None)),
)}

METHODS = tuple(SPECS)
# per-model parameters each method reads, and the global ones it accepts (views of SPECS)
PER_MODEL_PARAMS: Mapping[str, tuple[str, ...]] = {n: s.per_model for n, s in SPECS.items()}
GLOBAL_PARAMS: Mapping[str, frozenset[str]] = {n: s.global_params for n, s in SPECS.items()}


def spec(method: str) -> MethodSpec:
    """The spec of ``method`` (KeyError for an unknown one: ``Recipe`` names the field first)."""
    return SPECS[method]
