"""fuse-evo export and report on one tiny micro-zoo search: the export loads with
AutoModelForCausalLM, `fuse-evo eval` on it reproduces the archived score, `fuse-evo merge` on
its recipe.yaml rebuilds the same tensors, its mergekit.yaml parses back to the same merge; bad
picks are refused clearly; the report writes its summary and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fuse_evo.merge import mergekit
from fuse_evo.cli import main
from fuse_evo.models import ModelPool
from fuse_evo.recipe import Recipe
from fuse_evo.search.archive import Archive
from fuse_evo.errors import FuseEvoError
from fuse_evo.results.export import ExportError, export_run, pick_trial
from fuse_evo.results.report import make_report
from fuse_evo.search.run import run_search

from conftest import compose_command

BUDGET = 4


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def run_dir(micro_zoo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("search") / "run"
    zoo = Path(micro_zoo["task_dir"]).parent
    cmd = compose_command("search", ["experiment=micro", f"models.zoo.out_dir={zoo}", f"run.dir={run}",
                                     f"run.budget={BUDGET}", "run.dashboard=false"])
    assert run_search(cmd).evaluations == BUDGET
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "best"
    assert main(["export", str(run_dir), "--pick", "best", "--out", str(out)]) == 0
    return out


def test_export_loads_and_reproduces_the_archived_score(run_dir, exported, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    umask = os.umask(0)
    os.umask(umask)  # the folder and files are readable as any file the user writes, not private
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.stat().st_mode & 0o777 for f in exported.iterdir()} == {0o666 & ~umask}

    with Archive.open(run_dir) as archive:
        best = archive.best()
        config = archive.config
        include = archive.info["include_path"]
    assert {p.name for p in exported.iterdir()} >= {"README.md", "config.json", "mergekit.yaml", "recipe.yaml",
                                                   "scores.json", "model.safetensors"}
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.num_hidden_layers == 2

    scores = json.loads((exported / "scores.json").read_text())
    assert scores["trial"] == best.number and scores["search"]["scalar"] == pytest.approx(best.scalar)
    held = scores["heldout"]
    assert set(held["objectives"]) == set(best.objectives)
    assert all(t.endswith("_heldout") for t in held["how"]["tasks"])
    card = (exported / "README.md").read_text()
    assert best.recipe_key in card and "held-out" in card and "Provenance" in card

    # fuse-evo eval with the run's search tasks and limit gives the archived metrics
    results = tmp_path / "eval.json"
    ev = config["evaluator"]
    assert main(["eval", str(exported), "--tasks", ",".join(ev["tasks"]), "--include_path", include[0],
                 "--limit", str(ev["limit"]), "--output_path", str(results)]) == 0
    report = json.loads(results.read_text())
    for key, value in best.metrics.items():
        task, _, metric = key.partition("/")
        assert report["results"][task][metric] == pytest.approx(value, abs=1e-9), key


def test_recipe_yaml_rebuilds_the_same_tensors(exported, tmp_path):
    again = tmp_path / "again"
    assert main(["merge", str(exported / "recipe.yaml"), "--out", str(again), "--device", "cpu"]) == 0
    a, b = _tensors(exported), _tensors(again)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _same_merge(pool: ModelPool, a: Recipe, b: Recipe) -> None:
    assert a.method == b.method and list(a.models) == list(b.models)
    for tensor, group in pool.groups.items():
        for m in a.models:
            pa, pb = a.model_params(group, m, tensor), b.model_params(group, m, tensor)
            assert pb.keys() >= pa.keys(), (tensor, m)
            for k in pa:
                assert pb[k] == pytest.approx(pa[k], abs=1e-12), (tensor, m, k)
    assert {k: v for k, v in a.parameters.items()} == {k: v for k, v in b.parameters.items()}


def test_mergekit_yaml_parses_back_to_the_same_recipe(run_dir, exported, micro_zoo):
    with Archive.open(run_dir) as archive:
        recipe = archive.best().to_recipe()
        sources = archive.info["sources"]
    assert recipe.method == "task_arithmetic"
    pool = ModelPool(sources["base"], {m: sources[m] for m in recipe.models})
    data = yaml.safe_load((exported / "mergekit.yaml").read_text())
    assert data["merge_method"] == "task_arithmetic"
    back = mergekit.to_recipe(mergekit.parse(data), pool)
    _same_merge(pool, recipe, back)

    # a ties recipe with per-layer values and a head of its own
    ties = Recipe("ties", recipe.models, parameters={"normalize": True, "lambda": 1.2}, groups={
        "*": {m: {"weight": 0.5, "density": 0.7} for m in recipe.models},
        "layers.1": {recipe.models[0]: {"weight": 0.9, "density": 0.3}},
        "head": {recipe.models[1]: {"weight": 0.1}},
    })
    mk = mergekit.recipe_to_mergekit(ties, sources, pool)
    assert mk is not None and mk["merge_method"] == "ties"
    _same_merge(pool, ties, mergekit.to_recipe(mergekit.parse(yaml.safe_load(yaml.safe_dump(mk))), pool))

    # attention and MLP halves of one layer that differ, or tensor: groups: not expressible
    split = Recipe("task_arithmetic", recipe.models, groups={
        "*": {m: {"weight": 0.5} for m in recipe.models}, "layers.0.mlp": {recipe.models[0]: {"weight": 1.0}}})
    assert mergekit.recipe_to_mergekit(split, sources, pool) is None


def test_bad_picks_are_refused(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--pick", "trial:999", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no trial 999" in err and f"0..{BUDGET - 1}" in err
    assert main(["export", str(run_dir), "--pick", "worst", "--out", str(tmp_path / "x")]) == 2
    assert "expected 'best' or 'trial:N'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a search run directory" in capsys.readouterr().err
    with Archive.open(run_dir) as archive:
        assert pick_trial(archive, "trial:0").number in (0, archive.trial(0).duplicate_of)
    with pytest.raises(ExportError, match="already exists"):
        export_run(run_dir, run_dir)


def test_report(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    report = run_dir / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["evaluations"] == BUDGET and summary["budget"] == BUDGET
    assert summary["completed"] + summary["failed"] + summary["deduplicated"] == BUDGET
    with Archive.open(run_dir) as archive:
        best = archive.best()
    assert summary["best"]["trial"] == best.number and summary["best"]["scalar"] == pytest.approx(best.scalar)
    rows = [r["name"] for r in summary["heldout"]["rows"]]
    assert rows[0].startswith("best") and "base" in rows and "ft_shift" in rows
    assert any(r.startswith("uniform task_arithmetic") for r in rows)
    for png in ("convergence.png", "coefficients.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model |" in out and "ft_increment" in out
    # every other row against the best, paired by held-out document
    held = summary["best"]["heldout"]
    for r in summary["heldout"]["rows"][1:]:
        if r["name"].startswith("uniform task_arithmetic"):
            assert "paired" not in r  # the zoo's table: numbers, no documents
            continue
        p = r["paired"]["scalar"]
        assert p["low"] <= p["value"] <= p["high"] and p["n"] > 0
        assert p["value"] == pytest.approx(held["scalar"] - r["scalar"], abs=1e-9)  # the table's numbers, paired
        assert p["within_noise"] == (p["low"] <= 0 <= p["high"])
    assert "best - this, 95% paired interval" in out


def test_the_archive_keeps_each_trials_per_document_outcomes(run_dir):
    with Archive.open(run_dir) as archive:
        trials = archive.trials()
        tasks = archive.info["tasks"]
        for t in trials:
            o = archive.outcomes(t.number)
            if t.status != "complete":
                assert o is None  # a duplicate points at its original; a failure scored nothing
                continue
            assert set(o["docs"]) == set(tasks)
            for key, value in t.metrics.items():
                task, metric = key.split("/", 1)
                values = o["values"][task][metric]
                assert len(values) == len(o["docs"][task])
                assert sum(values) / len(values) == pytest.approx(value, abs=1e-12)


def _micro_search(micro_zoo, run: Path, *overrides: str) -> Path:
    zoo = Path(micro_zoo["task_dir"]).parent
    cmd = compose_command("search", ["experiment=micro", f"models.zoo.out_dir={zoo}", f"run.dir={run}",
                                     "run.budget=3", "run.dashboard=false", *overrides])
    run_search(cmd)
    return run


def test_report_with_a_grid_searched_uniform_baseline(run_dir, micro_zoo, tmp_path, capsys):
    uniform = _micro_search(micro_zoo, tmp_path / "uniform", "space=ta_uniform", "strategy=grid")
    with Archive.open(uniform) as archive:
        lambdas = sorted(t.genome[0] for t in archive.trials())
        base_best = archive.best()
    assert lambdas == pytest.approx([0.0, 0.5, 1.0])  # the global scale's grid at budget 3
    assert main(["report", str(run_dir), "--baseline", str(uniform)]) == 0
    rows = json.loads((run_dir / "report" / "summary.json").read_text())["heldout"]["rows"]
    row = next(r for r in rows if r["name"].startswith("uniform: best of 3 (grid, task_arithmetic, lambda "))
    assert row["run_dir"] == str(uniform) and row["search_scalar"] == pytest.approx(base_best.scalar)
    assert Recipe.from_dict(row["recipe"]).key == base_best.recipe_key
    assert "search scalar" in capsys.readouterr().out
    # comparing the two runs: the best run's best against the other run's and each source, paired
    from fuse_evo.results.compare import compare_runs

    summary = compare_runs([run_dir, uniform], out=tmp_path / "cmp", heldout=True)
    against = [p["against"] for p in summary["paired"]]
    loser = next(r["run"] for r in summary["runs"] if r["run"] != summary["paired"][0]["best"])
    assert against[0] == f"run {loser}"
    assert sorted(against[1:]) == ["source base", "source ft_increment", "source ft_reverse", "source ft_shift"]
    for p in summary["paired"]:
        assert p["scalar"]["low"] <= p["scalar"]["value"] <= p["scalar"]["high"]
    assert "paired by document" in (tmp_path / "cmp" / "compare.md").read_text()
    assert all("outcomes" not in (r.get("heldout") or {}) for r in summary["runs"])

    other = _micro_search(micro_zoo, tmp_path / "other", "space=ta_uniform", "strategy=grid",
                          "evaluator.objectives=[{name:increment,metric:zoo_increment_search/acc}]")
    with pytest.raises(FuseEvoError, match=r"--baseline .*other: scored with other objectives"):
        make_report(run_dir, baselines=[other])
    with pytest.raises(FuseEvoError, match="that is the run being reported"):
        make_report(run_dir, baselines=[run_dir])


def test_pick_empty_and_failed(tmp_path):
    from fuse_evo.search.archive import Trial, default_url

    archive = Archive(default_url(tmp_path), "r1", create=True)
    archive.start_run("t", "{}", {"objectives": []})
    with pytest.raises(ExportError, match="holds no evaluations"):
        pick_trial(archive, "best")
    archive.record(Trial(number=-1, candidate_id=0, status="failed", genome=[0.5], recipe={"method": "linear",
                         "models": ["a"]}, recipe_key="k", error="RuntimeError: boom"))
    with pytest.raises(ExportError, match="none of its 1 evaluations completed"):
        pick_trial(archive, "best")
    with pytest.raises(ExportError, match="trial 0 failed .*boom"):
        pick_trial(archive, "trial:0")
    archive.close()


def test_layer_coefficients_cover_embed_layers_norm_and_head():
    from fuse_evo.results.report import layer_coefficients

    recipe = Recipe("task_arithmetic", ("a", "b"), groups={
        "*": {"a": {"weight": 0.1}, "b": {"weight": 0.2}},
        "layers.1.mlp": {"a": {"weight": 0.9}}, "head": {"b": {"weight": 0.7}},
    })
    labels, series = layer_coefficients(recipe, num_layers=2)
    assert labels == ["embed", "0", "1", "norm", "head"]
    assert series == {"a weight": [0.1, 0.1, 0.1, 0.1, 0.1], "a weight (mlp)": [0.1, 0.1, 0.9, 0.1, 0.1],
                      "b weight": [0.2, 0.2, 0.2, 0.2, 0.7]}
