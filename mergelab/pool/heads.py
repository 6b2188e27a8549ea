"""Frozen classification heads, as in the task_vectors protocol."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassificationHead(nn.Linear):
    """logits = W · f/‖f‖ (+ b). W rows are (scaled) class embeddings; the head normalises its
    input, exactly like task_vectors' ``ClassificationHead(normalize=True)``. Always frozen."""

    def __init__(self, weights: Tensor, biases: Tensor | None = None, normalize: bool = True):
        out_dim, in_dim = weights.shape
        super().__init__(in_dim, out_dim, bias=biases is not None)
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weights)
            if biases is not None:
                self.bias.copy_(biases)
        self.requires_grad_(False)

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return super().forward(features)
