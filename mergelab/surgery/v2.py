"""SurgeryV2 (Yang et al., "SurgeryV2: Bridging the Gap Between Model Merging and Multi-Task
Learning with Deep Representation Surgery", arXiv 2410.14389).

The Surgery module (f' = f − up(ReLU(down(f)))) is placed after EVERY residual block of the
merged backbone, per token (CLS included) at the block width, plus the v1 module on the final
feature; all modules are task-specific and the corrected stream feeds the next block. Depth
and width are read from the model (the released code hard-codes 12 × 768).

Loss for task t (equal weights): Σ_l L1(mean_tokens(ẑ_l), mean_tokens(z_l^t)) + L1(f̂, f^t),
where ẑ_l is the corrected merged stream after block l and z_l^t the expert's stream there.
The expert targets are fixed, so with ``cache: true`` they are computed once per drawn test
image; the merged backbone stays in the loop (frozen), since earlier modules change the
input of later blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.errors import ConfigError
from mergelab.surgery.base import AdapterSurgery
from mergelab.surgery.modules import FINAL_SITE, SurgeryModel


class SurgeryV2(AdapterSurgery):
    """SurgeryV2: per-task modules after every block + on the final feature, trained with the
    sum of per-block token-mean L1 losses and the final-feature L1 (arXiv 2410.14389, §4).
    Hyperparameters: see :class:`AdapterSurgery` (authors: rank 16 for ViT-B, 4 for ViT-L/14)."""

    name = "v2"
    block_sites = True
    merged_in_loop = True

    def loss(self, model: SurgeryModel, task: str, batch: dict[str, Tensor]) -> Tensor:
        with model.route(task, record=True) as means:
            f = model.features(batch["images"], task)
        targets = batch["target_blocks"].detach()  # (B, n_blocks, D)
        if len(means) != targets.shape[1]:
            raise ConfigError(
                f"SurgeryV2 recorded {len(means)} blocks but the expert targets have {targets.shape[1]}"
            )
        loss = F.l1_loss(f, batch["target"].detach())
        for i, m in enumerate(means):
            loss = loss + F.l1_loss(m, targets[:, i])
        return loss

    def step_loss(self, model: SurgeryModel, batches: dict[str, dict[str, Tensor]]) -> Tensor:
        """Σ_t loss(t) with ONE encoder pass over all tasks' images: the rows of each task go
        through that task's block modules (blocks treat samples independently, so this is the
        per-task loop's value), then each task's final module and L1 terms on its rows."""
        # The reference loop stays per task, and so does a task-conditional merge (each
        # task's rows need that task's weights: one pass per task).
        if not self.cache or len(batches) == 1 or model.task_conditional:
            return super().step_loss(model, batches)
        segments, start = [], 0
        for t, b in batches.items():
            n = b["images"].shape[0]
            segments.append((t, start, start + n))
            start += n
        images = torch.cat([b["images"] for b in batches.values()])
        with model.route_segments(segments) as means:
            f = model.encoder(images)
        if len(means) != len(model.blocks):
            raise ConfigError(
                f"SurgeryV2 recorded {len(means)} blocks, expected {len(model.blocks)}"
            )
        total = images.new_zeros(())
        for t, a, b in segments:
            batch = batches[t]
            total = total + F.l1_loss(
                model.adapters[t][FINAL_SITE](f[a:b]), batch["target"].detach()
            )
            targets = batch["target_blocks"].detach()
            for i, m in enumerate(means):
                total = total + F.l1_loss(m[a:b], targets[:, i])
        return total
