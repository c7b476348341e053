"""Build (or reuse) a zoo: tokenizer, task files, a base, its specialists, and the score table.

A build is keyed by the hash of its config. ``zoo.json`` is written last (atomically) and
records that key and a checksum of every weight file, so a reused build is known to be the
one the config asks for and intact; anything else is rebuilt with a message saying why.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ..config import ZooConfig
from ..errors import ConfigError, FuseEvoError
from ..files import atomic_write, file_sha256
from ..merge.methods import linear, task_arithmetic
from .scoring import greedy_exact_match
from .skills import SKILLS, Example, eval_splits
from .tasks import write_tasks
from .tokenizer import build_tokenizer
from .train import MixtureBatches, new_model, train

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: multiple-choice tasks
SMOL_FORMAT_VERSION = 2  # 2: generation targets kept as text (no ISO date column read as timestamps)
MARKER = ".fuse_evo_zoo"  # marks a directory this module owns and may rebuild
BASE = "base"
CHECKED_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def specialist_name(skill: str) -> str:
    return f"ft_{skill}"


def config_key(cfg: ZooConfig) -> str:
    fields = dataclasses.asdict(cfg)
    fields.pop("out_dir")
    if cfg.kind == "scratch":  # the fields a scratch build ignores: its caches stay valid
        for smol_only in ("kind", "gguf", "lora_rank", "lora_alpha"):
            fields.pop(smol_only)
    else:
        fields["smol_format_version"] = SMOL_FORMAT_VERSION
    fields["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: ZooConfig) -> None:
    """Reject a config that cannot build, naming the key, before any training."""
    if cfg.kind not in OWN_SKILL_BAR:
        raise ConfigError(f"zoo.kind: {cfg.kind!r} is not one of {sorted(OWN_SKILL_BAR)}")
    for key in ("n_search", "n_heldout", "batch_size", "finetune_max_steps", "finetune_check_every", "threads"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"zoo.{key} must be positive, got {getattr(cfg, key)}")
    if not cfg.uniform_scales:
        raise ConfigError("zoo.uniform_scales: give at least one scale")
    if len(cfg.skills) < 2 or len(set(cfg.skills)) != len(cfg.skills):
        raise ConfigError(f"zoo.skills: need at least two distinct skills, got {list(cfg.skills)}")
    if cfg.kind == "smol":
        from .smol import validate as validate_smol

        validate_smol(cfg)
        return
    unknown = [s for s in cfg.skills if s not in SKILLS]
    if unknown:
        raise ConfigError(f"zoo.skills: unknown skill(s) {unknown}; known: {sorted(SKILLS)}")
    if cfg.generation_skill is not None and cfg.generation_skill not in cfg.skills:
        raise ConfigError(
            f"zoo.generation_skill: {cfg.generation_skill!r} is not one of zoo.skills {list(cfg.skills)}"
        )
    bad_mix = set(cfg.pretrain_mixture) - set(cfg.skills) - {"generic"}
    if bad_mix:
        raise ConfigError(
            f"zoo.pretrain_mixture: {sorted(bad_mix)} not in zoo.skills and not 'generic'"
        )
    if any(w < 0 for w in cfg.pretrain_mixture.values()) or sum(cfg.pretrain_mixture.values()) <= 0:
        raise ConfigError("zoo.pretrain_mixture: weights must be >= 0 and not all zero")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"zoo.hidden_size ({cfg.hidden_size}) must be divisible by zoo.num_heads ({cfg.num_heads})"
        )
    for key in ("pretrain_max_steps", "pretrain_check_every", "hidden_size", "num_layers", "num_heads",
                "intermediate_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"zoo.{key} must be positive, got {getattr(cfg, key)}")


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` and prove it writable, or say why not; refuse to clobber foreign files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise FuseEvoError(f"zoo.out_dir {out} is not writable: {e.strerror or e}") from None
    entries = [p.name for p in out.iterdir()]
    if entries and MARKER not in entries:
        raise FuseEvoError(
            f"zoo.out_dir {out} is not empty and holds no zoo (found {sorted(entries)[:5]}); "
            "choose a new or empty directory"
        )



def load_cached(out: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of an intact build of ``key`` in ``out``, else (None, why it is unusable)."""
    manifest_path = out / "zoo.json"
    if not manifest_path.exists():
        return None, ("an earlier build did not finish" if (out / MARKER).exists() else None)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"zoo.json is corrupted ({e})"
    if manifest.get("config_key") != key:
        return None, f"it was built from another config (key {manifest.get('config_key')}, now {key})"
    for rel, digest in manifest.get("checksums", {}).items():
        path = out / rel
        if not path.exists():
            return None, f"{rel} is missing"
        if file_sha256(path) != digest:
            return None, f"{rel} is corrupted (checksum mismatch)"
    if Path(manifest.get("task_dir", "")) != (out / "tasks").resolve():
        # task YAMLs hold absolute data paths (lm-eval needs them): a moved zoo is rebuilt
        return None, f"it was built at {Path(manifest.get('task_dir', '')).parent} and moved"
    return manifest, None


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write a model folder atomically: into a sibling temp folder, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def _progress_bar(progress: bool):
    def bar(desc: str, total: int) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    return bar


class ScratchBuilder:
    """The scratch zoo's parts: a character tokenizer, a base pretrained here until it is fair
    at every skill, and full fine-tunes (``zoo/smol.py``'s builder has the same interface)."""

    def __init__(self, cfg: ZooConfig, bar: Callable[[str, int], tqdm]):
        self.cfg = cfg
        self._bar = bar
        self.tok = build_tokenizer()
        self.splits: dict[str, dict[str, list[Example]]] = {}
        for skill in cfg.skills:
            search, heldout = eval_splits(skill, cfg.seed, cfg.n_search, cfg.n_heldout)
            self.splits[skill] = {"search": search, "heldout": heldout}
        self.excluded = {ex.prompt for s in self.splits.values() for exs in s.values() for ex in exs}

    def write_tasks(self, task_dir: Path) -> dict[str, dict[str, str]]:
        return write_tasks(task_dir, self.splits, self.cfg.generation_skill)

    def scores(self, model: LlamaForCausalLM, split: str) -> dict[str, float]:
        return {
            skill: round(greedy_exact_match(model, self.tok, self.splits[skill][split]), 4)
            for skill in self.cfg.skills
        }

    def base(self) -> tuple[LlamaForCausalLM, int]:
        cfg = self.cfg
        model = new_model(
            len(self.tok), self.tok, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
            cfg.intermediate_size, cfg.max_positions, cfg.seed,
        )
        batches = MixtureBatches(
            self.tok, dict(cfg.pretrain_mixture), cfg.batch_size, cfg.seed + 1, self.excluded, cfg.seed
        )
        bar = self._bar("pretrain base (until fair)", cfg.pretrain_max_steps)

        def fair_enough(step: int) -> bool:
            search = self.scores(model, "search")
            bar.set_postfix(search_mean=f"{_mean(search):.2f}")
            return _mean(search) >= cfg.pretrain_target

        steps = train(model, batches, cfg.pretrain_lr, cfg.pretrain_max_steps,
                      check_every=cfg.pretrain_check_every, should_stop=fair_enough,
                      on_step=lambda step, loss: bar.update(1))
        bar.close()
        return model, steps

    def finetune(self, base: LlamaForCausalLM, skill: str, index: int) -> tuple[LlamaForCausalLM, int]:
        cfg = self.cfg
        model = copy.deepcopy(base)
        batches = MixtureBatches(
            self.tok, {skill: 1.0}, cfg.batch_size, cfg.seed + 100 + index, self.excluded, cfg.seed
        )
        bar = self._bar(f"fine-tune {skill} (until expert)", cfg.finetune_max_steps)

        def expert_enough(step: int) -> bool:
            acc = greedy_exact_match(model, self.tok, self.splits[skill]["search"])
            bar.set_postfix({skill: f"{acc:.2f}"})
            return acc >= cfg.finetune_target

        steps = train(model, batches, cfg.finetune_lr, cfg.finetune_max_steps,
                      check_every=cfg.finetune_check_every, should_stop=expert_enough,
                      on_step=lambda step, loss: bar.update(1))
        bar.close()
        return model, steps


def uniform_merges(base: LlamaForCausalLM, specialists: list[LlamaForCausalLM], scales: list[float],
                   scores: Callable[[LlamaForCausalLM, str], dict[str, float]]) -> dict[str, Any]:
    """Task arithmetic of all specialists at each global scale, and their plain average, on
    the held-out split."""
    base_sd = base.state_dict()
    spec_sds = [m.state_dict() for m in specialists]
    scratch = copy.deepcopy(base)
    ones = [1.0] * len(spec_sds)
    ta: dict[str, Any] = {}
    for scale in scales:
        merged = {k: task_arithmetic(v, [sd[k] for sd in spec_sds], ones, lambda_=scale)
                  for k, v in base_sd.items()}
        scratch.load_state_dict(merged)
        s = scores(scratch, "heldout")
        ta[f"{scale:g}"] = {"scores": s, "mean": round(_mean(s), 4)}
    best_scale = max(ta, key=lambda k: ta[k]["mean"])
    scratch.load_state_dict({k: linear([sd[k] for sd in spec_sds], ones) for k in base_sd})
    avg = scores(scratch, "heldout")
    return {
        "task_arithmetic": {
            "scales": ta,
            "best_scale": float(best_scale),
            "best": ta[best_scale],
        },
        "linear": {"scores": avg, "mean": round(_mean(avg), 4)},
    }


# A specialist's bar on its own skill: 0.95 on the scratch zoo; 0.9 on the smol zoo, whose
# word-list reversal a 135M model reaches 0.9-0.98 on in a gentle fine-tune, not 0.95 reliably.
OWN_SKILL_BAR = {"scratch": 0.95, "smol": 0.9}


def _summary(manifest: dict[str, Any], skills: list[str], own_bar: float) -> dict[str, Any]:
    """The bars a zoo must pass. Headroom compares like with like: the specialists' own-skill
    mean against the best uniform merge's mean over the same skills (a smol zoo's retention
    task belongs to no specialist; the uniform merge is chosen by its mean over every task)."""
    models = manifest["models"]
    means = {name: _mean(m["scores"]) for name, m in models.items()}
    best_single = max(means, key=means.get)
    own = [models[specialist_name(s)]["scores"][s] for s in skills]
    best = manifest["uniform_merges"]["task_arithmetic"]["best"]
    best_on_skills = sum(best["scores"][s] for s in skills) / len(skills)
    own_mean = sum(own) / len(own)
    return {
        "best_single_model": best_single,
        "best_single_mean": round(means[best_single], 4),
        "best_uniform_mean": best["mean"],
        "best_uniform_skills_mean": round(best_on_skills, 4),
        "specialists_own_skill_mean": round(own_mean, 4),
        "headroom": round(own_mean - best_on_skills, 4),
        "bars": {
            f"every_specialist_ge_{own_bar:g}_on_own_skill": min(own) >= own_bar,
            "best_uniform_beats_every_single_model": best["mean"] > means[best_single],
            "headroom_ge_0.15": own_mean - best_on_skills >= 0.15,
        },
    }


def build_zoo(cfg: ZooConfig, progress: bool = True) -> dict[str, Any]:
    """Return the zoo manifest for ``cfg``, building it unless an intact build is cached."""
    validate(cfg)
    out = cfg.resolved_out_dir()
    prepare_out_dir(out)
    key = config_key(cfg)
    manifest, why = load_cached(out, key)
    if manifest is not None:
        log.info("reusing the zoo built at %s (config key %s)", out, key)
        return manifest
    if why:
        log.warning("the zoo at %s cannot be reused: %s; rebuilding", out, why)
    (out / "zoo.json").unlink(missing_ok=True)
    for stale in ("models", "tasks"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / MARKER).write_text(key)

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # our own bars say what is happening
    try:
        return _build(cfg, out, key, progress)
    finally:
        torch.set_num_threads(threads)
        hf_logging.enable_progress_bar()


def _build(cfg: ZooConfig, out: Path, key: str, progress: bool) -> dict[str, Any]:
    if cfg.kind == "smol":
        from .smol import SmolBuilder

        b = SmolBuilder(cfg, out, _progress_bar(progress))
    else:
        b = ScratchBuilder(cfg, _progress_bar(progress))
    task_dir = out / "tasks"
    tasks = b.write_tasks(task_dir)

    base, base_steps = b.base()
    log.info("base: %d training steps", base_steps)
    models: dict[str, LlamaForCausalLM] = {BASE: base}
    steps = {BASE: base_steps}
    skill_of: dict[str, str | None] = {BASE: None}
    for i, skill in enumerate(cfg.skills):
        name = specialist_name(skill)
        models[name], steps[name] = b.finetune(base, skill, i)
        skill_of[name] = skill
        log.info("%s fine-tuned for %d steps", name, steps[name])

    manifest: dict[str, Any] = {
        "base": BASE,
        "models": {},
        "tasks": tasks,
        "task_dir": str(task_dir.resolve()),
    }
    checksums: dict[str, str] = {}
    for name, model in models.items():
        path = out / "models" / name
        _save(model, b.tok, path)
        manifest["models"][name] = {
            "path": str(path.resolve()),
            "skill": skill_of[name],
            "scores": b.scores(model, "heldout"),
            "train_steps": steps[name],
        }
        for f in CHECKED_FILES:
            checksums[f"models/{name}/{f}"] = file_sha256(path / f)
    for f in sorted(task_dir.rglob("*")):
        if f.is_file():
            checksums[str(f.relative_to(out))] = file_sha256(f)
    manifest["uniform_merges"] = uniform_merges(
        base, [models[specialist_name(s)] for s in cfg.skills], list(cfg.uniform_scales), b.scores
    )
    manifest["summary"] = _summary(manifest, list(cfg.skills), OWN_SKILL_BAR[cfg.kind])
    manifest.update(
        config_key=key,
        config=dataclasses.asdict(cfg),
        parameters=sum(p.numel() for p in base.parameters()),
        split="heldout",
        metric=("exact match (greedy, as lm-eval loglikelihood acc); retention: multiple-choice acc"
                if cfg.kind == "smol" else "exact match (greedy, as lm-eval loglikelihood acc)"),
        checksums=checksums,
    )
    atomic_write(out / "zoo.json", json.dumps(manifest, indent=2))
    return manifest


def score_table(manifest: dict[str, Any]) -> str:
    """The manifest as a terminal table: held-out accuracy per skill, and the mean."""
    skills = list(manifest["tasks"])
    rows: list[tuple[str, dict[str, float]]] = [
        (name, m["scores"]) for name, m in manifest["models"].items()
    ]
    merges = manifest["uniform_merges"]
    for scale, r in merges["task_arithmetic"]["scales"].items():
        rows.append((f"task_arithmetic x{scale}", r["scores"]))
    rows.append(("linear (average)", merges["linear"]["scores"]))
    width = max(len(r[0]) for r in rows) + 2
    head = "model".ljust(width) + "".join(s[:10].rjust(11) for s in skills) + "mean".rjust(8)
    lines = [head, "-" * len(head)]
    for name, scores in rows:
        lines.append(
            name.ljust(width)
            + "".join(f"{scores[s]:11.3f}" for s in skills)
            + f"{_mean(scores):8.3f}"
        )
    s = manifest["summary"]
    lines += [
        "",
        f"best single model: {s['best_single_model']} ({s['best_single_mean']:.3f}); "
        f"best uniform merge: task_arithmetic x{merges['task_arithmetic']['best_scale']:g} "
        f"({s['best_uniform_mean']:.3f}); specialists on their own skill: "
        f"{s['specialists_own_skill_mean']:.3f} (headroom {s['headroom']:.3f} over the merge's "
        f"{s.get('best_uniform_skills_mean', s['best_uniform_mean']):.3f} on the same skills)",
        "bars: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in s["bars"].items()),
    ]
    return "\n".join(lines)
