"""Merge operators on constructed tensors."""

from __future__ import annotations

import pytest
import torch

from fuse_evo.merge.methods import linear, task_arithmetic


def test_task_arithmetic_adds_scaled_task_vectors():
    base = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 4.0, 0.0])
    out = task_arithmetic(base, [a, b], [1.0, 0.5], lambda_=0.5)
    expected = base + 0.5 * (1.0 * (a - base) + 0.5 * (b - base))
    assert torch.allclose(out, expected)
    assert torch.equal(task_arithmetic(base, [a, b], [0.0, 0.0]), base)


def test_task_arithmetic_normalize_divides_by_weight_sum():
    base = torch.zeros(4)
    a, b = torch.ones(4), 3 * torch.ones(4)
    assert torch.allclose(task_arithmetic(base, [a, b], [1.0, 1.0], normalize=True), 2 * torch.ones(4))


def test_operators_accumulate_in_fp32_and_keep_the_dtype():
    base = torch.full((8,), 1.0, dtype=torch.bfloat16)
    tiny = base + torch.tensor(2.0**-7, dtype=torch.bfloat16)  # one bf16 ulp above 1
    out = task_arithmetic(base, [tiny] * 4, [0.25] * 4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, tiny)


def test_linear_average_and_errors():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([2.0, 4.0])
    assert torch.allclose(linear([a, b], [1.0, 1.0]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(linear([a, b], [1.0, 1.0], normalize=False), torch.tensor([2.0, 6.0]))
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        linear([a, b], [1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        linear([a, b], [1.0, -1.0])
