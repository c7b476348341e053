"""Atomic small files and YAML mappings (fuse_evo/files.py)."""

from __future__ import annotations

import pytest

from fuse_evo.errors import FuseEvoError
from fuse_evo.files import atomic_write, read_yaml_mapping


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")
    atomic_write(path, "new: 2\n")
    atomic_write(tmp_path / "blob.bin", b"\x00\x01")
    assert path.read_text() == "new: 2\n" and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "config.yaml"]


@pytest.mark.parametrize("text, message", [("a: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")])
def test_read_yaml_mapping_names_the_file_at_fault(tmp_path, text, message):
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    with pytest.raises(FuseEvoError, match=f"merge config {path}: {message}"):
        read_yaml_mapping(path, f"merge config {path}")
    with pytest.raises(FuseEvoError, match="No such file"):
        read_yaml_mapping(tmp_path / "missing.yaml", "merge config")
    (tmp_path / "ok.yaml").write_text("sources: {}\nrecipe: {}\n")
    assert read_yaml_mapping(tmp_path / "ok.yaml", "x") == {"sources": {}, "recipe": {}}


def test_file_sha256_reads_in_blocks_and_equals_hashlib(tmp_path):
    import hashlib

    from fuse_evo.files import file_sha256

    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
