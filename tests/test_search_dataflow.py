"""Data-flow and hybrid searches on the micro zoo: candidates are layer paths routed through
resident source models and scored by the same evaluator; the starting path is the io model
itself (scored as that model scores); a hybrid search routes through a parameter-space run's
best merge (scored as that run scored it); a killed data-flow search resumes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse_evo.cli import main
from fuse_evo.errors import ConfigError
from fuse_evo.evaluate.evaluator import Evaluator
from fuse_evo.merge.dataflow import LayerPath
from fuse_evo.search.archive import Archive
from fuse_evo.search.run import run_search

from test_search_run import command, kill_and_resume, zoo_dir

DFS = ["space=dfs", "run.dashboard=false"]


def test_dataflow_search_routes_paths_and_starts_at_the_io_model(micro_zoo, tmp_path):
    result = run_search(command(micro_zoo, tmp_path / "dfs", "run.budget=6", *DFS))
    assert result.evaluations == 6
    with Archive.open(tmp_path / "dfs") as archive:
        trials, info = archive.trials(), archive.info
    assert info["method"] == "dataflow" and info["dataflow"]["io_model"] == "ft_increment"
    assert all(t.status == "complete" and isinstance(t.to_recipe(), LayerPath) for t in trials)
    first = trials[0].to_recipe()
    assert first.steps == (("ft_increment", 0), ("ft_increment", 1)) and first.scales == (1.0, 1.0)
    # the io model's own path scores what the model itself scores under the same evaluator
    folder = micro_zoo["models"]["ft_increment"]["path"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    evaluator = Evaluator(model, AutoTokenizer.from_pretrained(folder), info["tasks"],
                          include_path=info["include_path"], limit=20)
    assert trials[0].metrics == pytest.approx(evaluator.score().flat())


def test_hybrid_search_routes_through_the_parameter_space_best(micro_zoo, tmp_path):
    run_search(command(micro_zoo, tmp_path / "ps", "run.budget=3", "run.dashboard=false"))
    with Archive.open(tmp_path / "ps") as archive:
        ps_best = archive.best()
    run_search(command(micro_zoo, tmp_path / "hybrid", "run.budget=3", *DFS,
                       f"+space.dataflow.merged_from={tmp_path / 'ps'}"))
    with Archive.open(tmp_path / "hybrid") as archive:
        trials, info = archive.trials(), archive.info
    assert info["dataflow"]["models"] == ["merged", "ft_increment", "ft_reverse", "ft_shift"]
    assert info["dataflow"]["merged"]["method"] == "task_arithmetic"
    assert trials[0].to_recipe().steps == (("merged", 0), ("merged", 1))
    assert trials[0].objectives == pytest.approx(ps_best.objectives)  # the merged model itself

    # export: an ordinary model, as many layers as the path, scoring what the search archived
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "hybrid"), "--pick", "best", "--out", str(out)]) == 0
    with Archive.open(tmp_path / "hybrid") as archive:
        best = archive.best()
    path = best.to_recipe()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == len(path.steps)
    assert yaml.safe_load((out / "path.yaml").read_text())["path"] == path.to_dict()
    evaluator = Evaluator(model, AutoTokenizer.from_pretrained(out), info["tasks"], include_path=info["include_path"],
                          limit=20)
    for key, value in best.metrics.items():  # the fold is exact up to RMSNorm's epsilon
        assert evaluator.score().flat()[key] == pytest.approx(value, abs=0.051), key

    # report: the hybrid vs the parameter-space run vs a data-flow run over the sources alone
    run_search(command(micro_zoo, tmp_path / "dfs", "run.budget=2", *DFS))
    assert main(["report", str(tmp_path / "hybrid"), "--baseline", str(tmp_path / "ps"),
                 "--baseline", str(tmp_path / "dfs")]) == 0
    rows = json.loads((tmp_path / "hybrid" / "report" / "summary.json").read_text())["heldout"]["rows"]
    assert [r["name"].split(":")[0] for r in rows[:3]] == [f"best (trial {best.number})", "ps", "dfs"]
    assert (tmp_path / "hybrid" / "report" / "path.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_dataflow_configs_are_refused(micro_zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"space.dataflow.models: \['ft_math'\] are not the base, a source model"):
        run_search(command(micro_zoo, tmp_path / "a", *DFS, "+space.dataflow.models=[ft_math]"))
    with pytest.raises(ConfigError, match="space.dataflow.merged_from: .*config.yaml"):
        run_search(command(micro_zoo, tmp_path / "b", *DFS, f"+space.dataflow.merged_from={tmp_path / 'none'}"))


def test_dataflow_search_resumes_after_sigkill(micro_zoo, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["experiment=micro", f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run_dir}", "run.budget=10",
            *DFS, "strategy=path_es"]
    trials = kill_and_resume(args, run_dir, 10, kill_after=3)
    assert all(isinstance(t.to_recipe(), LayerPath) for t in trials)


def test_chained_hybrid_runs_its_first_stage_and_resumes_after_sigkill(micro_zoo, tmp_path):
    """One command: stage 1 (experiment=micro) into RUN/stages/micro, then data flow over its
    best; killed in stage 2 and run again, stage 1 is found finished and stage 2 resumes."""
    run_dir = tmp_path / "hybrid"
    args = ["experiment=micro", f"models.zoo.out_dir={zoo_dir(micro_zoo)}", f"run.dir={run_dir}", "run.budget=8",
            *DFS, "strategy=path_es", "+space.dataflow.merge_stage=micro"]
    trials = kill_and_resume(args, run_dir, 8, kill_after=2)
    with Archive.open(run_dir / "stages" / "micro") as stage:
        assert stage.count() == 12 and stage.info["method"] == "task_arithmetic"
        stage_best = stage.best()
    assert trials[0].to_recipe().steps == (("merged", 0), ("merged", 1))
    assert trials[0].objectives == pytest.approx(stage_best.objectives)
    with pytest.raises(ConfigError, match="merge_stage: give it or merged_from"):
        run_search(command(micro_zoo, tmp_path / "c", *DFS, "+space.dataflow.merge_stage=micro",
                           f"+space.dataflow.merged_from={run_dir}"))


def test_path_length_and_parameter_count_are_cost_objectives(micro_zoo, tmp_path):
    from dataclasses import replace

    from fuse_evo.config import ObjectiveConfig

    cmd = command(micro_zoo, tmp_path / "costs", "run.budget=6", *DFS, "strategy=path_es")
    objectives = [*cmd.evaluator.objectives, ObjectiveConfig(name="layers", cost="layers", weight=0.01),
                  ObjectiveConfig(name="params", cost="params", weight=0.0)]
    run_search(replace(cmd, evaluator=replace(cmd.evaluator, objectives=objectives)))
    model = AutoModelForCausalLM.from_pretrained(micro_zoo["models"]["ft_increment"]["path"])
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    frame = sum(p.numel() for p in model.parameters()) - len(model.model.layers) * per_layer
    with Archive.open(tmp_path / "costs") as archive:
        trials = archive.trials("complete")
    assert {len(t.to_recipe().steps) for t in trials} != {2}  # path_es changed the path length
    for t in trials:
        n = len(t.to_recipe().steps)
        assert t.objectives["layers"] == n and t.objectives["params"] == frame + n * per_layer
        assert t.scalar == pytest.approx(sum(t.objectives[s] for s in ("increment", "reverse", "shift")) / 3 - 0.01 * n)
