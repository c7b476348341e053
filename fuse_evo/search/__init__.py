"""The search: spaces that decode genomes into recipes, and strategies that propose genomes."""

from .config import GeneConfig, GranularityConfig, SpaceConfig, StrategyConfig
from .space import Gene, SearchSpace, SpaceError
from .strategies import Candidate, Strategy, StrategyError, make_strategy

__all__ = [
    "Candidate", "Gene", "GeneConfig", "GranularityConfig", "SearchSpace", "SpaceConfig", "SpaceError",
    "Strategy", "StrategyConfig", "StrategyError", "make_strategy",
]
