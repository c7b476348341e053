"""The only module that imports lm-eval: fitness of a live model, built once, exact and fast.

``Evaluator`` is built once per worker around one live model. Construction does everything that
does not depend on the weights: it indexes the task YAMLs, loads the datasets, applies ``limit``
or fixed sample ids and the few-shot settings, builds every request (``Instance``) and
tokenizes and batches them. Each ``score()`` then runs only the model and lm-eval's own
per-document scoring and aggregation, so the numbers are ``lm_eval.simple_evaluate``'s on the
same model and documents.

What a call runs is lm-eval's evaluation loop (``lm_eval.evaluator.evaluate``) minus the
rebuild, with the model calls answered by ``_LiveLM``: an ``HFLM`` on the live model whose
``loglikelihood`` and greedy ``generate_until`` keep their tokenized, padded batches between
calls. It batches, pads and truncates exactly as HFLM does (same order, same batch
composition), so a forward pass sees the same tensors as under ``simple_evaluate``; anything
outside the fast paths (sampling, beam search, seq2seq models, ``loglikelihood_rolling``) is
HFLM's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lm_eval
import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.evaluator_utils import get_sample_size
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager

# lm-eval internals, each one used in one place below, since lm-eval offers no public way to do
# the same: _process_results aggregates per-document metrics into lm-eval's results (what
# simple_evaluate does after its forward passes), load_yaml + TaskIndex.process_cfg read one
# task file as TaskManager's indexing would (which skips a bad file without a word).
# tests/test_evaluate_evaluator.py::test_the_lm_eval_internals_we_use_are_there fails when a
# release moves them, and the parity tests (metrics equal to simple_evaluate's) when it changes
# what they compute.
from lm_eval.evaluator_utils import _process_results  # noqa: E402
from lm_eval.tasks._index import TaskIndex  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402
from lm_eval.utils import handle_non_serializable
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import FuseEvoError

log = logging.getLogger(__name__)

# simple_evaluate's default seeds: the same documents and few-shot contexts as lm-eval's CLI
RANDOM_SEED, NUMPY_SEED, TORCH_SEED, FEWSHOT_SEED = 0, 1234, 1234, 1234


class NonFiniteOutputs(FuseEvoError):
    """A model whose log-likelihoods are inf or nan (overflowing weights or activations): it
    cannot be scored, and must not be scored 0 as if it had merely answered wrong."""


class TaskError(FuseEvoError):
    """A task that cannot be built; the message names the task and the file at fault."""


# ---------------------------------------------------------------------------- task loading
_DEFAULT_MANAGER: TaskManager | None = None  # indexing lm-eval's ~15k task files takes ~10 s
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # folders TaskManager does not index


def _check_task_dir(path: Path) -> None:
    """Every task YAML under ``path`` must parse; lm-eval silently skips one that does not."""
    if not path.exists():
        raise TaskError(f"include_path {path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("**/*.yaml") if not any(part in _IGNORED_DIRS for part in p.parts)
    )
    if not files:
        raise TaskError(f"include_path {path} holds no task YAML (*.yaml)")
    for f in files:
        try:
            cfg = load_yaml(f, resolve_func=False, recursive=True)
            TaskIndex.process_cfg(cfg, f, {})
        except Exception as e:
            detail = " ".join(str(e).split())
            raise TaskError(f"task file {f} cannot be read: {type(e).__name__}: {detail}") from None


def _default_manager() -> TaskManager:
    global _DEFAULT_MANAGER
    if _DEFAULT_MANAGER is None:
        _DEFAULT_MANAGER = TaskManager()
    return _DEFAULT_MANAGER


def _task_managers(include_paths: list[Path], names: Sequence[str]) -> dict[str, TaskManager]:
    """Which TaskManager defines each name: the include paths' (indexed alone), else lm-eval's
    built-in tasks (indexed once per process, and only when a name is not a custom one)."""
    custom = (
        TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
        if include_paths else None
    )
    found = {n: custom for n in names if custom is not None and n in custom.task_index}
    rest = [n for n in names if n not in found]
    if rest:
        defaults = _default_manager()
        unknown = [n for n in rest if n not in defaults.task_index]
        if unknown:
            where = ", ".join(str(p) for p in include_paths)
            raise TaskError(
                f"unknown lm-eval task(s) {unknown}: not built into lm-eval"
                + (f" and not defined in {where}" if where else "; give include_path for custom task YAMLs")
            )
        found.update({n: defaults for n in rest})
    return found


def primary_metrics(tasks: Sequence[str], include_path: Sequence[str | Path] = ()) -> dict[str, tuple[str, str]]:
    """``{task: ("metric,filter", "max" | "min")}``: each task's primary metric as its YAML
    states it (the first ``metric_list`` entry, else lm-eval's default for its output type;
    the first ``filter_list`` entry's name, else ``none``; the direction from the entry's
    ``higher_is_better``, else lm-eval's registry). A group reads its ``aggregate_metric_list``.
    Only the task files are read: no dataset is loaded."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, is_higher_better
    from lm_eval.tasks._index import Kind

    paths = [Path(p).expanduser().resolve() for p in include_path]
    for p in paths:
        _check_task_dir(p)
    names = list(dict.fromkeys(tasks))
    managers = _task_managers(paths, names)
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        entry = managers[name].task_index[name]
        where = f"task {name!r}{_task_file(managers[name], name)}"
        if entry.kind == Kind.TAG:
            raise TaskError(f"{where} is a tag of several tasks: list them in evaluator.tasks, or give "
                            "evaluator.objectives")
        cfg = entry.cfg
        if entry.yaml_path is not None:
            cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
        cfg = cfg or {}
        if entry.kind == Kind.GROUP:
            listed = cfg.get("aggregate_metric_list") or []
            if not listed:
                raise TaskError(f"{where} is a group without aggregate_metric_list: it reports no metric of its "
                                "own; list its tasks in evaluator.tasks, or give evaluator.objectives")
            first = listed[0] if isinstance(listed, list) else listed
            filters = first.get("filter_list") or ["none"]
            filt = filters[0] if isinstance(filters, list) else filters
        else:
            listed = cfg.get("metric_list")
            if listed:
                first = listed[0]
            elif "class" in cfg:
                raise TaskError(f"{where} is defined in Python and names no metric_list: give evaluator.objectives")
            else:
                first = {"metric": DEFAULT_METRIC_REGISTRY[cfg.get("output_type") or "generate_until"][0]}
            filter_list = cfg.get("filter_list") or []
            filt = filter_list[0].get("name", "none") if filter_list else "none"
        metric = first.get("metric")
        if not isinstance(metric, str) or metric.startswith("!function"):
            raise TaskError(f"{where}: its first metric is a function, not a named metric: give evaluator.objectives")
        higher = first.get("higher_is_better")
        if higher is None:
            higher = is_higher_better(metric)
        out[name] = (f"{metric},{filt}", "min" if higher is False else "max")
    return out


@dataclasses.dataclass(frozen=True)
class DocumentSplit:
    """Each task's documents in two sides by a permutation of their ids seeded with ``seed``
    and the task's name: the first ``search_fraction`` of it (rounded; at least one document,
    at most all but one) is the ``search`` side, the rest the ``heldout`` side. The same ids for
    the same task, document count and seed on every machine. ``tasks``: the tasks it applies
    to (None: every task)."""

    search_fraction: float
    seed: int = 0
    side: str = "search"
    tasks: tuple[str, ...] | None = None

    def applies(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def ids(self, task: str, n_docs: int) -> list[int]:
        """The side's document ids, in permuted order (a limit takes a seeded subset)."""
        if n_docs < 2:
            raise TaskError(f"task {task!r}: {n_docs} document(s) cannot be split into a search and a held-out side")
        order = np.random.default_rng([int(self.seed), zlib.crc32(task.encode())]).permutation(n_docs)
        k = min(max(1, round(self.search_fraction * n_docs)), n_docs - 1)
        return [int(i) for i in (order[:k] if self.side == "search" else order[k:])]


def search_split(cfg: Any) -> DocumentSplit | None:
    """The search side of an ``EvaluatorConfig``'s split (``split.search_fraction``) over the
    tasks that ``heldout_tasks`` does not map; None without one. (Its held-out side is built
    from the archived config, ``results.heldout``.)"""
    fraction = cfg.split.search_fraction
    if fraction is None:
        return None
    tasks = tuple(t for t in cfg.tasks if t not in cfg.heldout_tasks)
    return DocumentSplit(float(fraction), int(cfg.split.seed), "search", tasks) if tasks else None


def _task_file(manager: TaskManager, name: str) -> str:
    entry = manager.task_index.get(name)
    return f" ({entry.yaml_path})" if entry is not None and entry.yaml_path else ""


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 400 else text[:400] + "..."


_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every build step and draws a progress bar per task (and datasets one per
    file): keep our output to what matters. Everything is restored on the way out."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    import sys

    import datasets
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    patched = {m: sys.modules[m].tqdm for m in _BAR_MODULES if hasattr(sys.modules.get(m), "tqdm")}
    for m in patched:
        sys.modules[m].tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        for m, original in patched.items():
            sys.modules[m].tqdm = original


@contextlib.contextmanager
def _seeded(device: torch.device) -> Iterator[None]:
    """simple_evaluate's global seeds for what runs inside; the caller's RNG states are restored."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(RANDOM_SEED)
        np.random.seed(NUMPY_SEED)
        torch.manual_seed(TORCH_SEED)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass
class Scores:
    """One call's results. ``results`` has lm-eval's shape: ``{task: {"acc,none": 0.9, ...}}``."""

    results: dict[str, dict[str, Any]]
    seconds: float
    tokens: int = 0  # tokens the model read or generated on the fast paths during the call
    report: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per request type, "metrics"
    # per document, for the metrics lm-eval averages over documents (acc, exact_match, ...):
    # {task: {"acc,none": [value of each scored document]}}, in the order of ``docs``
    outcomes: dict[str, dict[str, list[float]]] = dataclasses.field(repr=False, default_factory=dict)
    docs: dict[str, list[int]] = dataclasses.field(repr=False, default_factory=dict)  # {task: dataset ids scored}

    def __getitem__(self, key: str) -> float:
        """``scores["task/acc,none"]`` (or ``"task/acc"`` for the unfiltered value)."""
        task, _, metric = key.partition("/")
        if task not in self.results:
            raise KeyError(f"no task {task!r} in these scores (tasks: {sorted(self.results)})")
        row = self.results[task]
        for name in (metric, f"{metric},none"):
            if name in row and isinstance(row[name], (int, float)):
                return float(row[name])
        raise KeyError(f"task {task!r} has no metric {metric!r} (metrics: {sorted(metric_keys(row))})")

    def flat(self) -> dict[str, float]:
        """``{"task/metric,filter": value}`` for every numeric metric (no stderr, no counts)."""
        return {f"{t}/{k}": float(row[k]) for t, row in self.results.items() for k in metric_keys(row)}


def combine_scores(parts: Sequence[Scores]) -> Scores:
    """Scores of disjoint document subsets of the same tasks (racing's stages) as one: each
    task's outcomes concatenated and every per-document metric their mean (what lm-eval
    reports for them on those documents); seconds, tokens and timings summed. Metrics without
    per-document values cannot be combined and are left out."""
    outcomes: dict[str, dict[str, list[float]]] = {}
    docs: dict[str, list[int]] = {}
    timings: dict[str, float] = defaultdict(float)
    for part in parts:
        for task, row in part.outcomes.items():
            mine = outcomes.setdefault(task, {})
            for key, values in row.items():
                mine.setdefault(key, []).extend(values)
            docs.setdefault(task, []).extend(part.docs[task])
        for k, v in part.timings.items():
            timings[k] += v
    results = {task: {key: sum(v) / len(v) for key, v in row.items()} for task, row in outcomes.items()}
    return Scores(results, sum(p.seconds for p in parts), sum(p.tokens for p in parts), {}, dict(timings),
                  outcomes, docs)


def metric_keys(row: Mapping[str, Any]) -> list[str]:
    return [
        k for k, v in row.items()
        if "," in k and "_stderr," not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


def results_table(report: Mapping[str, Any]) -> str:
    """lm-eval's own results table (what ``lm_eval`` prints), groups below tasks if any."""
    from lm_eval.utils import make_table

    table = make_table(report)
    if report.get("groups"):
        table += "\n" + make_table(report, "groups")
    return table


def to_json(obj: Any) -> str:
    """lm-eval's own JSON encoding of results (numpy values, callables in configs)."""
    return json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False)


# ---------------------------------------------------------------------------- the evaluator
class Evaluator:
    """lm-eval tasks on one live model: built once, scored many times.

    Args:
        model: the live ``PreTrainedModel`` (merged into in place between calls), or a
            ``VLLMEngine`` (``evaluate/vllm_lm.py``) whose weights are written between calls.
        tokenizer: its tokenizer object (never loaded by name).
        tasks: lm-eval task, group or tag names: built-in ones and/or ones defined by YAMLs
            under ``include_path``.
        include_path: folder(s) of custom task YAMLs (the zoo's ``tasks/``). Only these are
            indexed when they define every task asked for.
        limit: documents per task, as lm-eval's ``--limit`` (an int, or a fraction < 1).
        limits: a limit per task, overriding ``limit`` for the tasks it names.
        samples: fixed document ids per task (``{task: [0, 3, 7]}``), as lm-eval's ``--samples``.
        split: score one side of each task's documents (``DocumentSplit``); a limit then takes
            a seeded subset of that side.
        num_fewshot: few-shot examples, as ``simple_evaluate`` applies it (a task whose YAML
            sets 0 keeps 0); the examples are drawn once, with ``fewshot_seed``.
        batch_size: sequences per forward pass.

    Bad input (an unknown task, an unreadable task YAML, a missing data file, an impossible
    limit or sample id) raises ``TaskError`` here, before any model work.

    Build it once the model is on its device: the weights may then change in place between
    calls (that is the point), its device, dtype and tokenizer may not.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[str],
        *,
        include_path: str | Path | Sequence[str | Path] | None = None,
        limit: float | None = None,
        limits: Mapping[str, float | None] | None = None,
        samples: Mapping[str, Sequence[int]] | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 64,
        fewshot_seed: int = FEWSHOT_SEED,
        split: DocumentSplit | None = None,
    ):
        names = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
        if not names:
            raise TaskError("no tasks given")
        if int(batch_size) < 1:
            raise FuseEvoError(f"batch_size must be >= 1, got {batch_size}")
        if num_fewshot is not None and num_fewshot < 0:
            raise FuseEvoError(f"num_fewshot must be >= 0, got {num_fewshot}")
        if include_path is None:
            paths: list[Path] = []
        elif isinstance(include_path, (str, Path)):
            paths = [Path(include_path)]
        else:
            paths = [Path(p) for p in include_path]
        paths = [p.expanduser().resolve() for p in paths]
        for p in paths:
            _check_task_dir(p)
        self.model = model
        self.tokenizer = tokenizer
        self.include_path = paths
        self.num_fewshot = num_fewshot
        self.batch_size = int(batch_size)
        self.fewshot_seed = fewshot_seed
        self.device = model.device if not isinstance(model, torch.nn.Module) else next(model.parameters()).device

        t0 = time.perf_counter()
        with _quiet_lm_eval(), _seeded(self.device):
            managers = _task_managers(paths, names)
            self.tasks: dict[str, Any] = {}
            self.groups: dict[str, Any] = {}
            for name in names:
                manager = managers[name]
                try:
                    loaded = manager.load([name])
                except FileNotFoundError as e:
                    raise TaskError(
                        f"task {name!r}{_task_file(manager, name)}: data file not found: {_error_text(e)}"
                    ) from None
                except Exception as e:
                    raise TaskError(
                        f"task {name!r}{_task_file(manager, name)} cannot be loaded: "
                        f"{type(e).__name__}: {_error_text(e)}"
                    ) from None
                self.tasks.update(loaded["tasks"])
                self.groups.update(loaded.get("groups") or {})
            self.split = split
            self._limits, self._samples = self._subsets(limit, limits, samples)
            for task_name, task in self.tasks.items():
                self._configure(task_name, task)
            self._build_requests(managers)
            # a VLLMEngine (evaluate/vllm_lm.py) brings its own lm-eval model; a torch model gets HFLM's
            self.lm = (_LiveLM(model, tokenizer, self.batch_size) if isinstance(model, torch.nn.Module)
                       else model.lm_eval_model(tokenizer, self.batch_size))
            for reqtype, reqs in self._requests.items():
                self.lm.prepare(reqtype, reqs)
        self.build_seconds = time.perf_counter() - t0

    @classmethod
    def from_config(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg) -> "Evaluator":
        """From an ``EvaluatorConfig`` (``fuse_evo.config``): the search side of its split."""
        return cls(
            model, tokenizer, list(cfg.tasks), include_path=list(cfg.include_path) or None,
            limit=cfg.limit, limits=dict(cfg.limits), samples={k: list(v) for k, v in cfg.samples.items()},
            num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, fewshot_seed=cfg.fewshot_seed,
            split=search_split(cfg),
        )

    # ---------------------------------------------------------------- construction
    def _subsets(self, limit, limits, samples) -> tuple[dict[str, int | None], dict[str, list[int] | None]]:
        samples, limits = dict(samples or {}), dict(limits or {})
        unknown = sorted((set(samples) | set(limits)) - set(self.tasks))
        if unknown:
            raise TaskError(f"limit/samples name task(s) {unknown} that are not being evaluated "
                            f"(tasks: {sorted(self.tasks)})")
        sizes: dict[str, int | None] = {}
        subsets: dict[str, list[int] | None] = {}
        for name, task in self.tasks.items():
            lim = limits.get(name, limit)
            ids = samples.get(name)
            if lim is not None and ids is not None:
                raise TaskError(f"task {name!r}: give either a limit or sample ids, not both")
            n_docs = len(task.eval_docs)
            if self.split is not None and self.split.applies(name):
                if ids is not None:
                    raise TaskError(f"task {name!r}: give either sample ids or a split, not both")
                ids = self.split.ids(name, n_docs)
                if lim is not None:
                    if not lim > 0:
                        raise TaskError(f"task {name!r}: limit must be > 0, got {lim}")
                    ids = ids[:int(math.ceil(lim * len(ids))) if lim < 1 else int(lim)]
                sizes[name], subsets[name] = None, sorted(ids)
                continue
            if lim is not None:
                if not lim > 0:
                    raise TaskError(f"task {name!r}: limit must be > 0, got {lim}")
                lim = get_sample_size(task, lim)
            if ids is not None:
                ids = sorted({int(i) for i in ids})
                bad = [i for i in ids if not 0 <= i < n_docs]
                if not ids or bad:
                    raise TaskError(
                        f"task {name!r}: sample ids {bad or 'none'} are not in 0..{n_docs - 1}"
                    )
            sizes[name], subsets[name] = lim, ids
        return sizes, subsets

    def _configure(self, name: str, task) -> None:
        """Few-shot settings exactly as simple_evaluate applies them."""
        if self.num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=self.fewshot_seed)
        if getattr(task, "UNSAFE_CODE", False) or getattr(task, "MULTIMODAL", False):
            raise TaskError(f"task {name!r} needs unsafe code execution or a multimodal model: not supported")

    def _build_requests(self, managers: dict[str, TaskManager]) -> None:
        self._docs: dict[str, list[tuple[int, Any]]] = {}
        self._by_doc: dict[str, dict[int, list[Any]]] = {}
        requests: dict[str, list[Any]] = defaultdict(list)
        for name, task in self.tasks.items():
            try:
                task.build_all_requests(
                    limit=self._limits[name], samples=self._samples[name], rank=0, world_size=1,
                    cache_requests=False,
                )
                docs = list(task.doc_iterator(rank=0, limit=self._limits[name], world_size=1,
                                              samples=self._samples[name]))
            except Exception as e:
                where = next((_task_file(m, name) for m in managers.values() if name in m.task_index), "")
                raise TaskError(
                    f"task {name!r}{where}: its requests cannot be built: "
                    f"{type(e).__name__}: {_error_text(e)}"
                ) from None
            by_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:
                by_doc[inst.doc_id].append(inst)
                requests[inst.request_type].extend([inst] * inst.repeats)
            for insts in by_doc.values():
                insts.sort(key=lambda x: x.idx)
            self._docs[name], self._by_doc[name] = docs, by_doc
            _memoize_doc_fields(task, [doc for _, doc in docs])
        self._requests = dict(requests)
        self._instances = [inst for t in self.tasks.values() for inst in t.instances]

    # ---------------------------------------------------------------- properties
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def output_types(self) -> dict[str, str]:
        return {n: t.get_config("output_type") for n, t in self.tasks.items()}

    @property
    def n_docs(self) -> dict[str, int]:
        return {n: len(d) for n, d in self._docs.items()}

    @property
    def doc_ids(self) -> dict[str, list[int]]:
        """The dataset index of every scored document, per task (lm-eval numbers the documents
        of a ``samples`` subset 0..k-1 internally; its logged samples use these ids)."""
        return {n: list(self._samples[n]) if self._samples[n] is not None else [i for i, _ in d]
                for n, d in self._docs.items()}

    def metric_names(self) -> dict[str, list[str]]:
        """``{task: ["acc,none", ...]}``: the metric keys each task reports."""
        out = {}
        for name, task in self.tasks.items():
            filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
            out[name] = [f"{m},{f}" for f in filters for m in task.aggregation()]
        return out

    def averaged_metrics(self) -> dict[str, list[str]]:
        """``{task: ["acc,none", ...]}``: the metrics lm-eval averages over documents, which
        have per-document outcomes (``Scores.outcomes``)."""
        from lm_eval.api.metrics import mean

        return {task: [k for k in keys if self.tasks[task].aggregation().get(k.split(",")[0]) is mean]
                for task, keys in self.metric_names().items()}

    def token_sequences(self) -> list[list[int]]:
        """What the model reads per call: every distinct loglikelihood input, and every
        generation prompt with the tokens generated for it in the latest call."""
        return self.lm.token_sequences()

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, subset: Mapping[str, Sequence[int]] | None = None) -> Scores:
        """Score the model's current weights: the model work and lm-eval's metrics, nothing else.

        ``subset``: ``{task: positions}`` (0..n_docs-1, into the task's scored documents):
        only their requests run and the metrics cover them only; a task not named is not
        scored. None: every document."""
        t0 = time.perf_counter()
        self.lm.tokens = 0
        chosen, requests = self._select(subset)
        with _quiet_lm_eval(), _seeded(self.device):
            for inst in self._instances:
                inst.resps = []
                inst.filtered_resps = {}
            timings = {}
            for reqtype, reqs in requests.items():
                t1 = time.perf_counter()
                for x, req in zip(getattr(self.lm, reqtype)(reqs) if reqs else [], reqs, strict=True):
                    req.resps.append(x)
                timings[reqtype] = time.perf_counter() - t1
            t1 = time.perf_counter()
            acc, outcomes, docs = {}, {}, {}
            for name, positions in chosen.items():
                task, by_doc, all_docs = self.tasks[name], self._by_doc[name], self._docs[name]
                scored = all_docs if positions is None else [all_docs[i] for i in positions]
                if positions is None:
                    task.apply_filters()
                else:  # lm-eval's apply_filters, on the scored documents' instances only
                    insts = [inst for doc_id, _ in scored for inst in by_doc[doc_id]]
                    for f in getattr(task, "_filters", []):
                        f.apply(insts)
                raw: dict[tuple[str, str], list] = defaultdict(list)
                for filter_key in by_doc[scored[0][0]][0].filtered_resps:
                    for doc_id, doc in scored:
                        reqs = by_doc[doc_id]
                        metrics = task.process_results(doc, [r.filtered_resps[filter_key] for r in reqs])
                        for metric, value in metrics.items():
                            raw[(metric, filter_key)].append(value)
                acc[name] = {"task": task, "raw_metrics": raw, "logged_samples": []}
                outcomes[name] = _per_document(task, raw)
                ids = self.doc_ids[name]
                docs[name] = ids if positions is None else [ids[i] for i in positions]
            report = _process_results(acc, self.groups, bootstrap_iters=0)._to_eval_results()
            timings["metrics"] = time.perf_counter() - t1
        return Scores(report["results"], time.perf_counter() - t0, self.lm.tokens, report, timings, outcomes, docs)

    def _select(self, subset: Mapping[str, Sequence[int]] | None
                ) -> tuple[dict[str, list[int] | None], dict[str, list]]:
        """({task: sorted positions, or None for all}, {request type: the requests to run})."""
        if subset is None:
            return {name: None for name in self.tasks}, self._requests
        chosen: dict[str, list[int] | None] = {}
        for name, positions in subset.items():
            if name not in self.tasks:
                raise TaskError(f"subset names task {name!r}, which is not being evaluated "
                                f"(tasks: {sorted(self.tasks)})")
            n = len(self._docs[name])
            picked = sorted({int(i) for i in positions})
            if not picked or not 0 <= picked[0] <= picked[-1] < n:
                raise TaskError(f"task {name!r}: subset positions must be in 0..{n - 1}, got "
                                f"{picked[:3] if picked else 'none'}")
            chosen[name] = picked
        keep = {id(inst) for name, picked in chosen.items() for i in picked
                for inst in self._by_doc[name][self._docs[name][i][0]]}
        return chosen, {t: [r for r in reqs if id(r) in keep] for t, reqs in self._requests.items()}

    def lm_eval_report(self, scores: Scores, model_name: str = "") -> dict[str, Any]:
        """The results file ``lm_eval --output_path`` writes: results, configs, n-shot, ..."""
        out = dict(scores.report)
        if isinstance(self.model, torch.nn.Module):
            params, dtype = sum(p.numel() for p in self.model.parameters()), next(self.model.parameters()).dtype
        else:  # a VLLMEngine
            params, dtype = self.model.num_parameters, self.model.dtype
        out["config"] = {
            "model": model_name or getattr(self.model.config, "_name_or_path", type(self.model).__name__),
            "model_num_parameters": params,
            "model_dtype": str(dtype),
            "backend": "hf" if isinstance(self.model, torch.nn.Module) else "vllm",
            "batch_size": self.batch_size,
            "device": str(self.device),
            "limit": {n: v for n, v in self._limits.items() if v is not None} or None,
            "samples": {n: v for n, v in self._samples.items() if v is not None} or None,
            "num_fewshot": self.num_fewshot,
            "bootstrap_iters": 0,
            "random_seed": RANDOM_SEED,
            "numpy_seed": NUMPY_SEED,
            "torch_seed": TORCH_SEED,
            "fewshot_seed": self.fewshot_seed,
            "include_path": [str(p) for p in self.include_path],
        }
        out["lm_eval_version"] = getattr(lm_eval, "__version__", None)
        return out


_NUMBER = (bool, int, float, np.number, np.bool_)


def _per_document(task, raw: Mapping[tuple[str, str], list]) -> dict[str, list[float]]:
    """``{"metric,filter": [value per document]}`` for the metrics lm-eval aggregates by their
    mean with numeric values per document (their mean is the reported metric); corpus-level
    metrics (bleu, f1 over the corpus, ...) have no per-document value and are left out."""
    from lm_eval.api.metrics import mean

    aggregation = task.aggregation()
    out = {}
    for (metric, filter_key), values in raw.items():
        if aggregation.get(metric) is mean and all(isinstance(v, _NUMBER) for v in values):
            out[f"{metric},{filter_key}"] = [float(v) for v in values]
    return out


def _memoize_doc_fields(task, docs: list[Any]) -> None:
    """Answer ``doc_to_target(doc)`` / ``doc_to_choice(doc)`` for the scored documents from a
    table built once. ``process_results`` calls them for every document on every call, and
    a template field (``"{{answer}}"``) is compiled by Jinja afresh each time (lm-eval's
    ``apply_template`` uses ``Environment.from_string``, which does not cache). The values are
    the functions' own; calls with other documents or arguments go to the functions."""
    for field in ("doc_to_target", "doc_to_choice"):
        if field == "doc_to_choice" and task.get_config("doc_to_choice") is None:
            continue
        function = getattr(task, field)
        table = {id(doc): function(doc) for doc in docs}

        def lookup(doc, *args, _function=function, _table=table, **kwargs):
            if args or kwargs or id(doc) not in _table:
                return _function(doc, *args, **kwargs)
            return _table[id(doc)]

        setattr(task, field, lookup)


# ---------------------------------------------------------------------------- the model side
@dataclasses.dataclass
class _LLBatch:
    inputs: torch.Tensor  # [B, P] right-padded token ids (HFLM's pad_and_concat: zeros)
    rows: torch.Tensor  # [N] row of each scored continuation token
    pos: torch.Tensor  # [N] position whose logits predict it (into ``keep`` when it is given)
    toks: torch.Tensor  # [N] the continuation token
    by_len: list[tuple[torch.Tensor, torch.Tensor]]  # ([R_n, n] indices into N, [R_n] request ids)
    lengths: torch.Tensor  # [B] unpadded input lengths
    n_tokens: int = 0
    keep: torch.Tensor | None = None  # [K] the positions whose logits are computed (None: all)


@dataclasses.dataclass
class _GenBatch:
    requests: list[int]
    ids: torch.Tensor  # [B, T] left-padded
    mask: torch.Tensor | None  # None when nothing is padded (as generate drops an all-ones mask)
    pos: torch.Tensor  # [B, T]
    until: list[str]
    max_gen_toks: int
    generated: list[list[int]] = dataclasses.field(default_factory=list)


class PlanCache:
    """Request plans (token ids, batches) built once per request list, keyed by the requests'
    identity, which the cache holds alive; shared by both backends' lm-eval models."""

    MAX_PLANS = 16  # the whole split and a few subsets (racing's stages) per request type

    def _plan(self, kind: str, requests: list, build) -> Any:
        key = (kind, len(requests), tuple(map(id, requests)))
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            hit = self._plans[key] = (list(requests), build(requests))
        return hit[1]


class _LiveLM(PlanCache, HFLM):
    """HFLM on a live model whose request batches are built once and reused on every call.

    ``loglikelihood`` and greedy ``generate_until`` keep a plan per request list (keyed by the
    requests' identity, which the plan holds alive): token ids, padded batch tensors and the
    gather indices of every continuation token. A call then costs the forward passes and a few
    vectorized ops per batch. Batches are HFLM's: same sort order, same grouping of requests
    that share an input (its logits cache), same batch size, same right padding and left
    truncation, so the model computes on the same tensors as under ``simple_evaluate``.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self._plans: dict[tuple, tuple[list, Any]] = {}
        self._last_gen: list[_GenBatch] = []
        self.tokens = 0  # tokens read or generated on the fast paths since last reset

    # ---------------------------------------------------------------- plans
    def prepare(self, reqtype: str, requests: list) -> None:
        """Build the plan for ``requests`` now (tokenization and batching), not on first call."""
        if reqtype == "loglikelihood" and self._fast_loglikelihood():
            self._plan("loglikelihood", requests, self._build_ll)
        elif reqtype == "generate_until" and self._fast_generation():
            self._plan("generate_until", requests, self._build_gen)

    def token_sequences(self) -> list[list[int]]:
        seqs: list[list[int]] = []
        for (kind, *_), (_, plan) in self._plans.items():
            if kind == "loglikelihood" and plan is not None:
                for b in plan[1]:
                    seqs += [row[: int(n)] for row, n in zip(b.inputs.tolist(), b.lengths.tolist())]
        for b in self._last_gen:
            ids = b.ids.tolist()
            mask = b.mask.tolist() if b.mask is not None else [[1] * len(r) for r in ids]
            for row, m, gen in zip(ids, mask, b.generated):
                seqs.append([t for t, keep in zip(row, m) if keep] + gen)
        return seqs

    # ---------------------------------------------------------------- loglikelihood
    def _fast_loglikelihood(self) -> bool:
        return self.backend == "causal" and not self.enable_thinking and self.mixed_precision_dtype is None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if not self._fast_loglikelihood():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        n, batches = self._plan("loglikelihood", requests, self._build_ll)
        return self._run_ll(n, batches)

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """TemplateLM.loglikelihood's tokenization of one request, verbatim."""
        if context == "":
            continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != continuation_enc[0]:
                return [self.prefix_token_id], continuation_enc
            return continuation_enc[:1], continuation_enc[1:]
        return self._encode_pair(context, continuation)

    def _build_ll(self, requests) -> tuple[int, list[_LLBatch]]:
        enc = [self._encode(*req.args) for req in requests]
        # HFLM's logits cache: requests whose inputs (context + continuation[:-1]) are equal
        # share one forward row; the group's representative is its longest continuation
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(enc):
            key = tuple(ctx + cont[:-1]) if self.logits_cache else (i,)
            groups.setdefault(key, []).append(i)
        reps = [(max(members, key=lambda i: len(enc[i][1])), members) for members in groups.values()]
        reps.sort(key=lambda rm: (-len(enc[rm[0]][0] + enc[rm[0]][1]), tuple(enc[rm[0]][0] + enc[rm[0]][1])))
        limit = self.max_length
        batches = []
        for start in range(0, len(reps), self.batch_size):
            chunk = reps[start : start + self.batch_size]
            inps = []
            for rep, _ in chunk:
                ctx, cont = enc[rep]
                if not ctx or not cont or len(cont) > limit:
                    raise FuseEvoError(f"request {requests[rep].args!r}: empty or over-long encoding")
                inps.append((ctx + cont)[-(limit + 1):][:-1])
            width = max(len(x) for x in inps)
            inputs = torch.zeros(len(inps), width, dtype=torch.long)
            rows, pos, toks, owner = [], [], [], []
            for b, ((_, members), inp) in enumerate(zip(chunk, inps)):
                inputs[b, : len(inp)] = torch.tensor(inp)
                for r in members:
                    cont = enc[r][1]
                    start_pos = len(inp) - len(cont)
                    rows += [b] * len(cont)
                    pos += range(start_pos, len(inp))
                    toks += cont
                    owner += [r] * len(cont)
            by_n: dict[int, list[int]] = defaultdict(list)
            for r in dict.fromkeys(owner):
                by_n[len(enc[r][1])].append(r)
            first = {}
            for k, r in enumerate(owner):
                first.setdefault(r, k)
            by_len = [
                (torch.tensor([[first[r] + j for j in range(n)] for r in rs]), torch.tensor(rs))
                for n, rs in sorted(by_n.items())
            ]
            keep = None
            if self._keeps_logits:  # the vocabulary's logits at the scored positions only
                kept = sorted(set(pos))
                at = {q: k for k, q in enumerate(kept)}
                keep, pos = torch.tensor(kept), [at[q] for q in pos]
            batches.append(self._to_device(_LLBatch(
                inputs, torch.tensor(rows), torch.tensor(pos), torch.tensor(toks), by_len,
                torch.tensor([len(x) for x in inps]), sum(len(x) for x in inps), keep,
            )))
        return len(requests), batches

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        """Whether the model computes logits at chosen positions only (``logits_to_keep``, as
        ``generate`` asks for its last one): a request's scored positions are its continuation's
        few tokens, and [batch, length, vocabulary] logits are most of a forward pass's memory
        (8 x 2048 x 128256 fp32 = 8.4 GB for Llama 3)."""
        return bool(getattr(self.model, "_supports_logits_to_keep", lambda: False)())

    def _to_device(self, batch):
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, torch.Tensor):
                setattr(batch, f.name, value.to(self.device))
        if isinstance(batch, _LLBatch):
            batch.by_len = [(i.to(self.device), r.to(self.device)) for i, r in batch.by_len]
        return batch

    def _logits(self, b: _LLBatch) -> torch.Tensor:
        if b.keep is None:
            return self._model_call(b.inputs)
        with torch.no_grad():
            return self.model(b.inputs, logits_to_keep=b.keep).logits

    def _run_ll(self, n: int, batches: list[_LLBatch]) -> list[tuple[float, bool]]:
        lls = greedy = None
        for b in batches:
            self.tokens += b.n_tokens
            logits = self._logits(b)  # [B, P or K, V]
            # log-softmax only where a continuation token is scored: a row-wise op, so the
            # values are those of HFLM's log-softmax over the whole batch
            scored = F.log_softmax(logits[b.rows, b.pos], dim=-1, dtype=self.softmax_dtype)
            tok_lp = scored.gather(1, b.toks[:, None]).squeeze(1)
            is_greedy = scored.argmax(dim=-1) == b.toks
            if lls is None:
                lls = torch.empty(n, dtype=tok_lp.dtype, device=tok_lp.device)
                greedy = torch.empty(n, dtype=torch.bool, device=tok_lp.device)
            for idx, rs in b.by_len:  # per continuation length: HFLM's per-request sum
                lls[rs] = tok_lp[idx].sum(dim=1)
                greedy[rs] = is_greedy[idx].all(dim=1)
        if lls is None:
            return []
        bad = int((~torch.isfinite(lls)).sum())
        if bad:
            raise NonFiniteOutputs(f"the model's log-likelihoods are not finite (inf or nan) for {bad} of {n} "
                                   "requests: its weights or activations overflow")
        return list(zip(lls.tolist(), greedy.tolist()))

    # ---------------------------------------------------------------- generation
    _SAFE_GENERATION_CONFIG = {
        "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
        "transformers_version", "_from_model_config", "output_attentions", "output_hidden_states",
        "return_dict_in_generate", "do_sample", "temperature", "top_k", "top_p", "max_length",
        "max_new_tokens",
    }

    def _fast_generation(self) -> bool:
        config = getattr(self.model, "generation_config", None)
        if (
            self.backend != "causal" or config is None or config.eos_token_id is None
            or self.think_end_token is not None or self.mixed_precision_dtype is not None
            or self.tokenizer.pad_token_id is None
        ):
            return False
        return set(config.to_diff_dict()) <= self._SAFE_GENERATION_CONFIG

    @staticmethod
    def _greedy(gen_kwargs: dict) -> bool:
        extra = set(gen_kwargs) - {"until", "max_gen_toks", "do_sample", "temperature"}
        return not extra and gen_kwargs.get("do_sample") is False and not gen_kwargs.get("temperature")

    def generate_until(self, requests, disable_tqdm: bool = False):
        if not self._fast_generation():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        plan = self._plan("generate_until", requests, self._build_gen)
        if plan is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        return self._run_gen(len(requests), plan)

    def _build_gen(self, requests) -> list[_GenBatch] | None:
        """HFLM.generate_until's batches: grouped by gen kwargs, longest prompt first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        batches = []
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            if not self._greedy(kwargs):
                return None
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                return None
            members = sorted(members, key=lambda i: (-len(self.tok_encode(requests[i].args[0])), requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                ids, mask = self.tok_batch_encode(
                    [requests[i].args[0] for i in chunk], left_truncate_len=max_ctx_len,
                    truncation=self.truncation,
                )
                pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                batches.append(self._to_device(_GenBatch(
                    chunk, ids, None if bool((mask == 1).all()) else mask, pos, until, max_gen_toks,
                )))
        return batches

    def _run_gen(self, n: int, batches: list[_GenBatch]) -> list[str]:
        """Greedy decoding as ``model.generate`` does it, without its per-step machinery.

        Rows that produced EOS continue with the pad token (generate's EOS criterion); the
        batch stops once every row has produced EOS or a token holding a stop string. The text
        is decoded and cut at the stop strings exactly as HFLM does.
        """
        model = self.model
        eos_ids = self.model.generation_config.eos_token_id
        eos = torch.tensor(eos_ids if isinstance(eos_ids, list) else [eos_ids], device=self.device)
        pad = self.tokenizer.pad_token_id
        keep_one = self._keeps_logits  # the last position's logits, as generate() asks
        out: list[str | None] = [None] * n
        for b in batches:
            stops = {}  # token id -> does its text contain a stop string
            kwargs = {"logits_to_keep": 1} if keep_one else {}
            res = model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.pos, use_cache=True, **kwargs)
            past, mask, pos = res.past_key_values, b.mask, b.pos[:, -1:]
            done = torch.zeros(b.ids.shape[0], dtype=torch.bool, device=self.device)
            stopped = [False] * b.ids.shape[0]
            steps = []
            for step in range(b.max_gen_toks):
                nxt = res.logits[:, -1].float().argmax(dim=-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                steps.append(nxt)
                done |= torch.isin(nxt, eos)
                for row, tok in enumerate(nxt.tolist()):
                    if tok not in stops:
                        text = self.tokenizer.decode([tok], skip_special_tokens=False)
                        stops[tok] = any(s and s in text for s in b.until)
                    stopped[row] = stopped[row] or stops[tok]
                if step + 1 == b.max_gen_toks or all(stopped) or bool(done.all()):
                    break
                pos = pos + 1
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                            past_key_values=past, use_cache=True, **kwargs)
                past = res.past_key_values
            b.generated = torch.stack(steps, dim=1).tolist()
            self.tokens += (b.ids.numel() if b.mask is None else int(b.mask.sum())) + len(steps) * len(b.requests)
            for i, toks in zip(b.requests, b.generated):
                out[i] = postprocess_generated_text(self.tok_decode(toks), stop=b.until, think_end_token=None)
        self._last_gen = batches
        return out


# ---------------------------------------------------------------------------- reference path
def simple_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` (``{task: {"acc,none": ...}}``) for a live model object.

    The reference path: ``lm_eval.simple_evaluate`` with everything rebuilt per call. The
    tokenizer object is always passed, or HFLM would try to load one by name; with an
    ``include_path`` only that directory is indexed (the ~15k default task files are not).
    """
    if include_path is not None:
        include_path = str(Path(include_path).resolve())
        manager = TaskManager(include_path=include_path, include_defaults=False)
    else:
        manager = TaskManager()
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise FuseEvoError(
            f"unknown lm-eval task(s) {missing}"
            + (f" in {include_path}" if include_path else "")
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=0,
        use_cache=None,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return out["results"]
