#!/usr/bin/env bash
# The searches behind the studies in experiments/studies/ (tiny zoo, 2 CPU cores, one torch
# thread each). Each run is resumable: re-running this script skips finished runs.
#   bash experiments/studies/run.sh baselines    # study 1 (and the cma/random rows of study 3)
#   bash experiments/studies/run.sh strategies   # study 3 (DE, TPE, NSGA-II; after baselines)
#   bash experiments/studies/run.sh pareto       # study 2
# Then `fuse-evo report` per study: see each study's README for the exact command.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${STUDY_DIR:-runs/studies}
SEEDS=${SEEDS:-"0 1 2"}
search() { fuse-evo search run.progress=false "$@" | tail -n 3; }

case "${1:?baselines, strategies or pareto}" in
  baselines)
    search experiment=quickstart_uniform run.dir=$OUT/baselines/ta_grid  # 1 gene, 300 points: seed-free
    for s in $SEEDS; do
      search experiment=quickstart seed=$s run.dir=$OUT/baselines/cma_s$s
      search experiment=quickstart strategy=random seed=$s run.dir=$OUT/baselines/random_s$s
      search experiment=quickstart_uniform space=ties_grid seed=$s run.dir=$OUT/baselines/ties_grid_s$s
      search experiment=quickstart_uniform space=dare_grid seed=$s run.dir=$OUT/baselines/dare_grid_s$s
    done ;;
  strategies)
    for s in $SEEDS; do
      search experiment=quickstart strategy=de seed=$s run.dir=$OUT/strategies/de_s$s
      search experiment=quickstart strategy=tpe seed=$s run.dir=$OUT/strategies/tpe_s$s
      search experiment=quickstart strategy=nsga2 strategy.num_objectives=1 seed=$s run.dir=$OUT/strategies/nsga2_s$s
    done ;;
  pareto)
    search experiment=pareto_uniform run.dir=$OUT/pareto/uniform_grid  # seed-free: every grid point
    for s in $SEEDS; do
      search experiment=pareto_quickstart seed=$s run.dir=$OUT/pareto/nsga2_s$s
      search experiment=pareto_quickstart strategy=motpe seed=$s run.dir=$OUT/pareto/motpe_s$s
    done ;;
  *) echo "unknown study $1" >&2; exit 2 ;;
esac
