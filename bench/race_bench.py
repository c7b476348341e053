"""Documents scored per candidate: full scoring vs racing (``evaluator.fidelity=race``).

For each seed, the same search twice, once scoring every candidate on every document and
once raced (random search by default: its candidates do not depend on what it is told, so
both runs see the same candidates and the comparison is paired). Prints, per run, the mean
documents scored per candidate, the candidates stopped early, the best search scalar and
the scoring seconds; then the ratio of documents. The held-out comparison of the bests (with
its paired interval) is ``fuse-evo report OUT/full-S --baseline OUT/race-S``.

    python bench/race_bench.py --zoo runs/zoo-tiny --experiment quickstart --budget 40 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", required=True, help="a built zoo folder (models.zoo.out_dir)")
    p.add_argument("--experiment", default="micro")
    p.add_argument("--budget", type=int, default=24)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategy", default="random")
    p.add_argument("--out", default="/tmp/race_bench")
    p.add_argument("overrides", nargs="*", help="more search overrides (key=value)")
    args = p.parse_args(argv)
    from fuse_evo.config import compose
    from fuse_evo.search.archive import Archive
    from fuse_evo.search.run import run_search

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for fidelity in ("full", "race"):
            run_dir = Path(args.out) / f"{fidelity}-{seed}"
            cmd = compose("search", [f"experiment={args.experiment}", f"models.zoo.out_dir={args.zoo}",
                                     f"run.dir={run_dir}", f"run.budget={args.budget}", f"strategy={args.strategy}",
                                     f"seed={seed}", f"evaluator.fidelity={fidelity}", "space.scan=0",
                                     "run.progress=false", "run.dashboard=false", *args.overrides])
            run_search(cmd)
            with Archive.open(run_dir) as archive:
                done = archive.trials("complete")
                rows.append({"seed": seed, "fidelity": fidelity, "candidates": len(done),
                             "documents_per_candidate": statistics.mean(t.documents or 0 for t in done),
                             "split": max(t.documents or 0 for t in done),
                             "stopped": sum(t.fidelity < 1 for t in done), "best": archive.best().scalar,
                             "score_s": sum(t.timings.get("score", 0.0) for t in done)})
            r = rows[-1]
            print(f"seed {seed} {fidelity:>4}: {r['documents_per_candidate']:.1f} documents per candidate of "
                  f"{r['split']}, stopped {r['stopped']}/{r['candidates']}, best {r['best']:.4f}, "
                  f"scoring {r['score_s']:.1f} s", flush=True)
    full = statistics.mean(r["documents_per_candidate"] for r in rows if r["fidelity"] == "full")
    race = statistics.mean(r["documents_per_candidate"] for r in rows if r["fidelity"] == "race")
    print(f"racing scores {full / race:.2f}x fewer documents per candidate (target 3x)")
    (Path(args.out) / "race_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
