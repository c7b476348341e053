"""The ``fuse-evo`` command: ``fuse-evo SUBCOMMAND [hydra overrides key=value ...]``.

Each sub-command is a Hydra application with its own primary config under ``configs/``, so
overrides, ``--cfg job``, ``--help`` and (later) ``-m`` multirun work as Hydra users expect.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import RESUME_SAFE, config_dir
from .errors import FuseEvoError

log = logging.getLogger("fuse_evo")


def job_dir_name(overrides: list[str]) -> str:
    """A sweep job's run directory name, made from its command-line overrides, not the clock:
    the same job resubmitted (after a preemption, or a whole multirun launched again) lands in
    the same directory and resumes there. Keys that may change between a run and its resume
    (``run.budget``, ``cluster``, ...), ``run.dir`` and Hydra's own are left out. A character
    that is awkward in a path or a database URL (``/``, ``%``, spaces, ...) becomes ``_``; such
    a name, or one cut to 120 characters, ends with a hash of the overrides kept."""
    import hashlib
    import re

    kept = []
    for item in sorted(overrides):
        key = _override_key(item)
        if key == "run.dir" or key.startswith("hydra") or any(key == k or key.startswith(f"{k}.") for k in RESUME_SAFE):
            continue
        kept.append(item)
    raw = ",".join(kept)
    name = re.sub(r"[^A-Za-z0-9=,._+:@\[\]{}-]", "_", raw) or "default"
    if name != raw or len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(raw.encode()).hexdigest()[:10]}"
    return name


def _override_key(override: str) -> str:
    """``++a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def _hydra_job_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return job_dir_name(list(HydraConfig.get().overrides.task))


OmegaConf.register_new_resolver("fuse_evo_job_dir", _hydra_job_dir, replace=True)


def _zoo(cfg: DictConfig) -> None:
    from .zoo.build import build_zoo, score_table

    command = OmegaConf.to_object(cfg)
    manifest = build_zoo(command.zoo, progress=command.progress)
    print(score_table(manifest))
    print(f"\nzoo: {Path(manifest['task_dir']).parent / 'zoo.json'}")


def _search(cfg: DictConfig) -> None:
    from dataclasses import replace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .search.run import nothing_scored, run_search, summary

    command = OmegaConf.to_object(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and "run.dir" not in map(_override_key, hydra_cfg.overrides.task):
        # a sweep job: its own run dir, named by its overrides (hydra.sweep.dir/<overrides>)
        command = replace(command, run=replace(command.run, dir=hydra_cfg.runtime.output_dir))
    result = run_search(command)
    print(summary(result))
    if result.best is None:  # a run that scored nothing is no success, whatever its budget says
        raise FuseEvoError(nothing_scored(result))


def _plan(cfg: DictConfig) -> None:
    from .search.plan import plan_memory, resolve_models, space_models

    command = OmegaConf.to_object(cfg)
    models = resolve_models(command.models, progress=command.run.progress)
    memory = plan_memory(command, models, space_models(command.space, models), command.cluster)
    if memory is None:
        raise FuseEvoError("fuse-evo plan: the models are hub ids, not local folders; download them first")
    print(memory.text())


COMMANDS: dict[str, tuple[str, Callable[[DictConfig], None], str]] = {
    "zoo": ("zoo", _zoo, "build (or reuse) the offline model zoo and print its score table"),
    "search": ("search", _search, "evolve merge coefficients (experiment=NAME); the same command resumes"),
    "plan": ("search", _plan, "print a search's memory plan per worker (plan.gpu_memory_gb=80 ...) and exit"),
}
# commands with plain flags (their arguments are files and folders, not a composed config):
# the module whose ``main(argv)`` parses them, imported when the command runs
FLAG_COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("fuse_evo.merge.run", "merge models from a recipe or a mergekit YAML into an HF folder"),
    "eval": ("fuse_evo.evaluate.run", "score an HF model folder with lm-eval tasks (the search's evaluator)"),
    "export": ("fuse_evo.results.export", "write a searched recipe (best or trial:N) as an HF folder with its scores"),
    "report": ("fuse_evo.results.report", "summarize a search: held-out table, convergence and coefficient plots"),
}


def _flag_command(name: str, argv: list[str]) -> int:
    from importlib import import_module

    return import_module(FLAG_COMMANDS[name][0]).main(argv)


def _usage() -> str:
    lines = ["usage: fuse-evo COMMAND [key=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in FLAG_COMMANDS.items()]
    lines += ["", "zoo and search take Hydra overrides (key=value); `fuse-evo COMMAND --help` explains each command."]
    return "\n".join(lines)


def _guarded(fn: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Turn a FuseEvoError into one line on stderr and exit status 2."""

    def run(cfg: DictConfig) -> None:
        try:
            fn(cfg)
        except FuseEvoError as e:
            print(f"fuse-evo: error: {e}", file=sys.stderr)
            sys.exit(2)

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in FLAG_COMMANDS:
        try:
            return _flag_command(command, rest)
        except FuseEvoError as e:
            print(f"fuse-evo: error: {e}", file=sys.stderr)
            return 2
    if command not in COMMANDS:
        print(f"fuse-evo: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    config_name, fn, _ = COMMANDS[command]
    try:
        path = config_dir()
    except FuseEvoError as e:
        print(f"fuse-evo: error: {e}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [f"fuse-evo {command}", *rest]
    try:
        hydra.main(config_path=str(path), config_name=config_name, version_base="1.3")(
            _guarded(fn)
        )()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
