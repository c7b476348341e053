"""The search: spaces that decode genomes into recipes, strategies that propose genomes, the
archive of evaluations and the loop that runs them (``fuse-evo search``).

Names are imported on first use, so ``import fuse_evo.search`` pulls in nothing heavy.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Gene": "space", "SearchSpace": "space", "SpaceError": "space",
    "Proposal": "strategies", "Strategy": "strategies", "StrategyError": "strategies", "make_strategy": "strategies",
    "Archive": "archive", "ArchiveError": "archive", "Trial": "archive",
    "run_search": "run", "Search": "run", "SearchResult": "run", "RunDirError": "rundir",
    "Plan": "plan", "make_plan": "plan", "Worker": "worker", "WorkerSpec": "worker", "Job": "worker", "Result": "worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
