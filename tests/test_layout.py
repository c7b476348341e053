"""The house rules: the import contracts hold, and the tests mirror the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fuse_evo"

# modules whose behaviour is tested in another module's file (the file named), and modules
# with no behaviour of their own (None: schemas, exceptions, plain tables)
ELSEWHERE = {
    "cli": "test_sweeps.py",  # job_dir_name, exit codes (and test_bad_input.py)
    "config": None,  # schemas; compose is used by every search test
    "device": "test_bad_input.py",
    "errors": None,
    "registry": "test_merge_methods.py",  # the operators and the engine read every entry
    "merge.live": "test_merge_run.py",  # every merge, worker and export assembles one
    "merge.mergekit": "test_merge_run.py",
    "search.mirror": "test_search_run.py",  # the dashboard study
    "search.plan": "test_bad_input.py",  # config errors before any work
    "search.rundir": "test_search_run.py",  # resume, lock, overwrite (and test_search_replay.py)
    "search.scheduler": "test_search_ray_scheduler.py",
    "search.worker": "test_search_ray_scheduler.py",
    "results.compare": "test_search_multiobjective.py",
    "results.heldout": "test_results_export.py",
    "results.report": "test_results_export.py",
    "zoo.scoring": "test_zoo_data.py",
    "zoo.skills": "test_zoo_data.py",
    "zoo.tasks": "test_zoo_data.py",
    "zoo.tokenizer": "test_zoo_data.py",
    "zoo.train": "test_zoo_build.py",
}


def _modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        found.append(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    return found


def test_every_module_with_behaviour_has_its_test_file():
    """tests/test_<package>_<module>.py (test_<module>.py at the top), or a named home above."""
    missing = []
    for module in _modules():
        mirror = ROOT / "tests" / f"test_{module.replace('.', '_')}.py"
        if mirror.exists():
            continue
        if module not in ELSEWHERE:
            missing.append(f"{module}: no {mirror.name}")
        elif ELSEWHERE[module] is not None and not (ROOT / "tests" / ELSEWHERE[module]).exists():
            missing.append(f"{module}: {ELSEWHERE[module]} is gone")
    assert not missing, "; ".join(missing)
    stale = sorted(set(ELSEWHERE) - set(_modules()))
    assert not stale, f"ELSEWHERE names modules that no longer exist: {stale}"


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: the flow's layers, no circles, and one
    home per third-party dependency (ray, lm_eval, nevergrad, optuna, hydra, matplotlib,
    sqlalchemy, gguf)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
