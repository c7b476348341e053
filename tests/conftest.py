"""Shared fixtures: the micro zoo, built once per test session; no hub is ever reached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from fuse_evo.cli import compose  # noqa: E402


def compose_command(config_name: str, overrides: list[str]):
    """Compose a command's config exactly as the CLI does, as its dataclass."""
    return compose(config_name, overrides)


def micro_zoo_config(out_dir: Path, *extra: str):
    return compose_command("zoo", ["zoo=micro", f"zoo.out_dir={out_dir}", *extra]).zoo


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> dict:
    """The micro zoo's manifest (zoo.json), built once for the whole session."""
    from fuse_evo.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "micro"
    return build_zoo(micro_zoo_config(out), progress=False)
