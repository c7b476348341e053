"""``fuse-evo eval``: score a Hugging Face model folder with lm-eval tasks, as the search does.

The command builds the same ``Evaluator`` a search worker builds, so its numbers are the ones
the search archives for the same model; its flags mean what they mean in ``lm_eval`` and its
JSON has the shape of ``lm_eval --output_path``'s results file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ..config import EvaluatorConfig, check_backend
from ..device import check_device
from ..errors import FuseEvoError
from ..files import atomic_write


def load_model(ref: str | Path, device: str | None = None):
    """A causal LM and its tokenizer from a folder (or hub id), safetensors weights only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..models import resolve

    folder = resolve("model", ref)
    if not (folder / "config.json").exists():
        raise FuseEvoError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FuseEvoError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise FuseEvoError(f"{folder}: the model cannot be loaded: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def parse_samples(text: str | None) -> dict[str, list[int]] | None:
    """lm-eval's ``--samples``: a JSON object ``{task: [ids]}``, inline or in a file."""
    if not text:
        return None
    path = Path(text)
    raw = path.read_text() if path.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FuseEvoError(f"--samples: not a JSON object {{task: [ids]}} nor a file holding one ({e})") from None
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(isinstance(i, int) for i in v) for v in value.values()
    ):
        raise FuseEvoError('--samples: expected {"task": [0, 1, ...], ...}')
    return value


def output_file(path: str | Path) -> Path:
    """``OUT.json`` as given; a folder gets ``results.json`` inside it."""
    path = Path(path).expanduser()
    return path if path.suffix == ".json" else path / "results.json"


def evaluate_folder(
    model_ref: str | Path,
    tasks: Sequence[str],
    include_path: Sequence[str | Path] | None = None,
    limit: float | None = None,
    samples: dict[str, list[int]] | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    output_path: str | Path | None = None,
    backend: str = "hf",
    max_model_len: int | None = 2048,
) -> dict[str, Any]:
    """Score a model folder; return (and optionally write) the lm-eval-shaped results.
    ``backend``: hf (the torch model through HFLM) or vllm (a vLLM engine on the folder)."""
    from .evaluator import Evaluator, to_json

    check_device(device, "--device")
    if max_model_len is not None and max_model_len < 2:
        raise FuseEvoError(f"--max_model_len {max_model_len}: must be at least 2 tokens")
    check_backend(EvaluatorConfig(backend=backend), option="--backend")
    if limit is not None and not limit > 0:
        raise FuseEvoError(f"--limit {limit:g}: must be > 0 (documents per task, or a fraction of them below 1)")
    out = output_file(output_path) if output_path else None
    if out is not None and out.parent.exists() and not os.access(out.parent, os.W_OK):
        raise FuseEvoError(f"--output_path {out}: {out.parent} is not writable")
    if backend == "vllm":
        from transformers import AutoTokenizer

        from ..models import resolve
        from .vllm_lm import VLLMEngine

        folder = resolve("model", model_ref)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = VLLMEngine(folder, max_model_len=max_model_len, device=device)
    else:
        model, tokenizer = load_model(model_ref, device)
    evaluator = Evaluator(
        model, tokenizer, tasks, include_path=include_path or None, limit=limit, samples=samples,
        num_fewshot=num_fewshot, batch_size=batch_size,
    )
    scores = evaluator.score()
    report = evaluator.lm_eval_report(scores, model_name=str(model_ref))
    report["timing"] = {"build_seconds": round(evaluator.build_seconds + getattr(model, "start_seconds", 0.0), 3),
                        "score_seconds": round(scores.seconds, 3), "tokens": scores.tokens}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, to_json(report))
    return report


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fuse-evo eval",
        description="Score a Hugging Face model folder (a zoo model, an exported merge) with lm-eval "
        "tasks, with the search's evaluator. Flags mean what they mean in `lm_eval`.",
    )
    parser.add_argument("model", help="model folder (or hub id)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--include_path", action="append", default=[],
                        help="folder of custom task YAMLs (repeatable)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (a fraction of each task if < 1)")
    parser.add_argument("--samples", default=None,
                        help='fixed document ids per task: JSON {"task": [ids]} or a file holding it')
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--batch_size", default="64", help="sequences per forward pass (an integer)")
    parser.add_argument("--output_path", default=None, help="results JSON (OUT.json, or a folder)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--backend", default="hf", help="hf (transformers, the default) or vllm")
    parser.add_argument("--max_model_len", type=int, default=2048,
                        help="vllm: the longest prompt + generation the engine serves")
    args = parser.parse_args(argv)
    try:
        batch_size = int(args.batch_size)
    except ValueError:
        raise FuseEvoError(f"--batch_size: {args.batch_size!r} is not an integer (auto is not supported)") from None
    if args.limit is not None and args.samples:
        raise FuseEvoError("--limit and --samples cannot be used together")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise FuseEvoError("--tasks: give at least one task name")
    from .evaluator import results_table

    report = evaluate_folder(
        args.model, tasks, include_path=args.include_path, limit=args.limit,
        samples=parse_samples(args.samples), num_fewshot=args.num_fewshot, batch_size=batch_size,
        device=args.device, output_path=args.output_path, backend=args.backend, max_model_len=args.max_model_len,
    )
    print(results_table(report))
    t = report["timing"]
    print(f"built in {t['build_seconds']:.2f} s, scored in {t['score_seconds']:.2f} s "
          f"({report['config']['device']}, {args.backend} backend, batch size {batch_size})", file=sys.stderr)
    if args.output_path:
        print(f"results written to {output_file(args.output_path)}", file=sys.stderr)
    return 0
