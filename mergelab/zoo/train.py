"""Lightning modules and in-memory data plumbing used to build the embedded zoo.

Pretraining: a generic pretext task on the unlabeled mixture of all tasks' TRAIN splits —
predict (which of 4 rotations was applied, which input domain) — so the backbone learns
generic visual features without ever seeing a test split or a task label.
Fine-tuning: the task_vectors protocol — full fine-tuning of the image encoder with the
task's classification head frozen, AdamW + warm-up + cosine.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset


class RandomBatches(IterableDataset):
    """Endless random batches drawn from in-memory tensors (whole-batch indexing: no per-item
    collate overhead, which dominates for tiny models on CPU)."""

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, seed: int):
        self.tensors = tensors
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.tensors[0])
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                idx = perm[i : i + self.batch_size]
                yield tuple(t[idx] for t in self.tensors)


def batch_loader(tensors: tuple[Tensor, ...], batch_size: int, seed: int) -> DataLoader:
    return DataLoader(RandomBatches(tensors, batch_size, seed), batch_size=None)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Trainable(L.LightningModule):
    def __init__(self, lr: float, weight_decay: float, warmup: int, steps: int):
        super().__init__()
        self.lr, self.weight_decay, self.warmup, self.steps = lr, weight_decay, warmup, steps

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.warmup, self.steps)
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


class PretextPretrainer(_Trainable):
    """Predict (rotation k ∈ {0,1,2,3}, domain d) jointly from the encoder's feature."""

    def __init__(self, encoder: nn.Module, feature_dim: int, n_domains: int, **opt):
        super().__init__(**opt)
        self.encoder = encoder
        self.n_domains = n_domains
        self.classifier = nn.Linear(feature_dim, 4 * n_domains)

    def training_step(self, batch, _):
        x, domain = batch
        k = torch.randint(0, 4, (x.shape[0],), device=x.device)
        x = x.clone()
        for r in range(1, 4):
            sel = k == r
            x[sel] = torch.rot90(x[sel], r, dims=(2, 3))
        logits = self.classifier(self.encoder(x))
        loss = nn.functional.cross_entropy(logits, k * self.n_domains + domain)
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss


class FrozenHeadFinetuner(_Trainable):
    """Full fine-tuning of the encoder through a frozen classification head."""

    def __init__(self, encoder: nn.Module, head: nn.Module, **opt):
        super().__init__(**opt)
        self.encoder = encoder
        self.head = head.requires_grad_(False)

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.encoder(x)), y)
        self.log("finetune/loss", loss, prog_bar=True)
        return loss


def fit(
    module: L.LightningModule, loader: DataLoader, steps: int, desc: str, progress: bool
) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    print(f"[mergelab zoo] {desc}: {steps} steps", flush=True)
    trainer.fit(module, train_dataloaders=loader)
