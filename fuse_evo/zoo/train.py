"""Pretraining and fine-tuning of zoo models: a plain AdamW loop over generated batches.

Skill examples are trained the way lm-eval scores them: the loss covers the continuation
(``" " + answer``) and the EOS, never the random input the prompt carries; generic text is
trained as ordinary language modelling.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .skills import SKILLS, Example, GenericText

IGNORE = -100


class MixtureBatches:
    """Endless batches drawn from a weighted mixture of skills and generic text.

    ``excluded`` holds evaluation prompts that training must never show, so the search and
    held-out splits measure generalisation, not memorisation.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mixture: dict[str, float],
        batch_size: int,
        seed: int,
        excluded: set[str],
        generic_seed: int,
    ):
        unknown = set(mixture) - set(SKILLS) - {"generic"}
        if unknown:
            raise ValueError(f"unknown data source(s) {sorted(unknown)}; known: generic, {sorted(SKILLS)}")
        self.tok = tokenizer
        self.names = [k for k, w in mixture.items() if w > 0]
        self.weights = [mixture[k] for k in self.names]
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.excluded = excluded
        self.generic = GenericText(generic_seed)

    def _sample(self, name: str) -> tuple[str, int]:
        """A training text and the number of leading tokens that carry no loss."""
        if name == "generic":
            return self.generic(self.rng), 1  # only BOS itself is never a target
        while True:
            ex: Example = SKILLS[name](self.rng)
            if ex.prompt not in self.excluded:
                return ex.text, len(self.tok(ex.prompt)["input_ids"])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        names = self.rng.choices(self.names, self.weights, k=self.batch_size)
        samples = [self._sample(n) for n in names]
        ids = [self.tok(text)["input_ids"] + [self.tok.eos_token_id] for text, _ in samples]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
        for row, (seq, (_, no_loss)) in enumerate(zip(ids, samples)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            labels[row, no_loss : len(seq)] = torch.tensor(seq[no_loss:])
        return input_ids, attention, labels


def new_model(
    vocab_size: int,
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    seed: int,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train(
    model: LlamaForCausalLM,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    lr: float,
    max_steps: int,
    warmup: int = 10,
    check_every: int = 0,
    should_stop: Callable[[int], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> int:
    """AdamW at a constant rate after a linear warmup; returns the number of steps taken.

    Every ``check_every`` steps ``should_stop(step)`` may end training early: the zoo stops
    the base once it is fair at the skills, wherever in the run that happens, which a fixed
    step count cannot promise across seeds (skills appear abruptly in small transformers).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    it = iter(batches)
    for step in range(1, max_steps + 1):
        model.train()
        input_ids, attention, labels = next(it)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.item())
        if check_every and should_stop is not None and step % check_every == 0:
            model.eval()
            if should_stop(step):
                return step
    model.eval()
    return max_steps
