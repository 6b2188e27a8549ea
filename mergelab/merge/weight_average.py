"""Weight averaging (model soup of the experts): θ = θ0 + (1/T) Σt τt = mean of the experts."""

from __future__ import annotations

import torch
from torch import Tensor

from mergelab.merge.base import MergeMethod


class WeightAverage(MergeMethod):
    """θ = (1/T) Σt θt. Every expert contributes (a known bug elsewhere dropped the last one)."""

    name = "weight_average"
    elementwise = True  # merge_key works entry by entry: merges stream in chunks

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        acc = torch.zeros_like(base, dtype=torch.float32)
        for v in experts:
            acc += v.float()
        return acc / len(experts)
