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
