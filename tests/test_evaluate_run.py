"""`fuse-evo eval`: lm-eval's flags and JSON shape, and the search evaluator's numbers."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse_evo.cli import main
from fuse_evo.evaluate.evaluator import Evaluator


def test_eval_writes_lm_eval_json_that_agrees_with_the_evaluator(micro_zoo, tmp_path, capsys):
    tasks = micro_zoo["tasks"]
    names = [tasks["shift"]["search"], tasks["shift"]["mc_search"], tasks["increment"]["generate_search"]]
    path = micro_zoo["models"]["ft_shift"]["path"]
    out = tmp_path / "out" / "results.json"
    rc = main(["eval", path, "--tasks", ",".join(names), "--include_path", micro_zoo["task_dir"],
               "--limit", "12", "--batch_size", "8", "--device", "cpu", "--output_path", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    # lm-eval's results file: results per task with "metric,filter" keys, and its companions
    assert set(report["results"]) == set(names)
    assert {"configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= set(report)
    assert set(report["results"][names[1]]) >= {"acc,none", "acc_norm,none", "acc_stderr,none", "alias"}
    assert report["n-samples"][names[0]] == {"original": 50, "effective": 12}
    assert report["config"]["limit"] == {n: 12 for n in names}
    # the table lm_eval prints, with every task and metric
    for name in names:
        assert f"|{name}" in printed.out
    assert "exact_match" in printed.out and "acc_norm" in printed.out
    assert f"results written to {out}" in printed.err

    # the search's evaluator on the same model and documents gives the same numbers
    model = AutoModelForCausalLM.from_pretrained(path)
    evaluator = Evaluator(model, AutoTokenizer.from_pretrained(path), names,
                          include_path=micro_zoo["task_dir"], limit=12, batch_size=8)
    assert evaluator.score().results == report["results"]


def test_eval_bad_input_is_one_line(micro_zoo, tmp_path, capsys):
    path = micro_zoo["models"]["base"]["path"]
    rc = main(["eval", path, "--tasks", "zoo_shift_serach", "--include_path", micro_zoo["task_dir"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fuse-evo: error: unknown lm-eval task(s) ['zoo_shift_serach']" in err
    assert "Traceback" not in err
    rc = main(["eval", str(tmp_path), "--tasks", "x"])
    assert rc == 2 and "is not a Hugging Face model folder" in capsys.readouterr().err
    rc = main(["eval", path, "--tasks", "x", "--batch_size", "auto"])
    assert rc == 2 and "--batch_size: 'auto' is not an integer" in capsys.readouterr().err
