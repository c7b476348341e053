"""lm-eval task files for the zoo's skills: JSONL data and task YAMLs with absolute data paths.

lm-eval resolves a relative ``data_files`` path against the working directory, not the YAML
file, so every path written here is absolute. Each skill gets a search split and a disjoint
held-out split as loglikelihood (exact match) tasks; one skill is also written as a
``generate_until`` task so generation is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

from .skills import Example, choices


def task_name(skill: str, split: str, generate: bool = False, mc: bool = False) -> str:
    return f"zoo_{skill}{'_gen' if generate else ''}{'_mc' if mc else ''}_{split}"


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"id": i, "prompt": ex.prompt, "answer": ex.answer}) + "\n")


def _write_mc_jsonl(path: Path, skill: str, examples: list[Example]) -> None:
    with path.open("w") as f:
        for i, ex in enumerate(examples):
            options, gold = choices(skill, ex, i)
            row = {"id": i, "prompt": ex.prompt, "answer": ex.answer, "choices": options, "gold": gold}
            f.write(json.dumps(row) + "\n")


def _task_yaml(
    name: str, data: Path, output_type: str, metric: str | tuple[str, ...], extra: str = "",
    target: str = '"{{answer}}"',
) -> str:
    # The prompt ends with the space before the answer and the delimiter is empty. lm-eval
    # moves a context's trailing whitespace into a loglikelihood continuation, so it scores
    # " " + answer, exactly what the models were trained on (lm-eval 0.4.10+ no longer adds
    # target_delimiter to loglikelihood continuations); generation starts after that space.
    # Multiple-choice continuations are target_delimiter + choice, so " " + choice as well.
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
        for m in ((metric,) if isinstance(metric, str) else metric)
    )
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{prompt}}}} "
doc_to_target: {target}
target_delimiter: ""
{extra}metric_list:
{metrics}metadata:
  version: 1.0
"""


def _loglikelihood_yaml(name: str, data: Path) -> str:
    return _task_yaml(name, data, "loglikelihood", "acc")


def _generate_yaml(name: str, data: Path, max_answer_chars: int) -> str:
    # greedy decoding that stops at EOS (lm-eval adds the tokenizer's EOS to the stop list)
    extra = (
        "generation_kwargs:\n"
        '  until: ["\\n"]\n'
        f"  max_gen_toks: {max_answer_chars + 2}\n"
        "  do_sample: false\n"
    )
    return _task_yaml(name, data, "generate_until", "exact_match", extra)


def _multiple_choice_yaml(name: str, data: Path) -> str:
    # choices and the gold index are data fields: lm-eval reads them without a template
    return _task_yaml(
        name, data, "multiple_choice", ("acc", "acc_norm"), "doc_to_choice: choices\n", target="gold"
    )


def write_tasks(
    task_dir: Path,
    splits: dict[str, dict[str, list[Example]]],
    generation_skill: str | None,
) -> dict[str, dict[str, str]]:
    """Write data and YAMLs under ``task_dir``; return ``{skill: {"search": name, ...}}``.

    Keys per skill: ``search``, ``heldout`` (loglikelihood), ``mc_search``, ``mc_heldout``
    (multiple choice) and, for the generation skill, ``generate_search``, ``generate_heldout``.
    """
    task_dir = task_dir.resolve()
    data_dir = task_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, dict[str, str]] = {}
    for skill, by_split in splits.items():
        names[skill] = {}
        for split, examples in by_split.items():
            data = data_dir / f"{skill}_{split}.jsonl"
            _write_jsonl(data, examples)
            name = task_name(skill, split)
            (task_dir / f"{name}.yaml").write_text(_loglikelihood_yaml(name, data))
            names[skill][split] = name
            mc_data = data_dir / f"{skill}_{split}_mc.jsonl"
            _write_mc_jsonl(mc_data, skill, examples)
            mc = task_name(skill, split, mc=True)
            (task_dir / f"{mc}.yaml").write_text(_multiple_choice_yaml(mc, mc_data))
            names[skill][f"mc_{split}"] = mc
            if skill == generation_skill:
                gen = task_name(skill, split, generate=True)
                longest = max(len(ex.answer) for ex in examples)
                (task_dir / f"{gen}.yaml").write_text(_generate_yaml(gen, data, longest))
                names[skill][f"generate_{split}"] = gen
    return names
