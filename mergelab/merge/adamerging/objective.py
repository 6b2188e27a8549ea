"""AdaMerging's surrogate objective (Yang et al., ICLR 2024, Eq. 7): the Shannon entropy of
each task's predictions on its unlabeled test batches, H(ŷ) = −Σc ŷc log ŷc."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits) (AdaMerging's surrogate
    objective, H(ŷ) = −Σc ŷc log ŷc). Computed in float32 so bf16 logits stay accurate."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()
