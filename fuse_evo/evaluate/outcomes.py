"""Per-document outcomes: their compact storage and the paired statistics made from them.

An evaluation's outcomes are ``{"docs": {task: [dataset ids]}, "values": {task: {"metric,filter":
[value per document]}}}`` (``Scores.docs`` / ``Scores.outcomes``): for the metrics lm-eval
averages over documents, the mean of a task's values is its reported metric. Two models scored
on the same documents are compared *paired*, document by document, which removes the variance
the documents share; ``paired_bootstrap`` gives the difference with a percentile interval.
Nothing here needs torch or lm-eval.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import FuseEvoError

Outcomes = dict[str, Any]  # {"docs": {task: [ids]}, "values": {task: {metric: [values]}}}


def outcomes_of(scores) -> Outcomes:
    """The outcomes of a ``Scores`` (evaluate/evaluator.py) as plain data."""
    return {"docs": {t: list(map(int, ids)) for t, ids in scores.docs.items()},
            "values": {t: {k: list(v) for k, v in row.items()} for t, row in scores.outcomes.items()}}


def pack(outcomes: Outcomes) -> bytes:
    """Compressed bytes: a JSON header, then per task its document ids (delta-coded int64)
    and per metric its values (bits when all are 0 or 1, else float64), zlib over all: 0/1
    outcomes of 1000 consecutive documents take about 250 bytes."""
    header, blobs = {}, []
    for task, ids in outcomes["docs"].items():
        ids = np.asarray(ids, dtype=np.int64)
        blobs.append(np.diff(ids, prepend=0).tobytes())
        metrics = {}
        for key, values in (outcomes["values"].get(task) or {}).items():
            v = np.asarray(values, dtype=np.float64)
            binary = bool(np.isin(v, (0.0, 1.0)).all())
            blobs.append(np.packbits(v.astype(np.uint8)).tobytes() if binary else v.tobytes())
            metrics[key] = "bits" if binary else "f8"
        header[task] = {"n": int(ids.size), "metrics": metrics}
    head = json.dumps(header, separators=(",", ":")).encode()
    return zlib.compress(len(head).to_bytes(4, "little") + head + b"".join(blobs), 9)


def unpack(data: bytes | None) -> Outcomes | None:
    if data is None:
        return None
    raw = zlib.decompress(data)
    size = int.from_bytes(raw[:4], "little")
    header, at = json.loads(raw[4:4 + size]), 4 + size
    docs, values = {}, {}
    for task, h in header.items():
        n = h["n"]
        docs[task] = np.cumsum(np.frombuffer(raw, np.int64, n, at)).tolist()
        at += 8 * n
        values[task] = {}
        for key, kind in h["metrics"].items():
            if kind == "bits":
                width = (n + 7) // 8
                v = np.unpackbits(np.frombuffer(raw, np.uint8, width, at))[:n].astype(np.float64)
                at += width
            else:
                v = np.frombuffer(raw, np.float64, n, at)
                at += 8 * n
            values[task][key] = v.tolist()
    return {"docs": docs, "values": values}


def aligned(a: Outcomes, b: Outcomes, task: str, metric: str,
            task_b: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``metric`` of ``task`` under ``a`` and (``task_b`` or ``task``) under ``b``
    on the documents both scored, in the same order."""
    task_b = task_b or task
    for side, o, t in (("first", a, task), ("second", b, task_b)):
        if metric not in (o.get("values") or {}).get(t, {}):
            raise FuseEvoError(f"no per-document values of {t}/{metric} in the {side} evaluation")
    where_b = {d: i for i, d in enumerate(b["docs"][task_b])}
    pairs = [(i, where_b[d]) for i, d in enumerate(a["docs"][task]) if d in where_b]
    if not pairs:
        raise FuseEvoError(f"{task}/{metric}: the two evaluations share no document")
    ia, ib = map(list, zip(*pairs))
    return np.asarray(a["values"][task][metric])[ia], np.asarray(b["values"][task_b][metric])[ib]


@dataclass(frozen=True)
class Difference:
    """``a - b`` with its percentile bootstrap interval at ``level``; ``n``: documents paired."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def within_noise(self) -> bool:
        """The interval covers 0: the data cannot tell the two apart."""
        return self.low <= 0.0 <= self.high

    def text(self) -> str:
        return (f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"
                + (" within noise" if self.within_noise else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level,
                "within_noise": self.within_noise}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Difference":
        return cls(d["value"], d["low"], d["high"], d["n"], d.get("level", 0.95))


def paired_bootstrap(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     weights: Mapping[str, float] | None = None, *, iters: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> tuple[dict[str, Difference], Difference]:
    """Per key (a task's metric) the mean difference ``a - b`` over its paired documents, and
    their weighted sum (``weights``: a run's objective weights, signed by direction, for its
    scalar; None: 1/K each, the plain mean), each with a percentile interval from ``iters``
    bootstrap resamples of the documents (each key resampled on its own documents, the same
    draw for both sides: the pairing is kept)."""
    if not pairs:
        raise FuseEvoError("paired_bootstrap: nothing to compare")
    if not 0 < level < 1:
        raise FuseEvoError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    w = {k: float(weights[k]) if weights is not None else 1.0 / len(pairs) for k in pairs}
    tail = (1 - level) / 2
    per_key, mean_draws, mean_value = {}, np.zeros(iters), 0.0
    for key, (a, b) in pairs.items():
        d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
        if d.size == 0 or d.shape != np.asarray(b).shape:
            raise FuseEvoError(f"paired_bootstrap: {key}: the two sides must pair the same, nonempty documents")
        draws = np.concatenate([d[rng.integers(0, d.size, size=(min(1000, iters - i), d.size))].mean(axis=1)
                                for i in range(0, iters, 1000)])  # 1000 resamples at a time: bounded memory
        lo, hi = np.quantile(draws, [tail, 1 - tail])
        per_key[key] = Difference(float(d.mean()), float(lo), float(hi), int(d.size), level)
        mean_draws += w[key] * draws
        mean_value += w[key] * float(d.mean())
    lo, hi = np.quantile(mean_draws, [tail, 1 - tail])
    return per_key, Difference(mean_value, float(lo), float(hi), sum(x.n for x in per_key.values()), level)


# ---------------------------------------------------------------------------- racing
def race_stages(n_docs: Mapping[str, int], fractions: Sequence[float], seed: int = 0) -> list[dict[str, list[int]]]:
    """Nested document subsets, one per stage: each task's positions in a seeded permutation
    (the task's name and ``seed``: the same subsets for every candidate, so comparisons are
    paired), its first ``ceil(f * n)`` for each fraction ``f`` (the last must be 1: every
    document). Returned as the positions each stage *adds*."""
    fractions = [float(f) for f in fractions]
    if not fractions or fractions[-1] != 1.0 or any(not 0 < f <= 1 for f in fractions) \
            or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise FuseEvoError(f"race stages {fractions}: increasing fractions in (0, 1], the last 1")
    stages: list[dict[str, list[int]]] = [{} for _ in fractions]
    for task, n in n_docs.items():
        order = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(n).tolist()
        done = 0
        for stage, f in zip(stages, fractions):
            upto = max(done, min(n, math.ceil(f * n)))
            if upto > done:
                stage[task] = order[done:upto]
            done = upto
    return stages


def race_upper_bound(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]], totals: Mapping[str, int],
                     weights: Mapping[str, float], z: float) -> tuple[float, float]:
    """(estimate, upper bound) of the full split's weighted difference ``a - b`` from the
    documents scored so far: per key the mean paired difference, summed with ``weights``;
    the upper bound adds ``z`` standard errors of a mean whose differences get two pseudo-
    documents, one disagreeing each way (+1 and -1, as the Agresti-Caffo interval for paired
    proportions adds them: a few one-sided disagreements are not certainty), with the
    finite-population correction ``1 - n/N`` (the scored documents are known exactly)."""
    estimate, shifted, variance = 0.0, 0.0, 0.0
    for key, (a, b) in pairs.items():
        d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
        n, total = d.size, int(totals[key])
        if n == 0 or n > total:
            raise FuseEvoError(f"race: {key}: {n} documents scored of {total}")
        w = float(weights[key])
        estimate += w * float(d.mean())
        padded = np.concatenate([d, [1.0, -1.0]])
        shifted += w * float(padded.mean())
        variance += w * w * float(padded.var()) / padded.size * (1.0 - n / total)
    return estimate, shifted + z * math.sqrt(variance)
