"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ0 + λ Σt τt, τt = θt − θ0."""

from __future__ import annotations

import torch
from torch import Tensor

from mergelab.merge.base import MergeMethod


class TaskArithmetic(MergeMethod):
    """θ = θ0 + λ Σt (θt − θ0); ``scaling`` is λ (0.3 by default, as in the papers)."""

    name = "task_arithmetic"
    elementwise = True  # merge_key works entry by entry: merges stream in chunks

    def __init__(self, scaling: float = 0.3):
        super().__init__()
        self.scaling = float(scaling)

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        b = base.float()
        acc = torch.zeros_like(b)
        for v in experts:
            acc += v.float() - b
        return b + self.scaling * acc
