"""A run directory and what it holds besides the archive: its config, its lock, its log and
the strategy cache.

``prepare_run_dir`` refuses a directory that holds another experiment (unless
``run.overwrite``), clears one being overwritten and tells a resume from a start; ``lock``
keeps one search per directory; ``LogTo`` appends the run's log to ``search.log``;
``save_cache``/``load_cache`` write and vouch for ``strategy.pkl`` (only a cache: the archive
is the one truth, and resume replays it when the cache is missing, stale or not this run's).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from ..config import SearchCommand
from ..errors import FuseEvoError
from ..files import atomic_write
from .archive import CONFIG_FILE, DB_FILE, Archive, default_url
from .plan import command_yaml, config_differences

if TYPE_CHECKING:
    from .strategies import Strategy

log = logging.getLogger("fuse_evo.search")
trial_log = logging.getLogger("fuse_evo.search.trials")  # per-evaluation lines: the log file only

STRATEGY_FILE = "strategy.pkl"
LOG_FILE = "search.log"
LOCK_FILE = ".lock"
OUR_FILES = (CONFIG_FILE, DB_FILE, STRATEGY_FILE, LOG_FILE)
STAGES_DIR = "stages"  # a hybrid search's first stage runs in RUN_DIR/stages/NAME
SCAN_STAGE = "scan"  # a per-layer search's global-scale scan runs in RUN_DIR/stages/scan
CHECKPOINT_FORMAT = 2  # 2: a cache vouched for by the archive (fe_cache); 1 was the checkpoint

class RunDirError(FuseEvoError):
    """A run directory that holds another experiment, or a checkpoint that cannot continue."""



def prepare_run_dir(cmd: SearchCommand) -> tuple[Path, str, bool, dict[str, Any] | None]:
    """(run dir, run id, resumed?, stored config) after refusing a directory that holds
    another experiment (unless run.overwrite) and clearing it when overwriting."""
    run_dir = Path(cmd.run.dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file")
    stored_path = run_dir / CONFIG_FILE
    new = yaml.safe_load(command_yaml(cmd))
    if stored_path.exists():
        try:
            stored = yaml.safe_load(stored_path.read_text())
            if not isinstance(stored, dict):
                raise yaml.YAMLError("not a mapping")
        except yaml.YAMLError as e:
            stored = None
            if not cmd.run.overwrite:
                raise RunDirError(f"run.dir {run_dir}: {CONFIG_FILE} is unreadable ({e}); "
                                  "pass run.overwrite=true to start afresh") from None
        if cmd.run.overwrite:
            clear_run(run_dir, stored)
            return run_dir, cmd.run.id or uuid.uuid4().hex[:12], False, None
        diffs = config_differences(stored, new)
        if diffs and not has_history(run_dir, stored):
            # nothing was ever asked (the first start stopped before its first candidate):
            # there is nothing to keep
            log.info("run.dir %s: the earlier start never asked a candidate; starting afresh", run_dir)
            clear_run(run_dir, stored)
            return run_dir, cmd.run.id or uuid.uuid4().hex[:12], False, None
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > 8 else "")
            raise RunDirError(
                f"run.dir {run_dir} holds another experiment ({stored.get('name')!r}); it differs in {shown}. "
                "Resume it with its own config, choose another run.dir, or pass run.overwrite=true to start afresh"
            )
        run_id = (stored.get("run") or {}).get("id")
        if not run_id:
            raise RunDirError(f"run.dir {run_dir}: {CONFIG_FILE} has no run.id; pass run.overwrite=true to start afresh")
        if cmd.run.id and cmd.run.id != run_id:
            raise RunDirError(f"run.id: {cmd.run.id!r}, but {run_dir} holds run {run_id!r}")
        return run_dir, run_id, True, stored
    if run_dir.is_dir():
        ours = [n for n in (DB_FILE, STRATEGY_FILE) if (run_dir / n).exists()]
        others = sorted(p.name for p in run_dir.iterdir()
                        if p.name not in (*OUR_FILES, STAGES_DIR) and not p.name.startswith("."))
        if ours and not cmd.run.overwrite:
            raise RunDirError(f"run.dir {run_dir} holds {ours} but no {CONFIG_FILE}: not a run that can resume; "
                              "pass run.overwrite=true to start afresh")
        if others and not cmd.run.overwrite:
            raise RunDirError(f"run.dir {run_dir} is not empty and holds no search (found {others[:5]}); choose "
                              "another run.dir, or pass run.overwrite=true to write the run beside those files")
        if ours:
            clear_run(run_dir, None)
    return run_dir, cmd.run.id or uuid.uuid4().hex[:12], False, None


def has_history(run_dir: Path, stored: dict[str, Any]) -> bool:
    """Whether the run asked anything yet (True when that cannot be told: never clear a run
    that may hold work)."""
    run = stored.get("run") or {}
    if not run.get("db_url") and not (run_dir / DB_FILE).exists():
        return (run_dir / STRATEGY_FILE).exists()
    try:
        with Archive(run.get("db_url") or default_url(run_dir), run.get("id") or "", create=True) as archive:
            return bool(archive.count() or archive.count_asks())
    except FuseEvoError:
        return True


def clear_run(run_dir: Path, stored: dict[str, Any] | None) -> None:
    """Remove a run's files (and its rows in a shared database)."""
    run = (stored or {}).get("run") or {}
    if run.get("db_url") and run.get("id"):
        try:
            with Archive(run["db_url"], run["id"], create=True) as old:
                old.delete_run()
        except FuseEvoError as e:
            log.warning("could not remove run %s from %s: %s", run["id"], run["db_url"], e)
    for name in OUR_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob(f".{STRATEGY_FILE}.tmp"):
        p.unlink()
    log.info("run.overwrite: cleared %s", run_dir)


@contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """One search per run directory at a time (a requeued job while the old one still runs
    would tell the strategy twice): an exclusive lock on RUN_DIR/.lock, released at exit."""
    import fcntl

    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise RunDirError(f"run.dir {run_dir} is not writable: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise RunDirError(f"run.dir {run_dir} is in use by another fuse-evo search ({f.read().strip() or 'pid ?'})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


class LogTo:
    """Log (fuse_evo's INFO and the per-trial lines) to RUN_DIR/search.log for the run."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        self.package = logging.getLogger("fuse_evo")

    def __enter__(self) -> "LogTo":
        self._level = self.package.level
        if self.package.getEffectiveLevel() > logging.INFO:
            self.package.setLevel(logging.INFO)
        self.package.addHandler(self.handler)
        trial_log.propagate = False
        trial_log.setLevel(logging.INFO)
        trial_log.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.package.removeHandler(self.handler)
        trial_log.removeHandler(self.handler)
        self.package.setLevel(self._level)
        self.handler.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_cache(run_dir: Path, run_id: str, strategy: Strategy, archive: Archive) -> None:
    """Write ``strategy.pkl`` (the strategy's state after ``n_asked`` asks and ``n_told``
    tells) atomically, then record its checksum in the archive. Raises what pickling raises
    (a backend whose state cannot be pickled: the run then replays the archive on resume)."""
    state = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "saved": time.time(), "asks": strategy.n_asked,
             "tells": strategy.n_told, "strategy": strategy.state_dict()}
    data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(run_dir / STRATEGY_FILE, data)
    archive.set_cache(_sha256(data), strategy.n_asked, strategy.n_told)


def load_cache(run_dir: Path, run_id: str, strategy: Strategy, archive: Archive, trust: bool = False) -> str | None:
    """Continue ``strategy`` from ``strategy.pkl`` if it is this run's own cache of the
    archive's whole history: its SHA-256 is the one the archive recorded and it holds as many
    asks and tells as the archive. Returns None when loaded, else why not (the caller then
    replays the archive). Nothing is unpickled before the checksum matches; a file another
    user owns is not used unless ``trust`` (``run.trust_checkpoint``)."""
    path = run_dir / STRATEGY_FILE
    if not path.exists():
        return f"no {STRATEGY_FILE}"
    owner = path.stat().st_uid
    if owner != os.getuid() and not trust:
        return (f"{path} belongs to another user (uid {owner}); a pickle runs code when loaded "
                "(run.trust_checkpoint=true uses it)")
    data = path.read_bytes()
    recorded = archive.cache()
    position = (archive.count_asks(), archive.count())
    if recorded is None or recorded[0] != _sha256(data):
        return f"{STRATEGY_FILE} is not the cache the archive recorded (checksum differs: damaged, or not this run's)"
    if tuple(recorded[1:]) != position:
        return f"{STRATEGY_FILE} holds {recorded[1]} asks and {recorded[2]} tells, the archive {position[0]} and {position[1]}"
    if owner != os.getuid():
        log.warning("using %s, a pickle owned by uid %d (run.trust_checkpoint=true)", path, owner)
    try:
        state = pickle.loads(data)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("run_id") != run_id:
            return f"{STRATEGY_FILE} is not a cache of this run in format {CHECKPOINT_FORMAT}"
        strategy.load_state_dict(state["strategy"])
    except Exception as e:  # the archive rebuilds what the cache cannot give
        return f"{STRATEGY_FILE} could not be loaded ({type(e).__name__}: {e})"
    return None


