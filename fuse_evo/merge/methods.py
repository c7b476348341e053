"""Merge operators: pure functions on tensors, fp32 accumulation, output in the input dtype.

mergekit's definitions are the reference semantics.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _check(tensors: Sequence[torch.Tensor], weights: Sequence[float], what: str) -> None:
    if len(tensors) != len(weights):
        raise ValueError(f"{what}: {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        raise ValueError(f"{what}: nothing to merge")


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average of whole weights (mergekit ``linear``; ``normalize`` divides by sum w)."""
    _check(tensors, weights, "linear")
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        acc.add_(t.float(), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear: weights sum to zero, cannot normalize")
        acc.div_(total)
    return acc.to(tensors[0].dtype)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """base + lambda * sum_i w_i (t_i - base) (mergekit ``task_arithmetic``)."""
    _check(tensors, weights, "task_arithmetic")
    base32 = base.float()
    delta = torch.zeros_like(base32)
    for t, w in zip(tensors, weights):
        delta.add_(t.float() - base32, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("task_arithmetic: weights sum to zero, cannot normalize")
        delta.div_(total)
    return (base32 + lambda_ * delta).to(base.dtype)
