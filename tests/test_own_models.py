"""A user's own models and tasks: default objectives read from the task files, the document
split and held-out tasks, honest labels where there is no held-out set, and experiments that
run on ``models=paths``. The micro zoo's models and task files stand in for the user's (with
``models=paths`` nothing knows they came from a zoo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse_evo.cli import main
from fuse_evo.errors import ConfigError
from fuse_evo.evaluate.evaluator import DocumentSplit, Evaluator, TaskError, primary_metrics
from fuse_evo.evaluate.objectives import default_objectives, short_names
from fuse_evo.results.heldout import SEARCH_ONLY
from fuse_evo.search.archive import Archive
from fuse_evo.search.run import run_search

from conftest import compose_command


def _paths(zoo: dict, run: Path, *overrides: str, experiment: str = "micro") -> list[str]:
    m = zoo["models"]
    return [f"experiment={experiment}", "models=paths", f"models.base={m['base']['path']}",
            f"+models.sources.math={m['ft_increment']['path']}", f"+models.sources.code={m['ft_shift']['path']}",
            "evaluator.tasks=[zoo_increment_search,zoo_shift_search]",
            f"evaluator.include_path=[{zoo['task_dir']}]", "evaluator.limit=12", f"run.dir={run}",
            "run.progress=false", "run.dashboard=false", *overrides]


def test_primary_metrics_come_from_the_task_files(tmp_path, micro_zoo):
    data = Path(micro_zoo["task_dir"]) / "data" / "increment_search.jsonl"
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n" \
             'doc_to_text: "{{prompt}} "\ndoc_to_target: "{{answer}}"\n'
    (tmp_path / "ppl.yaml").write_text(
        "task: my_ppl\noutput_type: loglikelihood\n" + common
        + "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text(
        "task: my_gen\ntag: [my_tag]\noutput_type: generate_until\n" + common
        + "generation_kwargs:\n  until: ['\\n']\nfilter_list:\n  - name: get-number\n    filter:\n"
        "      - function: regex\n        regex_pattern: '(\\d+)'\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "plain.yaml").write_text("task: my_plain\noutput_type: multiple_choice\n" + common
                                         + "doc_to_choice: ['a', 'b']\n")
    (tmp_path / "group.yaml").write_text("group: my_group\ntask: [my_ppl, my_plain]\naggregate_metric_list:\n"
                                         "  - metric: acc\n    weight_by_size: true\n")
    got = primary_metrics(["my_ppl", "my_gen", "my_plain", "my_group"], [tmp_path])
    assert got == {"my_ppl": ("perplexity,none", "min"), "my_gen": ("exact_match,get-number", "max"),
                   "my_plain": ("acc,none", "max"), "my_group": ("acc,none", "max")}
    with pytest.raises(TaskError, match="my_tag.* is a tag of several tasks"):
        primary_metrics(["my_tag"], [tmp_path])
    objectives = default_objectives({"my_ppl": got["my_ppl"], "my_gen": got["my_gen"]})
    assert objectives == [
        {"name": "ppl", "metric": "my_ppl/perplexity,none", "direction": "min", "weight": 0.5},
        {"name": "gen", "metric": "my_gen/exact_match,get-number", "direction": "max", "weight": 0.5}]
    assert short_names(["arc_easy", "gsm8k"]) == ["arc_easy", "gsm8k"]
    assert short_names(["zoo_a_search", "zoo_b_search"]) == ["a", "b"]
    assert short_names(["gsm8k"]) == ["gsm8k"]


def test_the_split_is_seeded_disjoint_and_complete(micro_zoo):
    folder = micro_zoo["models"]["base"]["path"]
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    task, where = "zoo_increment_search", micro_zoo["task_dir"]
    search = Evaluator(model, tok, [task], include_path=where, split=DocumentSplit(0.25, 7, "search"))
    held = Evaluator(model, tok, [task], include_path=where, split=DocumentSplit(0.25, 7, "heldout"))
    n = len(search.tasks[task].eval_docs)
    s_ids, h_ids = search.doc_ids[task], held.doc_ids[task]
    assert len(s_ids) == round(0.25 * n) and not set(s_ids) & set(h_ids) and sorted(s_ids + h_ids) == list(range(n))
    again = Evaluator(model, tok, [task], include_path=where, split=DocumentSplit(0.25, 7, "search"))
    assert again.doc_ids[task] == s_ids and search.score().flat() == again.score().flat()
    other_seed = Evaluator(model, tok, [task], include_path=where, split=DocumentSplit(0.25, 8, "search"))
    assert other_seed.doc_ids[task] != s_ids
    limited = Evaluator(model, tok, [task], include_path=where, limit=5, split=DocumentSplit(0.25, 7, "search"))
    assert len(limited.doc_ids[task]) == 5 and set(limited.doc_ids[task]) <= set(s_ids)
    with pytest.raises(TaskError, match="sample ids or a split"):
        Evaluator(model, tok, [task], include_path=where, samples={task: [0]}, split=DocumentSplit(0.25))


def test_own_models_and_tasks_get_default_objectives_and_an_honest_label(micro_zoo, tmp_path, capsys):
    run = tmp_path / "own"
    result = run_search(compose_command("search", _paths(micro_zoo, run, "run.budget=3",
                                                         experiment="quickstart")))
    assert result.evaluations == 3
    with Archive.open(run) as archive:
        info = archive.info
        assert [(o["name"], o["metric"], o["direction"], o["weight"]) for o in info["objectives"]] == [
            ("increment", "zoo_increment_search/acc,none", "max", 0.5), ("shift", "zoo_shift_search/acc,none", "max", 0.5)]
        assert archive.best().objectives.keys() == {"increment", "shift"}
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["evaluator"]["objectives"] == [] and set(stored["models"]["sources"]) == {"math", "code"}

    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    assert f"{SEARCH_ONLY} scalar" in capsys.readouterr().out
    scores = json.loads((tmp_path / "model" / "scores.json").read_text())
    assert scores["heldout"]["how"]["label"] == SEARCH_ONLY
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"{SEARCH_ONLY} scalar" in card and "held-out scalar" not in card and "held-out increment" not in card
    assert main(["report", str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "## Search split (no held-out set)" in summary and "## Held-out" not in summary


def test_the_split_and_heldout_tasks_give_held_out_scores(micro_zoo, tmp_path):
    run = tmp_path / "split"
    run_search(compose_command("search", _paths(
        micro_zoo, run, "run.budget=2", "evaluator.split.search_fraction=0.5", "evaluator.split.seed=3",
        "+evaluator.heldout_tasks.zoo_shift_search=zoo_shift_heldout")))
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    how = json.loads((tmp_path / "model" / "scores.json").read_text())["heldout"]["how"]
    assert how["label"] == "held-out" and how["tasks"] == ["zoo_increment_search", "zoo_shift_heldout"]
    assert how["split"] == {"search_fraction": 0.5, "seed": 3, "tasks": ["zoo_increment_search"]}
    held = json.loads((tmp_path / "model" / "scores.json").read_text())["heldout"]
    assert set(held["objectives"]) == {"increment", "shift"}


@pytest.mark.parametrize("override, key", [
    ("evaluator.split.search_fraction=1.5", "evaluator.split.search_fraction: must be between 0 and 1"),
    ("+evaluator.heldout_tasks.nope=zoo_shift_heldout", "evaluator.heldout_tasks.nope: not one of evaluator.tasks"),
    ("evaluator.tasks=[zoo_increment_mc_search]", None),
])
def test_bad_held_out_settings_are_named_before_any_model_loads(micro_zoo, tmp_path, override, key, capsys):
    if key is None:  # a tag-free multiple-choice task: its default objective is acc too
        cmd = compose_command("search", _paths(micro_zoo, tmp_path / "mc", "run.budget=1", override))
        assert run_search(cmd).evaluations == 1
        return
    with pytest.raises(ConfigError, match=key):
        run_search(compose_command("search", _paths(micro_zoo, tmp_path / "bad", override)))
    assert not (tmp_path / "bad" / "archive.db").exists()


def test_experiments_run_on_models_given_by_path(micro_zoo, tmp_path):
    for experiment in ("quickstart", "pareto_quickstart", "pareto_uniform"):
        cmd = compose_command("search", _paths(micro_zoo, tmp_path / experiment, experiment=experiment))
        assert cmd.models.zoo is None and set(cmd.models.sources) == {"math", "code"}
        assert cmd.evaluator.objectives == []
    result = run_search(compose_command("search", _paths(micro_zoo, tmp_path / "pq", "run.budget=2",
                                                         experiment="pareto_quickstart")))
    assert result.evaluations == 2 and result.front.startswith("front ")


def test_a_per_layer_search_starts_from_the_best_global_scale(micro_zoo, tmp_path):
    run = tmp_path / "scanned"
    overrides = _paths(micro_zoo, run, "run.budget=30")  # ta_per_layer, weight init left open: 3 scan points
    result = run_search(compose_command("search", overrides))
    with Archive.open(run / "stages" / "scan") as scan:
        genomes = sorted(t.genome[0] for t in scan.trials())
        scan_best = scan.best()
    assert genomes == pytest.approx([0.0, 0.5, 1.0])
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["space"]["genes"]["weight"]["init"] == pytest.approx(scan_best.genome[0])
    assert result.evaluations == 27 and stored["run"]["budget"] == 27  # the scan's 3 come out of the budget
    with Archive.open(run) as archive:
        first = archive.trials()[0]
        assert first.genome == pytest.approx([scan_best.genome[0]] * len(first.genome))  # its first candidate
        assert first.scalar == pytest.approx(scan_best.scalar) and archive.best().scalar >= scan_best.scalar
    again = run_search(compose_command("search", overrides))  # resumed: nothing runs again
    assert again.already_done and again.evaluations == 27
    more = run_search(compose_command("search", _paths(micro_zoo, run, "run.budget=40")))  # a larger budget
    assert more.resumed and more.evaluations == 37  # the same scan (3 points, not 4) and start
    with Archive.open(run / "stages" / "scan") as scan:
        assert scan.count() == 3
    assert main(["report", str(run)]) == 0  # the scan is the report's baseline row
    rows = json.loads((run / "report" / "summary.json").read_text())["heldout"]["rows"]
    scan_row = next(r for r in rows if r["name"].startswith("scan: best of 3 (grid, task_arithmetic, weight "))
    assert scan_row["search_scalar"] == pytest.approx(scan_best.scalar)


def test_a_normalizing_method_scans_its_lambda(micro_zoo, tmp_path):
    run = tmp_path / "ties"
    run_search(compose_command("search", _paths(micro_zoo, run, "run.budget=30", "space=ties_per_block")))
    with Archive.open(run / "stages" / "scan") as scan:
        assert scan.info["genes"] == ["lambda"]  # a common weight cancels out under normalize
        assert sorted(t.genome[0] for t in scan.trials()) == pytest.approx([0.0, 1.0, 2.0])
        scan_best = scan.best()
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["space"]["genes"]["lambda"]["init"] == pytest.approx(scan_best.genome[0])
    assert stored["space"]["genes"]["weight"]["init"] is None
    with Archive.open(run) as archive:  # its start is the scan's best merge (equal weights, normalized)
        assert archive.trials()[0].scalar == pytest.approx(scan_best.scalar)
