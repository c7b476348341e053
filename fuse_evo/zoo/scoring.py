"""Exact-match accuracy the way lm-eval's loglikelihood ``acc`` computes it, in one batched pass.

lm-eval encodes ``context + continuation`` whole, splits it at the length of the encoded
context, and counts a document as correct when the greedy (argmax) token equals the target at
every continuation position. The zoo builder needs that number dozens of times (every model,
every uniform merge), so it computes it directly; a test checks it equals
``lm_eval.simple_evaluate`` on the generated task files.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .skills import Example


@torch.no_grad()
def greedy_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 256,
) -> float:
    if not examples:
        raise ValueError("no examples to score")
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        whole = [tokenizer(ex.text)["input_ids"] for ex in chunk]
        ctx_lens = [len(tokenizer(ex.prompt)["input_ids"]) for ex in chunk]
        width = max(len(w) for w in whole) - 1
        inputs = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(whole):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            mask[row, : len(ids) - 1] = 1
        predicted = model(input_ids=inputs, attention_mask=mask).logits.argmax(-1)
        for row, (ids, ctx) in enumerate(zip(whole, ctx_lens)):
            target = torch.tensor(ids[ctx:])
            correct += bool(torch.equal(predicted[row, ctx - 1 : len(ids) - 1], target))
    return correct / len(examples)
