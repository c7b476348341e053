"""Multi-objective search end to end on the micro zoo: NSGA-II told every objective, the
archive's front and hypervolume, resume, Nevergrad's reference point, `fuse-evo export --pick
pareto[:K]`, the report's figures (opened as images) and a comparison of runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fuse_evo.cli import main
from fuse_evo.errors import ConfigError
from fuse_evo.search import pareto
from fuse_evo.search.archive import Archive
from fuse_evo.results.compare import CompareError, compare_runs
from fuse_evo.search.run import run_search

from conftest import compose_command

TWO = ["evaluator=zoo_two_skills", "evaluator.limit=20", "++models.sources={ft_increment:null,ft_reverse:null}"]


def _search(micro_zoo, run: Path, budget: int, *overrides: str):
    zoo = Path(micro_zoo["task_dir"]).parent
    cmd = compose_command("search", ["experiment=micro", f"models.zoo.out_dir={zoo}", f"run.dir={run}",
                                     f"run.budget={budget}", "run.dashboard=false", *overrides])
    return run_search(cmd)


@pytest.fixture(scope="module")
def mo_run(micro_zoo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pareto") / "nsga2"
    result = _search(micro_zoo, run, 8, *TWO, "strategy=nsga2", "strategy.population_size=4")
    assert result.evaluations == 8 and result.front.startswith("front ")
    with Archive.open(run) as archive:  # one front, one size: the search log's and the archive's
        assert result.front.split(",")[0] == f"front {len(archive.pareto_front())}"
    return run


def _brute_front(trials, names):
    """The front by brute force: each non-dominated vector once, as its first trial."""
    pts = [tuple(-t.objectives[n] for n in names) for t in trials]
    return [t.number for i, t in enumerate(trials)
            if not any(pareto.dominates(pts[j], pts[i]) for j in range(len(trials))) and pts.index(pts[i]) == i]


def test_every_objective_is_told_and_the_front_is_kept(mo_run, micro_zoo):
    with Archive.open(mo_run) as archive:
        info, trials = archive.info, archive.trials()
        assert info["multi_objective"] and [o["name"] for o in info["objectives"]] == ["increment", "reverse"]
        done = [t for t in trials if t.status == "complete"]
        for t in done:  # losses: each objective, maximized ones negated
            assert t.losses == pytest.approx([-t.objectives["increment"], -t.objectives["reverse"]])
        front = archive.pareto_front()
        assert [t.number for t in front] == _brute_front(done, ["increment", "reverse"])
        history = archive.hypervolume_history()
        assert history[-1] == pytest.approx(pareto.hypervolume(
            [[-t.objectives["increment"], -t.objectives["reverse"]] for t in front], [0.0, 0.0]))
        assert archive.reference_point() == ({"increment": 0.0, "reverse": 0.0},
                                             {"increment": "default", "reverse": "default"})
    # null stays null in config.yaml (resume compares configs), the strategy got 2 objectives
    stored = yaml.safe_load((mo_run / "config.yaml").read_text())
    assert stored["strategy"]["num_objectives"] is None

    # resume to a larger budget: the front only improves
    result = _search(micro_zoo, mo_run, 12, *TWO, "strategy=nsga2", "strategy.population_size=4")
    assert result.resumed and result.evaluations == 12
    with Archive.open(mo_run) as archive:
        longer = archive.hypervolume_history()
    assert longer[:8] == pytest.approx(history) and longer[-1] >= history[-1]


def test_objective_count_and_reference_are_checked(micro_zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"strategy.num_objectives: 3; use 1 .*, 2 \(each of"):
        _search(micro_zoo, tmp_path / "bad", 2, *TWO, "strategy=nsga2", "strategy.num_objectives=3")
    with pytest.raises(Exception, match=r"reference"):  # Hydra's schema: a float
        _search(micro_zoo, tmp_path / "bad2", 2, *TWO,
                "evaluator.objectives=[{name:increment,metric:zoo_increment_search/acc,reference:low}]")
    from fuse_evo.evaluate.objectives import Objectives

    with pytest.raises(ConfigError, match=r"evaluator.objectives\[1\].reference: must be finite"):
        Objectives([{"name": "a", "metric": "t/acc"}, {"name": "b", "metric": "u/acc", "reference": float("inf")}],
                   prefix="evaluator.objectives")
    assert Objectives([{"name": "p", "cost": "params", "reference": 5e6}]).items[0].default_reference == 5e6
    assert not (tmp_path / "bad" / "archive.db").exists()


def test_nevergrad_measures_its_front_from_the_reference(micro_zoo, tmp_path):
    from fuse_evo.config import StrategyConfig
    from fuse_evo.search.strategies import make_strategy
    from fuse_evo.search.space import SearchSpace

    run = tmp_path / "de"
    result = _search(micro_zoo, run, 6, *TWO, "strategy=de_pareto",
                     "evaluator.objectives=[{name:increment,metric:zoo_increment_search/acc},"
                     "{name:reverse,metric:zoo_reverse_search/acc,reference:0.25}]")
    assert result.evaluations == 6
    with Archive.open(run) as archive:
        assert archive.info["multi_objective"] and archive.info["strategy"] == "nevergrad/DE"
        assert archive.reference_point()[0] == {"increment": 0.0, "reverse": 0.25}
    # the strategy hands the reference (losses) to Nevergrad before any tell
    cmd = compose_command("search", ["experiment=micro", *TWO])
    space = SearchSpace(cmd.space.__class__(method="task_arithmetic", models=["a", "b"], num_layers=2,
                                             genes=cmd.space.genes))
    strategy = make_strategy(StrategyConfig(backend="nevergrad", optimizer="DE", budget=10, num_objectives=2),
                             space, reference=[-0.0, -0.25])
    assert np.allclose(strategy.optimizer._hypervolume_pareto._upper_bounds, [0.0, -0.25])
    candidate = strategy.ask()
    strategy.tell(candidate, [-0.5, -0.5])
    assert len(strategy.optimizer.pareto_front()) == 1


def test_export_pareto_members_with_their_scores(mo_run, tmp_path, capsys):
    out = tmp_path / "front"
    assert main(["export", str(mo_run), "--pick", "pareto:2", "--out", str(out)]) == 0
    index = json.loads((out / "front.json").read_text())
    with Archive.open(mo_run) as archive:
        front = {t.number: t for t in archive.pareto_front()}
    assert index["exported"] == min(2, len(front)) and index["front_size"] == len(front)
    for member in index["members"]:
        folder = out / member["folder"]
        trial = front[member["trial"]]
        scores = json.loads((folder / "scores.json").read_text())
        assert scores["trial"] == trial.number and scores["search"]["objectives"] == trial.objectives
        card = (folder / "README.md").read_text()
        assert f"{trial.objectives['increment']:.4f}" in card and "held-out reverse" in card
        assert "pareto front" in card and (folder / "config.json").is_file() and (folder / "recipe.yaml").is_file()
    assert "| folder |" in capsys.readouterr().out

    every = tmp_path / "every"
    assert main(["export", str(mo_run), "--pick", "pareto", "--out", str(every), "--no-heldout"]) == 0
    assert sorted(p.name for p in every.iterdir() if p.is_dir()) == sorted(f"trial_{n}" for n in front)
    assert main(["export", str(mo_run), "--pick", "pareto:0", "--out", str(tmp_path / "x")]) == 2
    assert "pareto:K with K a whole number >= 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_report_figures_open_as_images(mo_run, capsys):
    import matplotlib.image as mpimg

    assert main(["report", str(mo_run), "--front-heldout", "2"]) == 0
    report = mo_run / "report"
    summary = json.loads((report / "summary.json").read_text())
    with Archive.open(mo_run) as archive:
        assert summary["pareto"]["front_size"] == len(archive.pareto_front())
        assert summary["pareto"]["hypervolume"] == pytest.approx(archive.hypervolume_history()[-1])
    assert sum(m.get("heldout") is not None for m in summary["pareto"]["members"]) == min(2, len(
        summary["pareto"]["members"]))
    text = (report / "summary.md").read_text()
    for png in ("convergence.png", "coefficients.png", "heatmap.png", "front.png", "hypervolume.png",
                "front_heatmap.png"):
        image = mpimg.imread(report / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, png
        assert f"]({png})" in text
    assert "## Pareto front" in capsys.readouterr().out


def test_compare_runs_and_seed_groups(mo_run, micro_zoo, tmp_path, capsys):
    import matplotlib.image as mpimg

    sweep = tmp_path / "sweep"
    _search(micro_zoo, sweep / "seed1", 6, *TWO, "strategy=nsga2", "strategy.population_size=4", "seed=1")
    _search(micro_zoo, sweep / "seed2", 6, *TWO, "strategy=nsga2", "strategy.population_size=4", "seed=2")
    assert main(["report", str(sweep), "--no-heldout"]) == 0  # a folder of runs
    out = sweep / "report"
    summary = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["seed1", "seed2"]
    assert len(summary["groups"]) == 1 and summary["groups"][0]["runs"] == 2  # differ only by seed
    best = max(summary["runs"], key=lambda r: r["best_scalar"])
    assert summary["best"] == {"run": best["run"], "dir": best["dir"], "trial": best["best_trial"],
                               "scalar": best["best_scalar"]}
    for r in summary["runs"]:
        with Archive.open(r["dir"]) as archive:
            assert r["hypervolume"] == pytest.approx(archive.hypervolume_history()[-1])
            curve = [t.scalar for t in archive.trials() if t.ok]
        reached = r["evaluations_to_95"]
        assert reached is not None and max(curve[:reached]) >= summary["threshold"]
    for png in ("compare.png", "compare_hypervolume.png", "compare_fronts.png"):
        assert mpimg.imread(out / png).ndim == 3
    assert "fuse-evo export" in (out / "compare.md").read_text() and "## Groups" in capsys.readouterr().out

    # two runs given by path, one of them with a 3-objective evaluator: refused by name
    other = tmp_path / "three"
    _search(micro_zoo, other, 2)
    with pytest.raises(CompareError, match=r"three: scored with other objectives"):
        compare_runs([mo_run, other], out=tmp_path / "cmp", heldout=False)
