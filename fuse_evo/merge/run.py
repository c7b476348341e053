"""One merge from a file to a folder: the body of `fuse-evo merge`.

The file is either our own merge file (``sources`` + ``recipe``, as every export writes it in
``recipe.yaml``) or a mergekit YAML config (recognised by ``merge_method``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FuseEvoError
from ..files import read_yaml_mapping
from ..models import ModelPool, PickledWeights
from ..recipe import Recipe
from . import mergekit
from .engine import MergeEngine
from .live import torch_dtype
from .save import check_out, save_from_engine, shard_bytes


def _local(ref: Any, here: Path) -> str:
    """A folder given relative to the working directory or to the merge file, made absolute (so
    the exported recipe.yaml works from anywhere); anything else (a hub id) as is."""
    for candidate in (Path(str(ref)).expanduser(), here / str(ref)):
        if candidate.is_dir():
            return str(candidate.resolve())
    return str(ref)


def merge_file(
    config: Path,
    out: Path,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    out = Path(out).expanduser().resolve()
    check_out(out, overwrite)
    shard_bytes(max_shard_size)
    data = read_yaml_mapping(config, f"merge config {config}")
    here = Path(config).resolve().parent
    if "merge_method" in data:
        mk = mergekit.parse(data, relative_to=here)
        sources, dtype = mk.sources(), mk.dtype
        base, models, base_name = sources["base"], mk.models, "base"
    elif "recipe" in data and "sources" in data:
        recipe = Recipe.from_dict(data["recipe"])
        sources = {k: _local(v, here) for k, v in data["sources"].items()}
        missing = [m for m in (recipe.base, *recipe.models) if m not in sources]
        if missing:
            raise FuseEvoError(f"merge config {config}: sources has no path for {missing}")
        base, models, base_name = sources[recipe.base], {m: sources[m] for m in recipe.models}, recipe.base
        dtype = data.get("dtype")
    else:
        raise FuseEvoError(
            f"merge config {config}: expected a fuse_evo merge file (sources + recipe) or a "
            "mergekit config (merge_method + models)"
        )
    torch_dtype(dtype, f"merge config {config}: dtype")
    try:
        pool = ModelPool(base, models, allow_pickle=allow_pickle, base_name=base_name)
    except PickledWeights as e:
        raise e.hint("--allow-pickle") from None
    if "merge_method" in data:
        recipe = mergekit.to_recipe(mk, pool)
    engine = MergeEngine(pool, device=device)
    engine.check(recipe)
    return save_from_engine(engine, recipe, pool.tokenizer(), out, sources, dtype=torch_dtype(dtype, "dtype"),
                            max_shard_size=max_shard_size, overwrite=overwrite)


def main(argv: list[str]) -> int:
    """``fuse-evo merge CONFIG --out DIR [...]``."""
    import argparse

    from ..device import check_device

    parser = argparse.ArgumentParser(
        prog="fuse-evo merge",
        description="Materialize a merge into a Hugging Face folder. CONFIG is a fuse_evo merge "
        "file (the recipe.yaml of an export: sources + recipe) or a mergekit YAML config.",
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="output model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin checkpoints (runs their code)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args(argv)
    check_device(args.device, "--device")
    out = merge_file(args.config, args.out, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                     device=args.device, max_shard_size=args.max_shard_size)
    print(f"merged model written to {out}")
    return 0
