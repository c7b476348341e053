"""Archive: every evaluation of a search in a real database (SQLite in the run directory by
default, any SQLAlchemy URL, e.g. PostgreSQL, for a shared one).

Tables, prefixed ``fe_`` so an Optuna study (the dashboard mirror) can share the file:

- ``fe_runs``: one row per run: its id, experiment name, the resolved config (YAML) and what
  readers need without composing it again (``info``: models and their paths, the zoo, the
  genes and their bounds, the objectives, the strategy).
- ``fe_trials``: one row per evaluated candidate, written in one transaction: its number (0,
  1, ... in the order they finished), the strategy's candidate id, status (``complete``,
  ``failed``, or ``duplicate``: a recipe scored before, told the earlier result without a new
  evaluation), genome, recipe (as a dict), recipe key, metrics, objective values, losses, the
  scalar objective (larger is better), the error of a failure, the recipe's seed, the worker,
  start/finish times, timings, attempts (more than 1: its worker died and it was retried), and
  each scored document's outcome per metric, compressed (``Archive.outcomes``), and the
  fidelity (the fraction of the search split's documents scored: below 1 when racing
  stopped the candidate early) with the documents scored.
- ``fe_asks``: one row per candidate the strategy proposed, committed before it is dispatched:
  its id, genome, and how many tells came before it. With ``fe_trials`` (the tells, in
  ``number`` order) this is the strategy's whole history: resume replays it into a fresh,
  seeded strategy (the archive is the one truth; ``strategy.pkl`` is only a cache).
- ``fe_cache``: the SHA-256 of the run's ``strategy.pkl`` cache and the history position it
  holds; a cache whose checksum is not recorded here is never unpickled.

Read a finished (or running) search with ``Archive.open(run_dir)``; nothing here needs torch.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import sqlalchemy as sa
import yaml

from ..errors import FuseEvoError
from ..files import read_yaml_mapping
from ..evaluate.objectives import default_reference
from ..evaluate.outcomes import pack, unpack
from ..recipe import Candidate, candidate_from_dict
from . import pareto

CONFIG_FILE = "config.yaml"
DB_FILE = "archive.db"
STATUSES = ("complete", "failed", "duplicate")

_meta = sa.MetaData()
_runs = sa.Table(
    "fe_runs", _meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("info", sa.Text, nullable=False),
)
_trials = sa.Table(
    "fe_trials", _meta,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("fe_runs.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("candidate_id", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("genome", sa.Text, nullable=False),
    sa.Column("recipe", sa.Text, nullable=False),
    sa.Column("recipe_key", sa.String(64), nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("objectives", sa.Text, nullable=False),
    sa.Column("losses", sa.Text, nullable=True),
    sa.Column("scalar", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("duplicate_of", sa.Integer, nullable=True),
    sa.Column("worker", sa.String(200), nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float, nullable=False),
    sa.Column("timings", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("outcomes", sa.LargeBinary, nullable=True),  # per-document outcomes (evaluate/outcomes.py: pack)
    sa.Column("fidelity", sa.Float, nullable=True),  # the fraction of the search split scored (None: all, an older archive)
    sa.Column("documents", sa.Integer, nullable=True),  # documents scored
    sa.UniqueConstraint("run_id", "candidate_id", name="fe_trials_candidate"),
    sa.Index("fe_trials_recipe_key", "run_id", "recipe_key"),
)


_asks = sa.Table(
    "fe_asks", _meta,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("fe_runs.id"), primary_key=True),
    sa.Column("candidate_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("position", sa.Integer, nullable=False),  # 0, 1, ... in the order asked
    sa.Column("after_tells", sa.Integer, nullable=False),  # tells (trials) made before this ask
    sa.Column("genome", sa.Text, nullable=False),
    sa.Column("asked", sa.Float, nullable=False),
)
_cache = sa.Table(
    "fe_cache", _meta,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("fe_runs.id"), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("asks", sa.Integer, nullable=False),
    sa.Column("tells", sa.Integer, nullable=False),
    sa.Column("written", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Ask:
    """One archived ask: candidate ``candidate_id`` with ``genome``, proposed after
    ``after_tells`` tells."""

    candidate_id: int
    genome: list[float]
    after_tells: int


class ArchiveError(FuseEvoError):
    """A run directory or database that cannot be read as a search archive."""


@dataclass
class Trial:
    """One evaluated candidate. ``recipe`` is ``Recipe.to_dict()``; ``objectives`` maps each
    objective's name to its value in its own units; ``losses`` are what the strategy was told
    (minimized); ``scalar`` is the weighted objective sum, larger is better (None if failed).
    ``timings``: seconds (``merge``, ``score``, ``total``, and the evaluator's per request
    type); ``started``/``finished``: Unix times; ``attempts``: how many workers ran it (more
    than one when a worker died under it and it was retried)."""

    number: int
    candidate_id: int
    status: str
    genome: list[float]
    recipe: dict[str, Any]
    recipe_key: str
    metrics: dict[str, float] = field(default_factory=dict)
    objectives: dict[str, float] = field(default_factory=dict)
    losses: list[float] | None = None
    scalar: float | None = None
    error: str | None = None
    seed: int = 0
    duplicate_of: int | None = None
    worker: str = ""
    started: float = 0.0
    finished: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    fidelity: float = 1.0  # the fraction of the search split's documents scored (racing: < 1 when stopped)
    documents: int | None = None

    @property
    def ok(self) -> bool:
        """Scored (here or, for a duplicate, by the trial it repeats) and not failed."""
        return self.status != "failed" and self.scalar is not None

    def to_recipe(self) -> Candidate:
        """The candidate: a ``Recipe``, or a ``LayerPath`` for a data-flow search."""
        return candidate_from_dict(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _row_to_trial(row: Any) -> Trial:
    m = row._mapping
    return Trial(
        number=m["number"], candidate_id=m["candidate_id"], status=m["status"],
        genome=json.loads(m["genome"]), recipe=json.loads(m["recipe"]), recipe_key=m["recipe_key"],
        metrics=json.loads(m["metrics"]), objectives=json.loads(m["objectives"]),
        losses=None if m["losses"] is None else json.loads(m["losses"]),
        scalar=m["scalar"], error=m["error"], seed=m["seed"], duplicate_of=m["duplicate_of"],
        worker=m["worker"], started=m["started"], finished=m["finished"], timings=json.loads(m["timings"]),
        attempts=m["attempts"], fidelity=1.0 if m["fidelity"] is None else m["fidelity"], documents=m["documents"],
    )


def _add_missing_columns(engine: sa.Engine) -> None:
    """Archives written before a column existed get it, with its default (``attempts``: 1)."""
    have = {c["name"] for c in sa.inspect(engine).get_columns("fe_trials")}
    with engine.begin() as c:
        for column in _trials.columns:
            if column.name not in have:
                default = column.server_default.arg if column.server_default is not None else None
                c.execute(sa.text(f"ALTER TABLE fe_trials ADD COLUMN {column.name} "
                                  f"{column.type.compile(engine.dialect)}"
                                  + (f" NOT NULL DEFAULT {default}" if default is not None else "")))


_SCHEMA_LOCK = 0x66655F65766F  # "fe_evo": the PostgreSQL advisory lock taken while tables are created


@contextmanager
def schema_lock(engine: sa.Engine) -> Iterator[None]:
    """Serialize table creation between processes sharing one database: on PostgreSQL, where
    concurrent ``CREATE TABLE IF NOT EXISTS`` race (a unique violation in ``pg_type``), an
    advisory lock held for the block; elsewhere nothing (SQLite: see ``_create_tables``)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as c:
        c.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK})
        try:
            yield
        finally:
            c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK})
            c.commit()


def _create_tables(engine: sa.Engine) -> None:
    """Create the missing tables. SQLite creates each table in its own statement, so a writer
    racing another one can find a table made between its check and its create: it looks again
    (``create_all`` skips what exists) until its tables are all there."""
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            _meta.create_all(engine)
            return
        except sa.exc.OperationalError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.02 * (attempt + 1))


_CREATE_ATTEMPTS = 10


def default_url(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / DB_FILE}"


def _engine(url: str) -> sa.Engine:
    try:
        engine = sa.create_engine(url, future=True)
    except (sa.exc.ArgumentError, ImportError) as e:
        raise ArchiveError(f"run.db_url: {url!r} is not a usable database URL ({e})") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # a killed run never leaves a torn database
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    return engine


class Archive:
    """The evaluations of one run (``run_id``) in the database at ``url``.

    Writers (the search) call ``start_run`` once, then ``record`` per candidate. Readers
    (export, report, a notebook) open a run directory with ``Archive.open(run_dir)`` and use
    ``trials()``, ``best()``, ``pareto_front()``, ``info``, ``config``.
    """

    def __init__(self, url: str, run_id: str, create: bool = False):
        self.url = url
        self.run_id = run_id
        self.engine = _engine(url)
        try:
            with schema_lock(self.engine):
                if create:
                    _create_tables(self.engine)
                elif not sa.inspect(self.engine).has_table("fe_trials"):
                    raise ArchiveError(f"{_safe_url(url)} holds no search archive")
                _add_missing_columns(self.engine)
        except sa.exc.SQLAlchemyError as e:
            raise _db_error(url, e, "cannot be opened") from None

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sa.Connection]:
        """A connection (a transaction when ``write``); a damaged database becomes one
        ArchiveError that says how to recover it, not a driver traceback."""
        try:
            with (self.engine.begin() if write else self.engine.connect()) as c:
                yield c
        except sa.exc.DatabaseError as e:
            raise _db_error(self.url, e, "cannot be read") from None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, run_dir: str | Path) -> "Archive":
        """The archive of the search in ``run_dir`` (its config.yaml names the database and run id)."""
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        run = config.get("run") or {}
        if not run.get("id"):
            raise ArchiveError(f"{run_dir / CONFIG_FILE}: no run.id; not written by fuse-evo search")
        archive = cls(run.get("db_url") or default_url(run_dir), run["id"])
        if archive.run_row() is None:
            raise ArchiveError(f"{_safe_url(archive.url)} has no run {run['id']!r} (the run in {run_dir})")
        return archive

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the run
    def run_row(self) -> dict[str, Any] | None:
        with self._connect() as c:
            row = c.execute(sa.select(_runs).where(_runs.c.id == self.run_id)).first()
        return None if row is None else dict(row._mapping)

    def start_run(self, name: str, config_yaml: str, info: dict[str, Any]) -> None:
        """Register the run (first start), or refresh its config and info (a resume)."""
        with self._connect(write=True) as c:
            exists = c.execute(sa.select(_runs.c.id).where(_runs.c.id == self.run_id)).first()
            values = {"name": name, "config": config_yaml, "info": _dumps(info)}
            if exists:
                c.execute(_runs.update().where(_runs.c.id == self.run_id).values(**values))
            else:
                c.execute(_runs.insert().values(id=self.run_id, created=time.time(), **values))

    def delete_run(self) -> None:
        """Remove this run's rows (``run.overwrite`` on a shared database)."""
        with self._connect(write=True) as c:
            for table in (_trials, _asks, _cache):
                c.execute(table.delete().where(table.c.run_id == self.run_id))
            c.execute(_runs.delete().where(_runs.c.id == self.run_id))

    @property
    def info(self) -> dict[str, Any]:
        """What the run searched: ``name``, ``base`` (its name), ``sources`` (name -> path, the
        base included: what ``fuse_evo.merge.save`` writers take), ``zoo`` (the zoo folder
        and its ``zoo.json``, or None), ``genes`` / ``lower`` / ``upper``, ``objectives``
        (name, direction, weight, metric or cost), ``strategy``, ``seed``, ``budget``."""
        row = self._require_run()
        return json.loads(row["info"])

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was started (or last resumed) with, as plain data."""
        return yaml.safe_load(self._require_run()["config"])

    def _require_run(self) -> dict[str, Any]:
        row = self.run_row()
        if row is None:
            raise ArchiveError(f"{_safe_url(self.url)} has no run {self.run_id!r}")
        return row

    # ------------------------------------------------------------------ writing
    def record(self, trial: Trial, outcomes: Mapping[str, Any] | None = None) -> Trial:
        """Append one evaluation in one transaction; its ``number`` is assigned here.
        ``outcomes``: its per-document outcomes (``evaluate.outcomes``), stored compressed."""
        if trial.status not in STATUSES:
            raise ValueError(f"trial status {trial.status!r}: not one of {STATUSES}")
        with self._connect(write=True) as c:
            number = c.execute(
                sa.select(sa.func.coalesce(sa.func.max(_trials.c.number) + 1, 0)).where(_trials.c.run_id == self.run_id)
            ).scalar_one()
            trial.number = int(number)
            c.execute(_trials.insert().values(
                run_id=self.run_id, number=trial.number, candidate_id=trial.candidate_id, status=trial.status,
                genome=_dumps([float(x) for x in trial.genome]), recipe=_dumps(trial.recipe),
                recipe_key=trial.recipe_key, metrics=_dumps(trial.metrics), objectives=_dumps(trial.objectives),
                losses=None if trial.losses is None else _dumps(trial.losses),
                scalar=None if trial.scalar is None or not math.isfinite(trial.scalar) else float(trial.scalar),
                error=trial.error, seed=int(trial.seed), duplicate_of=trial.duplicate_of, worker=trial.worker,
                started=trial.started, finished=trial.finished, timings=_dumps(trial.timings),
                attempts=int(trial.attempts), outcomes=None if outcomes is None else pack(outcomes),
                fidelity=float(trial.fidelity), documents=trial.documents,
            ))
        return trial

    def outcomes(self, number: int) -> dict[str, Any] | None:
        """Trial ``number``'s per-document outcomes (``{"docs": ..., "values": ...}``), or None
        where none were recorded (a failure, a duplicate, an archive older than them)."""
        query = sa.select(_trials.c.outcomes).where(_trials.c.run_id == self.run_id, _trials.c.number == int(number))
        with self._connect() as c:
            return unpack(c.execute(query).scalar())

    def record_ask(self, candidate_id: int, genome: Sequence[float], after_tells: int) -> None:
        """Archive one ask (before its candidate is dispatched), so a resume can replay it."""
        with self._connect(write=True) as c:
            position = c.execute(
                sa.select(sa.func.count()).select_from(_asks).where(_asks.c.run_id == self.run_id)).scalar_one()
            c.execute(_asks.insert().values(run_id=self.run_id, candidate_id=int(candidate_id), position=int(position),
                                            after_tells=int(after_tells), genome=_dumps([float(x) for x in genome]),
                                            asked=time.time()))

    def asks(self) -> list[Ask]:
        """Every archived ask, in the order asked."""
        query = sa.select(_asks).where(_asks.c.run_id == self.run_id).order_by(_asks.c.position)
        with self._connect() as c:
            return [Ask(r.candidate_id, json.loads(r.genome), r.after_tells) for r in c.execute(query)]

    def count_asks(self) -> int:
        query = sa.select(sa.func.count()).select_from(_asks).where(_asks.c.run_id == self.run_id)
        with self._connect() as c:
            return int(c.execute(query).scalar_one())

    def set_cache(self, sha256: str, asks: int, tells: int) -> None:
        """Record the checksum of the strategy cache just written and the history it holds."""
        with self._connect(write=True) as c:
            c.execute(_cache.delete().where(_cache.c.run_id == self.run_id))
            c.execute(_cache.insert().values(run_id=self.run_id, sha256=sha256, asks=int(asks), tells=int(tells),
                                             written=time.time()))

    def cache(self) -> tuple[str, int, int] | None:
        """(sha256, asks, tells) of the last strategy cache recorded, or None."""
        with self._connect() as c:
            row = c.execute(sa.select(_cache).where(_cache.c.run_id == self.run_id)).first()
        return None if row is None else (row.sha256, row.asks, row.tells)

    # ------------------------------------------------------------------ reading
    def _select(self, *where: Any) -> list[Trial]:
        query = sa.select(_trials).where(_trials.c.run_id == self.run_id, *where).order_by(_trials.c.number)
        with self._connect() as c:
            return [_row_to_trial(r) for r in c.execute(query)]

    def trials(self, status: str | Sequence[str] | None = None) -> list[Trial]:
        """Every evaluation in order (or those of the given status(es))."""
        if status is None:
            return self._select()
        statuses = [status] if isinstance(status, str) else list(status)
        return self._select(_trials.c.status.in_(statuses))

    def __iter__(self) -> Iterator[Trial]:
        return iter(self.trials())

    def __len__(self) -> int:
        return self.count()

    def count(self, status: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(_trials).where(_trials.c.run_id == self.run_id)
        if status is not None:
            query = query.where(_trials.c.status == status)
        with self._connect() as c:
            return int(c.execute(query).scalar_one())

    def trial(self, number: int) -> Trial:
        found = self._select(_trials.c.number == int(number))
        if not found:
            raise ArchiveError(f"run {self.run_id}: no trial {number} (it has {self.count()})")
        return found[0]

    def by_candidate(self, candidate_id: int) -> Trial | None:
        found = self._select(_trials.c.candidate_id == int(candidate_id))
        return found[0] if found else None

    def by_recipe(self, key: str) -> Trial | None:
        """The evaluation (complete or failed, never a duplicate) of the recipe with this key."""
        found = self._select(_trials.c.recipe_key == key, _trials.c.status != "duplicate")
        return found[0] if found else None

    def best(self, k: int | None = None) -> Trial | None | list[Trial]:
        """The completed trial with the largest scalar objective (the first on ties); with
        ``k``, the k best, best first."""
        done = sorted(self.trials("complete"), key=lambda t: (-t.scalar, t.number))
        if k is not None:
            return done[:k]
        return done[0] if done else None

    # ------------------------------------------------------------------ Pareto view
    def directions(self) -> dict[str, str]:
        """``{objective name: "max" | "min"}`` in the run's objective order."""
        return {o["name"]: o["direction"] for o in self.info["objectives"]}

    def pareto_front(self) -> list[Trial]:
        """The front: every objective vector (each objective in its own direction) that no
        completed trial dominates, once, as its first trial, in trial order. Failed trials
        never count; trials with equal values (a duplicate recipe, or another recipe scoring
        the same) are one point, as the search log's live front counts them: one definition
        of the front and its size for the log, the report, compare and front.json."""
        directions = self.directions()
        done = scored(self.trials("complete"), directions)
        losses = [tuple(pareto.to_losses(t.objectives, directions)) for t in done]
        first = {}
        for i in pareto.front_indices(losses):
            first.setdefault(losses[i], done[i])
        return list(first.values())

    def reference_point(self) -> tuple[dict[str, float], dict[str, str]]:
        """The hypervolume's reference point in the objectives' own units, and where each
        value comes from: ``stated`` (the objective's ``reference``), ``default`` (0 for a
        maximized metric) or ``worst seen`` (the worst completed value; None-free only once
        a trial completed)."""
        point, source = {}, {}
        done = scored(self.trials("complete"), self.directions())
        for o in self.info["objectives"]:
            stated = o.get("reference")
            value = default_reference(stated, o.get("metric") is not None, o["direction"])
            if value is not None:
                point[o["name"]], source[o["name"]] = value, "stated" if stated is not None else "default"
            elif done:
                values = [float(t.objectives[o["name"]]) for t in done]
                point[o["name"]] = min(values) if o["direction"] == "max" else max(values)
                source[o["name"]] = "worst seen"
        return point, source

    def hypervolume_history(self, reference: Mapping[str, float] | None = None) -> list[float]:
        """The hypervolume of the front after each evaluation (trial order; failures and
        duplicates add nothing), against ``reference`` (objective units; default
        ``reference_point()``)."""
        directions = self.directions()
        reference = dict(reference) if reference is not None else self.reference_point()[0]
        if set(reference) != set(directions):
            raise ArchiveError(f"hypervolume: the reference point covers {sorted(reference)}, the run's objectives "
                               f"are {list(directions)}")
        ref = pareto.to_losses(reference, directions)
        return pareto.hypervolume_history(loss_points(self.trials(), directions), ref)


def scored(trials: Sequence[Trial], directions: Mapping[str, str]) -> list[Trial]:
    """The completed trials with a value for every objective (what a front is made of)."""
    return [t for t in trials if t.status == "complete" and t.ok and set(directions) <= set(t.objectives)]


def loss_points(trials: Sequence[Trial], directions: Mapping[str, str]) -> list[list[float] | None]:
    """Each trial's objectives as losses (``pareto.to_losses``), None where it was not
    scored (failed, a duplicate): the input of ``pareto.hypervolume_history``."""
    keep = {id(t) for t in scored(trials, directions)}
    return [pareto.to_losses(t.objectives, directions) if id(t) in keep else None for t in trials]


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/config.yaml as plain data (ArchiveError if absent or unreadable)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ArchiveError(f"{Path(run_dir)} is not a search run directory (no {CONFIG_FILE})")
    return read_yaml_mapping(path, str(path), ArchiveError)


def _db_error(url: str, e: Exception, what: str) -> ArchiveError:
    """The error for a database that fails: for a damaged SQLite file, how to save its rows."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    message = f"the archive database {_safe_url(url)} {what}: {type(e).__name__}: {first}"
    damaged = ("malformed", "not a database", "disk image", "file is encrypted")
    if url.startswith("sqlite") and any(d in str(e) for d in damaged):
        path = url.split("///", 1)[-1]
        message += (f". The file is damaged; its rows can usually be saved with sqlite3: `sqlite3 {path} .recover "
                    f"| sqlite3 {path}.recovered` then move {path}.recovered to {path} and resume (the strategy "
                    "is rebuilt from the archive); or pass run.overwrite=true to start afresh")
    return ArchiveError(message)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the database URL"
