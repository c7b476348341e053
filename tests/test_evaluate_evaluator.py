"""The Evaluator on micro zoo models: lm-eval's numbers, built once, no stale state, bad input.

Every comparison is against ``lm_eval.simple_evaluate`` run on the same model object and the
same documents, on the zoo's real task files (a loglikelihood, a multiple-choice and a
generate_until task).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse_evo.errors import FuseEvoError
from fuse_evo.evaluate.evaluator import Evaluator, NonFiniteOutputs, TaskError
from fuse_evo.evaluate.objectives import Objectives, measure_costs


def _load(zoo, name):
    path = zoo["models"][name]["path"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _tasks(zoo):
    inc, rev = zoo["tasks"]["increment"], zoo["tasks"]["reverse"]
    return {"loglikelihood": inc["search"], "multiple_choice": rev["mc_search"],
            "generate_until": inc["generate_search"]}


def _reference(model, tok, zoo, tasks, **kwargs):
    """simple_evaluate as a careful user calls it: prebuilt TaskManager, HFLM on the model."""
    manager = TaskManager(include_path=zoo["task_dir"], include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=64)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                   bootstrap_iters=0, log_samples=True, **kwargs)


def _metrics(results):
    return {(t, k): v for t, row in results.items() for k, v in row.items()
            if "," in k and "_stderr" not in k}


def _responses(evaluator):
    """``{(task, dataset doc id, request idx): response}`` of the latest call."""
    ids = evaluator.doc_ids
    return {(name, ids[name][inst.doc_id], inst.idx): inst.resps[0]
            for name, task in evaluator.tasks.items() for inst in task.instances}


def _assert_same_responses(evaluator, reference):
    ours = _responses(evaluator)
    n = 0
    for name, samples in reference["samples"].items():
        for sample in samples:
            for i, resp in enumerate(sample["resps"]):
                mine = ours[(name, sample["doc_id"], i)]
                if isinstance(resp[0], str):  # generation: the same text
                    assert mine == resp[0], (name, sample["doc_id"])
                else:  # (loglikelihood, is_greedy): HFLM's very batches, so the very same floats
                    assert mine == tuple(resp[0]), (name, sample["doc_id"], i)
                n += 1
    assert n == sum(len(t.instances) for t in evaluator.tasks.values())


class _Forwards:
    """Counts forward passes of a model (a hook on the real module, no mock)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.n += 1


def test_equals_simple_evaluate_on_all_three_task_kinds(micro_zoo):
    model, tok = _load(micro_zoo, "base")
    tasks = _tasks(micro_zoo)
    ev = Evaluator(model, tok, list(tasks.values()), include_path=micro_zoo["task_dir"])
    assert ev.output_types == {name: kind for kind, name in tasks.items()}
    scores = ev.score()
    ref = _reference(model, tok, micro_zoo, tasks.values())
    assert _metrics(scores.results) == _metrics(ref["results"])
    assert set(scores.flat()) == {
        f"{tasks['loglikelihood']}/acc,none", f"{tasks['multiple_choice']}/acc,none",
        f"{tasks['multiple_choice']}/acc_norm,none", f"{tasks['generate_until']}/exact_match,none",
    }
    _assert_same_responses(ev, ref)
    # the numbers are not trivially 0 or 1: the comparison could have failed
    assert 0 < scores[f"{tasks['loglikelihood']}/acc"] < 1
    assert scores.report["n-samples"] == ref["n-samples"]


def test_loglikelihood_computes_the_vocabulary_logits_at_scored_positions_only(micro_zoo):
    """[batch, length, vocab] logits are most of a forward pass's memory at LLM size: the
    evaluator asks the model for the continuations' positions only, and the log-likelihoods
    stay HFLM's very floats (the parity tests) for far fewer logits."""
    model, tok = _load(micro_zoo, "base")
    tasks = _tasks(micro_zoo)
    names = [tasks["loglikelihood"], tasks["multiple_choice"]]
    shapes = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append((kwargs.get("input_ids", args[0] if args else None).shape,
                                                         tuple(out.logits.shape))), with_kwargs=True)
    try:
        ev = Evaluator(model, tok, names, include_path=micro_zoo["task_dir"], limit=30)
        scores = ev.score()
    finally:
        handle.remove()
    assert shapes
    computed = sum(b * k for _, (b, k, _) in shapes)
    padded = sum(b * p for (b, p), _ in shapes)
    assert computed < 0.6 * padded, (computed, padded)  # 1112 of 2590 here: the batch's union of positions
    ref = _reference(model, tok, micro_zoo, names, limit=30)
    assert _metrics(scores.results) == _metrics(ref["results"])
    _assert_same_responses(ev, ref)


def test_fewshot_and_fixed_samples_equal_simple_evaluate(micro_zoo):
    model, tok = _load(micro_zoo, "ft_reverse")
    tasks = _tasks(micro_zoo)
    names = [tasks["loglikelihood"], tasks["multiple_choice"]]
    samples = {names[0]: [0, 3, 5, 8, 13, 21, 34], names[1]: [1, 2, 4, 9, 16, 25, 36, 49]}
    ev = Evaluator(model, tok, names, include_path=micro_zoo["task_dir"], samples=samples, num_fewshot=2)
    assert ev.n_docs == {n: len(ids) for n, ids in samples.items()}
    prompt = ev.tasks[names[0]].instances[0].args[0]
    assert prompt.count(" = ") == 3  # two solved examples before the question
    ref = _reference(model, tok, micro_zoo, names, samples=samples, num_fewshot=2)
    assert ev.doc_ids == samples
    ref_prompts = [tuple(s["arguments"][0]) for s in sorted(ref["samples"][names[0]], key=lambda s: s["doc_id"])]
    assert ref_prompts == [i.args for i in sorted(ev.tasks[names[0]].instances, key=lambda i: i.doc_id)]
    scores = ev.score()
    assert _metrics(scores.results) == _metrics(ref["results"])
    _assert_same_responses(ev, ref)


def test_per_document_outcomes_aggregate_to_the_metrics_lm_eval_reports(micro_zoo):
    model, tok = _load(micro_zoo, "ft_increment")
    tasks = list(_tasks(micro_zoo).values())
    ev = Evaluator(model, tok, tasks, include_path=micro_zoo["task_dir"], limit=40)
    scores = ev.score()
    flat = scores.flat()
    assert set(scores.outcomes) == set(tasks) and scores.docs == ev.doc_ids
    keys = {f"{t}/{k}" for t, row in scores.outcomes.items() for k in row}
    assert keys == set(flat)  # every metric of these tasks is a mean over documents
    for task, row in scores.outcomes.items():
        for key, values in row.items():
            assert len(values) == ev.n_docs[task] == len(scores.docs[task])
            assert sum(values) / len(values) == pytest.approx(flat[f"{task}/{key}"], abs=1e-12)
    assert any(0 < sum(v) < len(v) for row in scores.outcomes.values() for v in row.values())  # not all 0 or 1
    # the outcome of a document is the one lm-eval logs for it
    ref = _reference(model, tok, micro_zoo, tasks, limit=40)
    for task in tasks:
        logged = {s["doc_id"]: s for s in ref["samples"][task]}
        for key, values in scores.outcomes[task].items():
            metric = key.split(",")[0]
            assert values == [float(logged[d][metric]) for d in scores.docs[task]]


def test_a_subset_of_documents_scores_like_an_evaluator_built_on_it(micro_zoo):
    model, tok = _load(micro_zoo, "ft_reverse")
    tasks = _tasks(micro_zoo)
    names = [tasks["loglikelihood"], tasks["multiple_choice"], tasks["generate_until"]]
    ev = Evaluator(model, tok, names, include_path=micro_zoo["task_dir"], limit=40)
    full = ev.score()
    subset = {names[0]: [3, 1, 4, 15], names[2]: [0, 2, 7, 9, 26]}
    forwards = _Forwards(model)
    try:
        part = ev.score(subset)
    finally:
        forwards.handle.remove()
    assert set(part.results) == set(subset)  # the task not named is not scored
    ids = ev.doc_ids
    alone = Evaluator(model, tok, list(subset), include_path=micro_zoo["task_dir"],
                      samples={t: [ids[t][i] for i in pos] for t, pos in subset.items()}).score()
    assert _metrics(part.results) == _metrics(alone.results)
    for task, positions in subset.items():
        assert part.docs[task] == [ids[task][i] for i in sorted(positions)]
        for key, values in part.outcomes[task].items():
            assert values == [full.outcomes[task][key][i] for i in sorted(positions)]
    assert part.tokens < full.tokens / 4 and forwards.n > 0
    assert _metrics(ev.score().results) == _metrics(full.results)  # the whole split again, unchanged
    with pytest.raises(TaskError, match=r"task .*: subset positions must be in 0\.\.39"):
        ev.score({names[0]: [40]})
    with pytest.raises(TaskError, match="subset names task 'nope'"):
        ev.score({"nope": [0]})


def test_repeated_calls_are_identical_and_follow_weights_changed_in_place(micro_zoo):
    model, tok = _load(micro_zoo, "ft_increment")
    names = list(_tasks(micro_zoo).values())
    ev = Evaluator(model, tok, names, include_path=micro_zoo["task_dir"], limit=20, batch_size=16)
    first = ev.score()
    resps = _responses(ev)
    state = random.getstate()
    again = ev.score()
    assert random.getstate() == state  # the caller's RNG is left as it was
    assert again.results == first.results and _responses(ev) == resps

    # the search merges into the live model in place: the next call must see the new weights
    base, _ = _load(micro_zoo, "base")
    with torch.no_grad():
        for p, q in zip(model.parameters(), base.parameters(), strict=True):
            p.copy_(q)
    changed = ev.score()
    assert changed.results != first.results
    fresh = Evaluator(base, tok, names, include_path=micro_zoo["task_dir"], limit=20, batch_size=16)
    assert changed.results == fresh.score().results

    # and back: the same weights score the same again
    original, _ = _load(micro_zoo, "ft_increment")
    with torch.no_grad():
        for p, q in zip(model.parameters(), original.parameters(), strict=True):
            p.copy_(q)
    assert ev.score().results == first.results


def test_per_task_limits_and_costs_of_a_call(micro_zoo):
    model, tok = _load(micro_zoo, "base")
    tasks = _tasks(micro_zoo)
    ev = Evaluator(model, tok, list(tasks.values()), include_path=micro_zoo["task_dir"], limit=0.2,
                   limits={tasks["multiple_choice"]: 7})
    assert ev.n_docs == {tasks["loglikelihood"]: 10, tasks["multiple_choice"]: 7, tasks["generate_until"]: 10}
    scores = ev.score()
    assert {row["sample_len"] for row in scores.results.values()} == {10, 7}
    # tokens counted: every distinct input of the 10 + 28 loglikelihood requests, prompts + generations
    seqs = ev.token_sequences()
    assert scores.tokens == sum(len(s) for s in seqs) > 0
    assert ev.metric_names()[tasks["multiple_choice"]] == ["acc,none", "acc_norm,none"]
    # the objectives a search would optimize, from this call
    objectives = Objectives([
        {"name": "mc", "metric": f"{tasks['multiple_choice']}/acc_norm"},
        {"name": "gen", "metric": f"{tasks['generate_until']}/exact_match", "weight": 2.0},
        {"name": "size", "cost": "params"}, {"name": "speed", "cost": "tokens_per_s"},
    ])
    objectives.check_tasks(ev.metric_names())
    values = objectives.values(scores, measure_costs(model, scores))
    assert values["mc"] == scores.results[tasks["multiple_choice"]]["acc_norm,none"]
    assert values["size"] == sum(p.numel() for p in model.parameters())
    assert values["speed"] == pytest.approx(scores.tokens / scores.seconds)


def test_a_model_with_non_finite_outputs_is_not_scored(micro_zoo):
    """Weights that overflow in the forward pass give nan log-likelihoods: an error, not an
    accuracy of 0 (which a search would archive as a merely bad candidate)."""
    model, tok = _load(micro_zoo, "ft_increment")
    ev = Evaluator(model, tok, [_tasks(micro_zoo)["loglikelihood"]], include_path=micro_zoo["task_dir"], limit=8)
    assert ev.score().flat()  # finite: scored
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteOutputs, match=r"log-likelihoods are not finite \(inf or nan\) for \d+ of 8 requests"):
        ev.score()


def test_sampled_generation_is_reseeded_per_call(micro_zoo, tmp_path):
    """Outside the greedy fast path HFLM generates; the RNGs are reseeded per call as
    simple_evaluate seeds them, so sampled text repeats across calls and matches lm-eval's."""
    source = Path(micro_zoo["task_dir"]) / f"{_tasks(micro_zoo)['generate_until']}.yaml"
    text = source.read_text().replace("do_sample: false", "do_sample: true\n  temperature: 1.5")
    (tmp_path / "sampled.yaml").write_text(text.replace(f"task: {source.stem}", "task: zoo_sampled"))
    model, tok = _load(micro_zoo, "base")
    ev = Evaluator(model, tok, ["zoo_sampled"], include_path=tmp_path, limit=30)
    first = ev.score()
    texts = [inst.resps[0] for inst in ev.tasks["zoo_sampled"].instances]
    assert ev.score().results == first.results
    assert [inst.resps[0] for inst in ev.tasks["zoo_sampled"].instances] == texts
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=64), tasks=["zoo_sampled"],
                                  task_manager=manager, limit=30, bootstrap_iters=0, log_samples=True)
    assert [s["resps"][0][0] for s in sorted(ref["samples"]["zoo_sampled"], key=lambda s: s["doc_id"])] == texts
    assert len(set(texts)) > 5  # really sampled: not one repeated string


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def task_copy(micro_zoo, tmp_path):
    """A copy of the zoo's task folder to break (YAML data paths still point at the zoo)."""
    dst = tmp_path / "tasks"
    shutil.copytree(micro_zoo["task_dir"], dst, ignore=shutil.ignore_patterns("data"))
    return dst


def _fails_before_model_work(micro_zoo, match, tasks, **kwargs):
    model, tok = _load(micro_zoo, "base")
    forwards = _Forwards(model)
    with pytest.raises(TaskError, match=match) as err:
        Evaluator(model, tok, tasks, **kwargs)
    assert isinstance(err.value, FuseEvoError)  # the CLI prints it as one line
    assert forwards.n == 0


def test_unknown_task_is_named(micro_zoo):
    _fails_before_model_work(
        micro_zoo, r"unknown lm-eval task\(s\) \['zoo_increment_serach'\]", ["zoo_increment_serach"],
        include_path=micro_zoo["task_dir"],
    )


def test_broken_yaml_in_a_task_dir_is_named(micro_zoo, task_copy):
    broken = task_copy / "zoo_typo.yaml"
    broken.write_text("task: zoo_typo\ndataset_path: json\n  doc_to_text: [unclosed\n")
    _fails_before_model_work(micro_zoo, f"task file {broken} cannot be read",
                             [_tasks(micro_zoo)["loglikelihood"]], include_path=task_copy)


def test_missing_data_file_is_named(micro_zoo, task_copy):
    name = _tasks(micro_zoo)["multiple_choice"]
    yaml_file = task_copy / f"{name}.yaml"
    gone = task_copy / "data" / "nowhere.jsonl"
    text = yaml_file.read_text()
    yaml_file.write_text(text.replace(text.split('test: "')[1].split('"')[0], str(gone)))
    _fails_before_model_work(micro_zoo, rf"task '{name}' \({yaml_file}\): data file not found: .*nowhere.jsonl",
                             [name], include_path=task_copy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"samples": {"T": [0, 500]}}, r"task 'T': sample ids \[500\] are not in 0..49"),
        ({"limit": 5, "samples": {"T": [1]}}, "give either a limit or sample ids, not both"),
        ({"limits": {"zoo_nope": 3}}, r"limit/samples name task\(s\) \['zoo_nope'\]"),
        ({"include_path": "/nonexistent/tasks"}, "include_path /nonexistent/tasks does not exist"),
    ],
)
def test_impossible_subsets_and_paths_are_named(micro_zoo, kwargs, match):
    name = _tasks(micro_zoo)["loglikelihood"]
    kwargs = {k: ({name: v["T"]} if isinstance(v, dict) and "T" in v else v) for k, v in kwargs.items()}
    kwargs.setdefault("include_path", micro_zoo["task_dir"])
    _fails_before_model_work(micro_zoo, match.replace("'T'", f"'{name}'"), [name], **kwargs)


def test_the_lm_eval_internals_we_use_are_there():
    """The evaluator's three lm-eval internals (no public equivalent): a release that moves or
    reshapes them fails here by name, not deep inside a search."""
    import inspect

    from lm_eval.evaluator_utils import _process_results
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    assert {"bootstrap_iters"} <= set(inspect.signature(_process_results).parameters)
    assert {"resolve_func", "recursive"} <= set(inspect.signature(load_yaml).parameters)
    assert len(inspect.signature(TaskIndex.process_cfg).parameters) == 3
