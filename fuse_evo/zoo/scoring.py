"""Accuracies the way lm-eval computes them, in batched passes: loglikelihood ``acc`` (exact
match) and multiple-choice ``acc``.

lm-eval encodes ``context + continuation`` whole and splits it at the length of the encoded
context; a loglikelihood document is correct when the greedy (argmax) token equals the target
at every continuation position, a multiple-choice one when its gold choice has the highest
summed log-likelihood. The zoo builder needs these numbers dozens of times (every model, every
uniform merge), so it computes them directly; tests check they equal lm-eval's on the
generated task files.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .skills import Example


def _logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, whole: list[list[int]]) -> torch.Tensor:
    """Logits of each sequence but its last token, right-padded into one batch."""
    width = max(len(w) for w in whole) - 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = torch.full((len(whole), width), pad, dtype=torch.long)
    mask = torch.zeros((len(whole), width), dtype=torch.long)
    for row, ids in enumerate(whole):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        mask[row, : len(ids) - 1] = 1
    return model(input_ids=inputs, attention_mask=mask).logits


@torch.no_grad()
def greedy_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 256,
) -> float:
    """The share of ``examples`` (anything with ``prompt`` and ``text``) whose continuation is
    the greedy one at every position."""
    if not examples:
        raise ValueError("no examples to score")
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        whole = [tokenizer(ex.text)["input_ids"] for ex in chunk]
        ctx_lens = [len(tokenizer(ex.prompt)["input_ids"]) for ex in chunk]
        predicted = _logits(model, tokenizer, whole).argmax(-1)
        for row, (ids, ctx) in enumerate(zip(whole, ctx_lens)):
            target = torch.tensor(ids[ctx:])
            correct += bool(torch.equal(predicted[row, ctx - 1 : len(ids) - 1], target))
    return correct / len(examples)


@torch.no_grad()
def choice_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list,
                    batch_size: int = 64) -> float:
    """lm-eval's multiple-choice ``acc``: a document is correct when its gold choice has the
    highest summed log-likelihood as the continuation ``"\n" + choice`` of its prompt (each
    example has ``prompt``, ``choices`` and ``gold``)."""
    if not examples:
        raise ValueError("no examples to score")
    model.eval()
    pairs = [(ex.prompt, "\n" + c) for ex in examples for c in ex.choices]
    totals: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        whole = [tokenizer(p + c)["input_ids"] for p, c in chunk]
        ctx_lens = [len(tokenizer(p)["input_ids"]) for p, _ in chunk]
        logprobs = _logits(model, tokenizer, whole).float().log_softmax(-1)
        for row, (ids, ctx) in enumerate(zip(whole, ctx_lens)):
            target = torch.tensor(ids[ctx:])
            totals.append(float(logprobs[row, ctx - 1:len(ids) - 1].gather(-1, target[:, None]).sum()))
    correct, k = 0, 0
    for ex in examples:
        scores = totals[k:k + len(ex.choices)]
        k += len(ex.choices)
        correct += max(range(len(scores)), key=scores.__getitem__) == ex.gold
    return correct / len(examples)
