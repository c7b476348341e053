"""The search: spaces that decode genomes into recipes, and strategies that propose genomes."""

from .config import GeneConfig, GranularityConfig, SpaceConfig, StrategyConfig
from .space import Gene, SearchSpace, SpaceError

__all__ = ["Gene", "GeneConfig", "GranularityConfig", "SearchSpace", "SpaceConfig", "SpaceError", "StrategyConfig"]
