"""Write a merged model as an ordinary Hugging Face folder, atomically.

The folder holds sharded safetensors, the config, the tokenizer, ``recipe.yaml`` (with the
source paths, so ``fuse-evo merge DIR/recipe.yaml`` rebuilds the same weights) and a model card
that says how the model was made. It is written to a temporary sibling and renamed into place,
so a crash never leaves a half-written model where a finished one is expected; ``--overwrite``
swaps the new folder with the old one before deleting the old (``replace_folder``), and the
next export or merge into the same ``--out`` removes what a killed one left (``clean_stale``).
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import FuseEvoError
from ..recipe import Recipe

DEFAULT_SHARD_SIZE = "2GB"


def merge_config(recipe: Recipe, sources: Mapping[str, str]) -> dict[str, Any]:
    """The file `fuse-evo merge` reads: where each named model lives, and the recipe."""
    return {"sources": {name: str(path) for name, path in sources.items()}, "recipe": recipe.to_dict()}


def model_card(recipe: Recipe, sources: Mapping[str, str], scores: Mapping[str, float] | None) -> str:
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


# Hidden siblings of ``--out``: ``.NAME.staging-PID-XXXX`` (a model being written) and
# ``.NAME.old-PID-XXXX`` (the model being replaced, while the new one moves in); PID is the
# writer's, so a later export can tell the leftovers of a killed one from a running one's.
_SIBLING = re.compile(r"\.(staging|old)-(\d+)-[^/]*$")


def check_out(out: Path, overwrite: bool, error: type[FuseEvoError] = FuseEvoError) -> None:
    """Judge ``--out`` before anything is loaded or merged, after cleaning what killed
    writers of it left behind (``clean_stale``)."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out else "lies under"
            raise error(f"--out {out} {where} {parent}, which is a file, not a folder: choose another --out")
        if parent.exists():
            break
    clean_stale(out)
    if out.exists() and not overwrite:
        raise error(f"--out {out} already exists; remove it or pass --overwrite")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def clean_stale(out: Path) -> list[str]:
    """Remove what killed writers of ``out`` left beside it (only folders whose process is gone);
    a replaced model that was set aside but never deleted while ``out`` is missing is put back.
    Says so on stderr and returns the lines."""
    lines = []
    if not out.parent.is_dir():
        return lines
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        match = _SIBLING.search(path.name)
        if not match or not path.is_dir() or path.name[1:len(out.name) + 1] != out.name or _alive(int(match[2])):
            continue
        kind, pid, size = match[1], int(match[2]), _size(path)
        if kind == "old" and not out.exists() and (path / "model").is_dir():
            os.replace(path / "model", out)
            shutil.rmtree(path, ignore_errors=True)
            lines.append(f"fuse-evo: {out} was missing and its previous model lay aside in {path.name} "
                         f"(process {pid}, gone, was replacing it): put back")
            continue
        shutil.rmtree(path, ignore_errors=True)
        lines.append(f"fuse-evo: removed {path} ({size / 2**20:.1f} MiB), left by process {pid} that was "
                     f"writing {out.name} and is gone")
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def staging_dir(out: Path, error: type[FuseEvoError] = FuseEvoError) -> Path:
    """A fresh temporary folder beside ``out`` (the same file system, so the finished folder
    is renamed into place atomically), named with this process's id (``clean_stale``);
    ``error`` names ``--out`` if it cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise error(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); OSError where the
    system or file system cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def replace_folder(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out`` so that at every instant ``out`` holds one
    complete model: a new ``out`` is a rename; an existing one is swapped with ``new`` in one
    step (or, where that cannot be done, renamed aside first and put back by ``clean_stale``
    if this process dies before the new one is in), and only then deleted."""
    if not out.exists():
        os.replace(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    try:
        _exchange(new, out)
    except OSError:  # no atomic swap here: aside, then in
        os.rename(out, aside / "model")
        try:
            os.replace(new, out)
        except BaseException:
            os.rename(aside / "model", out)
            shutil.rmtree(aside, ignore_errors=True)
            raise
    else:
        os.rename(new, aside / "model")  # the previous model, swapped to `new`
    shutil.rmtree(aside)


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
    check_out(out, overwrite)
    tmp = staging_dir(out)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        _write_rest(tmp, out, tokenizer, recipe, sources, scores)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_rest(tmp: Path, out: Path, tokenizer, recipe: Recipe, sources: Mapping[str, str],
                scores: Mapping[str, float] | None) -> None:
    """A staged model's tokenizer, recipe.yaml and card; then the folder moved into ``out``."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(merge_config(recipe, sources), sort_keys=False))
    (tmp / "README.md").write_text(model_card(recipe, sources, scores))
    default_permissions(tmp)
    replace_folder(tmp, out)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(size: str | int, option: str = "--max-shard-size") -> int:
    """``2GB``, ``500MB``, ``1GiB`` or a number of bytes, as transformers' ``max_shard_size``."""
    if isinstance(size, int):
        return size
    m = _SIZE.fullmatch(str(size))
    if not m or float(m.group(1)) <= 0:
        raise FuseEvoError(f"{option}: {size!r} is not a size such as 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def save_from_engine(engine, recipe: Recipe, tokenizer, out: str | Path, sources: Mapping[str, str],
                     dtype=None, scores: Mapping[str, float] | None = None,
                     max_shard_size: str = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write ``recipe``'s merge as an HF folder tensor by tensor from ``engine`` (a
    MergeEngine): one shard of merged tensors in memory at a time, never a whole second model.
    ``dtype``: the saved weights' torch dtype (default: the base's)."""
    dtypes = {n: dtype or t.dtype for n, t in engine.base.items()}
    return _save_shards(lambda n: engine.merged(recipe, n, dtype), dtypes, engine.shapes, Path(engine.pool.base.path),
                        tokenizer, out, recipe, sources, scores, max_shard_size, overwrite)


def save_live_model(model, pool, tokenizer, out: str | Path, recipe: Recipe, sources: Mapping[str, str],
                    scores: Mapping[str, float] | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE,
                    overwrite: bool = False) -> Path:
    """Write a live model (the weights a search scored, on any device) as an HF folder of the
    pool base's tensors, shard by shard: one shard on the host at a time, the model itself
    never moved or copied whole."""
    state = model.state_dict()
    names = [n for n in pool.base.tensors]
    missing = [n for n in names if n not in state]
    if missing:
        raise FuseEvoError(f"the live model has no tensor {missing[0]!r}: not a model of the base's architecture")
    return _save_shards(lambda n: state[n].detach(), {n: state[n].dtype for n in names},
                        {n: state[n].shape for n in names}, Path(pool.base.path), tokenizer, out, recipe, sources,
                        scores, max_shard_size, overwrite)


def _save_shards(tensor_of, dtypes: Mapping[str, "torch.dtype"], shapes: Mapping[str, Any], base: Path, tokenizer,
                 out: str | Path, recipe: Recipe, sources: Mapping[str, str], scores, max_shard_size: str,
                 overwrite: bool) -> Path:
    """The folder of tensors ``tensor_of(name)`` (in ``dtypes``' order), sharded as transformers
    shards, with the base's config (its dtype the saved one), tokenizer, recipe and card."""
    import json
    import math

    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    check_out(out, overwrite)
    limit = shard_bytes(max_shard_size)
    sizes = {n: math.prod(shapes[n]) * d.itemsize for n, d in dtypes.items()}
    shards: list[list[str]] = [[]]
    held = 0
    for n in sizes:  # a new file once the next tensor would pass the limit
        if shards[-1] and held + sizes[n] > limit:
            shards.append([])
            held = 0
        shards[-1].append(n)
        held += sizes[n]
    files = ([SAFETENSORS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tmp = staging_dir(out)
    try:
        weight_map = {}
        for file, shard in zip(files, shards):
            tensors = {n: tensor_of(n).cpu().contiguous() for n in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            del tensors
        if len(files) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
        config = json.loads((base / "config.json").read_text())
        saved = str(next(iter(dtypes.values()))).removeprefix("torch.")
        config.update({"torch_dtype": saved, "dtype": saved} if "dtype" in config else {"torch_dtype": saved})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if (base / "generation_config.json").exists():
            shutil.copy(base / "generation_config.json", tmp / "generation_config.json")
        _write_rest(tmp, out, tokenizer, recipe, sources, scores)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


SAFETENSORS_FILE = "model.safetensors"
