"""DataFlowSpace: genomes decode to layer paths (slots in order, transition scales from the
matrix), the start is the io model itself, paths encode back, bad spaces and genomes are
refused naming the key or gene."""

from __future__ import annotations

import numpy as np
import pytest

from fuse_evo.errors import ConfigError
from fuse_evo.merge.dataflow import LayerPath
from fuse_evo.search.dataflow_space import DataFlowSpace, DataFlowSpaceConfig
from fuse_evo.search.space import SpaceError


def space(**kw) -> DataFlowSpace:
    return DataFlowSpace(DataFlowSpaceConfig(**{"models": ["a", "b"], "io_model": "b", "repeats": 2, **kw}),
                         {"num_hidden_layers": 3})


def test_layout_start_and_decoding():
    s = space()
    assert s.dimension == 2 * 2 * 3 + 4 and s.names[0] == "slot.0.a.0" and s.names[-1] == "scale.b.b"
    start = s.decode(s.initial())
    assert start == LayerPath([("b", 0), ("b", 1), ("b", 2)], [1.0, 1.0, 1.0], "b")  # the io model itself
    x = np.zeros(s.dimension)
    on = {"slot.0.a.1": 0.9, "slot.0.b.0": 0.6, "slot.1.a.1": 1.0, "slot.1.b.2": 0.51}
    scales = {"scale.a.b": 1.5, "scale.b.a": 0.7, "scale.a.a": 1.9, "scale.b.b": 0.6}
    for name, value in {**on, **scales}.items():
        x[s.names.index(name)] = value
    path = s.decode(x)
    assert path.steps == (("a", 1), ("b", 0), ("a", 1), ("b", 2))
    assert path.scales == (1.0, 1.5, 0.7, 1.5)
    again = s.decode(s.encode(path))
    assert again == path


def test_random_genomes_round_trip():
    s = space(repeats=3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(s.lower, s.upper)
        try:
            path = s.decode(x)
        except SpaceError:
            continue
        assert s.decode(s.encode(path)) == path
        assert len(path.steps) == int((x[: len(s.slots)] > 0.5).sum())


def test_bad_spaces_and_genomes():
    with pytest.raises(ConfigError, match=r"space.io_model: 'c' is not one of space.models \['a', 'b'\]"):
        space(io_model="c")
    with pytest.raises(ConfigError, match="space.scale_low/scale_init/scale_high: need 0 < low"):
        space(scale_low=0.0)
    with pytest.raises(ConfigError, match="space.repeats: must be at least 1"):
        space(repeats=0)
    s = space(max_path_length=2)
    with pytest.raises(SpaceError, match="the path is empty"):
        s.decode(np.concatenate([np.zeros(len(s.slots)), np.ones(4)]))
    with pytest.raises(SpaceError, match="the path has 3 layers, more than space.max_path_length 2"):
        s.decode(s.initial())
    with pytest.raises(SpaceError, match=r"gene scale.a.b = 3.0 is outside \[0.5, 2.0\]"):
        x = s.initial()
        x[s.names.index("scale.a.b")] = 3.0
        s.decode(x)
    with pytest.raises(SpaceError, match="transition b -> b has scales 1.0 and 1.2"):
        space().encode(LayerPath([("b", 0), ("b", 1), ("b", 2)], [1.0, 1.0, 1.2], "b"))
    with pytest.raises(SpaceError, match=r"path step 3 \('a', 0\): not in the slots"):
        space(repeats=1).encode(LayerPath([("a", 0), ("b", 0), ("b", 1), ("a", 0)], [1.0] * 4, "b"))


def test_path_evolution_mutates_only_scales_on_the_path_and_improves():
    from dataclasses import replace as dc_replace

    from fuse_evo.config import StrategyConfig
    from fuse_evo.search import make_strategy

    s = space(repeats=2)
    target = {("a", 1), ("b", 2)}

    def loss(x):  # prefer paths holding exactly the target layers, with transition scales near 1.3
        path = s.decode(x) if (x[: s.num_slots] > 0.5).any() else None
        if path is None:
            return 10.0
        layers = set(path.steps)
        return len(layers ^ target) + sum(abs(v - 1.3) for v in path.scales[1:])

    config = StrategyConfig(backend="path_es", budget=120, seed=4)
    with make_strategy(config, s) as strategy:
        first = strategy.ask()
        np.testing.assert_array_equal(first.genome, s.initial())
        strategy.tell(first, [loss(first.genome)])
        best = loss(first.genome)
        for i in range(119):
            parent = strategy._parent.copy()
            c = strategy.ask()
            unused = set(range(s.num_slots, s.dimension)) - set(s.used_scales(c.genome))
            assert all(c.genome[j] == parent[j] for j in unused)  # off-path scales untouched
            assert set(np.unique(c.genome[: s.num_slots])) <= {0.0, 1.0}
            if i == 60:  # a state round trip continues identically
                state = strategy.state_dict()
                twin = make_strategy(config, s)
                twin.load_state_dict(state)
                assert [p.id for p in twin.pending()] == [c.id]
            strategy.tell(c, [loss(c.genome)])
            if i == 60:
                twin.tell(twin.pending()[0], [loss(c.genome)])
                np.testing.assert_array_equal(twin.ask().genome, strategy.ask().genome)
                strategy.tell(strategy.pending()[0], [10.0])
            best = min(best, loss(c.genome))
    assert best < loss(s.initial()) - 1.0
    with pytest.raises(ConfigError, match="path_es searches data-flow spaces"):
        from fuse_evo.config import GeneConfig, SpaceConfig
        from fuse_evo.search import SearchSpace

        ps = SearchSpace(SpaceConfig(method="task_arithmetic", models=["a"], num_layers=1,
                                     genes={"weight": GeneConfig(0.0, 1.0)}))
        make_strategy(dc_replace(config), ps)
