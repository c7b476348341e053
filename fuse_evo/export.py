"""Write a merged model as an ordinary Hugging Face folder, atomically.

The folder holds sharded safetensors, the config, the tokenizer, ``recipe.yaml`` (with the
source paths, so ``fuse-evo merge DIR/recipe.yaml`` rebuilds the same weights) and a model card
that says how the model was made. It is written to a temporary sibling and renamed into place,
so a crash never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import FuseEvoError
from .recipe import Recipe

DEFAULT_SHARD_SIZE = "2GB"


def merge_config(recipe: Recipe, sources: Mapping[str, str]) -> dict[str, Any]:
    """The file `fuse-evo merge` reads: where each named model lives, and the recipe."""
    return {"sources": {name: str(path) for name, path in sources.items()}, "recipe": recipe.to_dict()}


def _model_card(recipe: Recipe, sources: Mapping[str, str], scores: Mapping[str, float] | None) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, fuse_evo]",
        "---",
        f"# Merged model ({recipe.method})",
        "",
        "Made with fuse_evo: no training, a merge of fine-tunes of one base model.",
        "",
        f"- base: `{sources.get(recipe.base, recipe.base)}`",
        *[f"- {name}: `{sources.get(name, name)}`" for name in recipe.models],
        f"- recipe key: `{recipe.key}`",
    ]
    if scores:
        lines += ["", "## Scores", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in scores.items()]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def staging_dir(out: Path, error: type[FuseEvoError] = FuseEvoError) -> Path:
    """A fresh temporary folder beside ``out`` (the same file system, so the finished folder
    is renamed into place atomically); ``error`` names ``--out`` if it cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise error(f"--out {out}: cannot write there ({e.strerror or e})") from None


def default_permissions(folder: Path) -> None:
    """What a plain ``mkdir`` and ``open`` would have given (the umask's), not the private
    modes of a temporary directory and of some writers' temporary files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def save_merged(
    model,
    tokenizer,
    out: str | Path,
    recipe: Recipe,
    sources: Mapping[str, str],
    scores: Mapping[str, float] | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FuseEvoError(f"--out {out} already exists; remove it or pass --overwrite")
    tmp = staging_dir(out)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(merge_config(recipe, sources), sort_keys=False))
        (tmp / "README.md").write_text(_model_card(recipe, sources, scores))
        default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
