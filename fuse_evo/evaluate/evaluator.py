"""The only module that imports lm-eval.

For now it scores a live model with ``lm_eval.simple_evaluate`` over tasks found in local
task directories (the zoo's, or a user's); the built-once evaluator of the search replaces the
per-call rebuild here without changing what it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import FuseEvoError


def simple_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` (``{task: {"acc,none": ...}}``) for a live model object.

    The tokenizer object is always passed, or HFLM would try to load one by name; with an
    ``include_path`` only that directory is indexed (the ~15k default task files are not).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

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
