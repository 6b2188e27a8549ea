"""Representation Surgery (Yang et al., "Representation Surgery for Multi-Task Model Merging",
ICML 2024).

One low-rank module per task on the encoder's final feature f (after the projection, before
normalisation): f' = f − up(ReLU(down(f))) (Eq. 4). The modules are trained on each task's
unlabeled test data to minimise the L1 distance between the merged model's corrected feature
and the expert's feature on the same images (Eq. 5); the merge itself stays fixed.

Since the merged backbone and the experts are both frozen, their final features on a test
image never change: with ``cache: true`` they are computed once (only for the indices the
seeded schedule draws) and the modules train on the cached features, which gives the result
of the reference loop that re-runs both models every step, at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.surgery.base import AdapterSurgery
from mergelab.surgery.modules import FINAL_SITE, SurgeryModel


class SurgeryV1(AdapterSurgery):
    """Representation Surgery v1: per-task module on the final feature, L1 to the expert
    (Yang et al., ICML 2024, Eqs. 4–5). Hyperparameters: see :class:`AdapterSurgery`."""

    name = "v1"
    block_sites = False
    merged_in_loop = False

    def loss(self, model: SurgeryModel, task: str, batch: dict[str, Tensor]) -> Tensor:
        """Eq. 5: mean |f'_merged − f_expert| on task ``task``'s batch (expert detached)."""
        if "feature" in batch:  # cached merged feature
            f = batch["feature"]
        else:  # the reference loop: re-run the (frozen) merged backbone
            with torch.no_grad():
                f = model.encode(batch["images"], task)
        return F.l1_loss(model.adapters[task][FINAL_SITE](f), batch["target"].detach())
