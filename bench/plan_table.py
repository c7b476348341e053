"""The README's memory-plan table: 7B-70B Llama shapes x 2-4 sources on 80 GB and 141 GB GPUs.

Computed by the plan every search prints at its start (``fuse_evo.merge.placement``), for
layouts made from the shapes (no files): a TIES space (magnitude histograms), a bf16 live
model, the evaluator at batch 8 x 2048 tokens (vocabulary logits at 64 scored positions
per row: the evaluator asks the model for those only), 8 workers on a node of ``--host-gb`` host
memory. ``fuse-evo plan models=paths ... plan.gpu_memory_gb=80`` gives the same numbers for
real model folders.

    python bench/plan_table.py            # markdown table on stdout
    python bench/plan_table.py --vllm     # the same with evaluator.backend=vllm: its weight copy and KV cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuse_evo.merge.placement import Machine, PlacementError, llama_shape, memory_plan  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, vocab, heads, kv heads
    "Llama-2-7B": (4096, 32, 11008, 32000, 32, 32),
    "Llama-3-8B": (4096, 32, 14336, 128256, 32, 8),
    "Qwen2.5-14B": (5120, 48, 13824, 152064, 40, 8),
    "Llama-3-70B": (8192, 80, 28672, 128256, 64, 8),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host-gb", type=float, default=2000.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sequence", type=int, default=2048)
    p.add_argument("--scored", type=int, default=64, help="positions per row with vocabulary logits")
    p.add_argument("--vllm", action="store_true", help="score with a vLLM engine beside the live model")
    args = p.parse_args()
    gpus = (80, 141)
    print("| model | sources | sources + base | " + " | ".join(
        f"{g} GB: gpu / stream / cpu need, chosen" for g in gpus) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in gpus) + " |")
    for name, shape in SHAPES.items():
        base = llama_shape(name, *shape)
        for n in (2, 3, 4):
            sources = [llama_shape(f"{name}-ft{i}", *shape) for i in range(n)]
            cells = []
            for g in gpus:
                machine = Machine(int(g * 1e9), int(args.host_gb * 1e9), args.workers)
                try:
                    plan = memory_plan(base, sources, machine, batch_size=args.batch,
                                       sequence_length=args.sequence, scored_tokens=args.scored,
                                       vllm=args.vllm, max_model_len=args.sequence)
                    chosen = plan.chosen
                    needs = plan.needs
                except PlacementError:
                    chosen, needs = "none fits", None
                if needs is None:
                    cells.append(chosen)
                else:
                    cells.append(" / ".join(f"{needs[k].gpu / 1e9:.0f}" for k in ("gpu", "stream", "cpu"))
                                 + f" GB, **{chosen}**"
                                 + (f", KV {plan.kv_cache_bytes / 1e9:.0f} GB" if args.vllm else ""))
            resident = (base.bytes + sum(s.bytes for s in sources)) / 1e9
            print(f"| {name} | {n} | {resident:.0f} GB | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
