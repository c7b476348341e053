#!/usr/bin/env bash
# The smol study (experiments/smol_quickstart.md): the zoo, the per-block searches and their
# uniform baselines at the same budget, the held-out report, and the winner checked by
# generation. Run from the repository root on 2 CPU cores: about an hour in all.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fuse-evo zoo zoo=smol zoo.out_dir=runs/zoo-smol
fuse-evo search experiment=smol_quickstart
fuse-evo search experiment=smol_uniform
fuse-evo search experiment=smol_uniform space=ties_uniform run.dir=runs/smol_uniform_ties
fuse-evo search experiment=smol_uniform space=dare_grid run.dir=runs/smol_uniform_dare
fuse-evo export runs/smol_uniform_dare --pick best --out runs/smol_uniform_dare-best --overwrite  # its held-out row
fuse-evo search experiment=smol_ties
fuse-evo search experiment=smol_ties space=dare_ties run.dir=runs/smol_dare_ties
fuse-evo report runs/smol_quickstart --baseline runs/smol_uniform --baseline runs/smol_uniform_ties \
  --baseline runs/smol_ties --baseline runs/smol_dare_ties
fuse-evo export runs/smol_quickstart --pick best --out runs/smol_quickstart-best --overwrite
fuse-evo eval runs/smol_quickstart-best --include_path runs/zoo-smol/tasks \
  --tasks smol_extraction_gen_heldout,smol_transform_gen_heldout,smol_dates_gen_heldout \
  --output_path runs/smol_quickstart-best/generation.json
