"""The dashboard view: a run's archive mirrored into an Optuna study, so ``optuna-dashboard``
shows any run whatever its strategy. A view only: the archive is the truth, and the mirror
catches up with it on resume.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from .space import GenomeSpace


class StudyMirror:
    """Archived evaluations mirrored into an Optuna study in an RDB (the archive's database),
    so ``optuna-dashboard URL`` shows any run, whatever its backend.

    Each evaluation becomes a finished trial (``create_trial`` + ``add_trial``) with one
    FloatDistribution per gene, named by the gene; failed ones are FAIL trials. A
    single-objective run reports its scalar objective (maximized), a multi-objective one
    each objective in its direction; the objective values, the recipe key and the archive's
    trial number are user attributes. ``sync`` adds what the study misses (after a crash
    between the archive's commit and the mirror's), so the mirror catches up on resume.
    """

    def __init__(self, url: str, study_name: str, space: GenomeSpace, objectives: Sequence[tuple[str, str]] | None):
        """``objectives``: (name, "max"|"min") per objective for a multi-objective study;
        None for a single-objective one (the scalar, maximized)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._objectives = list(objectives) if objectives else None
        directions = ([("maximize" if d == "max" else "minimize") for _, d in self._objectives]
                      if self._objectives else ["maximize"])
        self._distributions = {g.name: FloatDistribution(g.low, g.high) for g in space.genes}
        self._names = space.names
        self.study = optuna.create_study(storage=url, study_name=study_name, directions=directions,
                                         load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is experimental
            self.study.set_metric_names([n for n, _ in self._objectives] if self._objectives else ["scalar"])
        self._seen = {t.user_attrs.get("number") for t in self.study.get_trials(deepcopy=False)}

    def _trial(self, t: Any) -> optuna.trial.FrozenTrial:
        params = {n: min(max(float(x), self._distributions[n].low), self._distributions[n].high)
                  for n, x in zip(self._names, t.genome)}
        attrs = {"number": t.number, "candidate_id": t.candidate_id, "status": t.status, "recipe_key": t.recipe_key,
                 "objectives": dict(t.objectives)}
        if t.error:
            attrs["error"] = t.error[:2000]
        if t.duplicate_of is not None:
            attrs["duplicate_of"] = t.duplicate_of
        if t.scalar is None:
            return optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=self._distributions,
                                             user_attrs=attrs)
        values = [t.objectives[n] for n, _ in self._objectives] if self._objectives else [t.scalar]
        return optuna.trial.create_trial(values=values, params=params, distributions=self._distributions,
                                         user_attrs=attrs)

    def add(self, trial: Any) -> None:
        """Mirror one archived trial (an ``archive.Trial``), unless it is there already."""
        if trial.number in self._seen:
            return
        self.study.add_trial(self._trial(trial))
        self._seen.add(trial.number)

    def sync(self, trials: Sequence[Any]) -> int:
        """Mirror the archived trials the study misses; returns how many were added."""
        missing = [t for t in trials if t.number not in self._seen]
        if missing:
            self.study.add_trials([self._trial(t) for t in missing])
            self._seen.update(t.number for t in missing)
        return len(missing)
