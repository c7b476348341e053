"""Small files written whole or not at all, and YAML mappings read with errors that name the file.

Everything fuse_evo writes beside a user's work (a run's config.yaml and strategy cache, a
report, a results JSON, the zoo's manifest) goes through ``atomic_write``, so a crash leaves the
old file or the new one, never half of one. Model folders have their own atomic path
(``merge/save.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import FuseEvoError


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256 (hex), read in 1 MiB blocks: the checksums the zoo's caches record."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, data: bytes | str, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a hidden sibling (``.NAME.tmp``) renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_yaml_mapping(path: str | Path, what: str, error: type[FuseEvoError] = FuseEvoError) -> dict[str, Any]:
    """The mapping a YAML file holds; ``error`` naming ``what`` (e.g. ``merge config X``) when
    the file cannot be read, is not YAML, or holds something other than a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise error(f"{what}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise error(f"{what}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: expected a mapping at the top level")
    return data
