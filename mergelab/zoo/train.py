"""Lightning modules and in-memory data plumbing used to build the embedded zoo.

Pretraining (CLIP's role, see :mod:`mergelab.zoo.text`): image–caption contrastive learning
on the mixture of all tasks' TRAIN splits — each image is scored against every caption and
must pick its own (InfoNCE over the caption set, learned temperature, as in CLIP). Test
splits are never seen.
Fine-tuning: the task_vectors protocol — full fine-tuning of the image encoder with the
task's zero-shot head frozen, AdamW + warm-up + cosine, small steps.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from mergelab.engine import Engine
from mergelab.zoo.text import CaptionSet, TextTower


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


class CaptionPretrainer(_Trainable):
    """CLIP-style pretraining: image features against the text tower's embedding of every
    caption, cross-entropy to the image's own caption (InfoNCE with the whole caption set as
    negatives), learned temperature initialised at 1/0.07 and capped at 100 (as CLIP).

    Batches are ``(images, task ids, labels)`` with label −1 where the image's caption does
    not name its class; each image is rotated by a random quarter turn that its caption names.
    """

    def __init__(
        self,
        encoder: nn.Module,
        text: TextTower,
        captions: CaptionSet,
        orientations: int,
        **opt,
    ):
        super().__init__(**opt)
        self.encoder = encoder
        self.text = text
        self.caption_set = captions
        self.orientations = orientations
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def training_step(self, batch, _):
        x, task_ids, labels = batch
        r = torch.randint(0, self.orientations, (x.shape[0],), device=x.device)
        x = x.clone()
        for k in range(1, self.orientations):
            sel = r == k
            x[sel] = torch.rot90(x[sel], k, dims=(2, 3))
        target = self.caption_set.index(task_ids, r, labels)
        image = F.normalize(self.encoder(x), dim=-1)
        text = self.text(self.caption_set.captions)
        logits = self.logit_scale.exp().clamp(max=100.0) * image @ text.T
        loss = F.cross_entropy(logits, target)
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


class StepProgress(L.Callback):
    """A progress bar over optimiser steps (Lightning's bar counts epochs, which an endless
    stream of batches does not have: it read "Epoch 0/-2")."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def on_train_start(self, trainer, module):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.bar.update(trainer.global_step - self.bar.n)
        loss = trainer.callback_metrics.get(
            "pretrain/loss", trainer.callback_metrics.get("finetune/loss")
        )
        if loss is not None and trainer.global_step % 20 == 0:
            self.bar.set_postfix(loss=f"{float(loss):.3f}")

    def on_train_end(self, trainer, module):
        self.bar.close()


def build_engine(engine: Engine | None = None) -> Engine:
    """The engine a zoo is built with: ``engine`` (the run's) on this process alone — the
    pool is built by one process while the others wait (:meth:`Engine.rank_zero_first`) — or,
    without one (library use), the CPU in fp32."""
    return (engine or Engine()).single_device()


def fit(
    module: L.LightningModule,
    loader: DataLoader,
    steps: int,
    desc: str,
    progress: bool,
    engine: Engine,
) -> None:
    """Train ``module`` for ``steps`` optimiser steps through ``engine`` (its device and
    precision); afterwards the module is back on the CPU, where the zoo's files are written."""
    if not progress:
        print(f"[mergelab zoo] {desc}: {steps} steps", flush=True)
    engine.fit(
        module, loader, steps, logger=False, callbacks=[StepProgress(desc)] if progress else []
    )
    module.cpu()
