"""Per-task evaluation as a LightningModule with torchmetrics (correct under DDP: metrics are
synchronised across processes when computed)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mergelab.context import RunContext


class TaskEvaluator(L.LightningModule):
    """Runs ``model(x, task)`` over one dataloader per task; top-1 accuracy per task."""

    def __init__(self, model: nn.Module, tasks: list[str], num_classes: Mapping[str, int]):
        super().__init__()
        self.model = model
        self.task_names = list(tasks)
        self.acc = nn.ModuleDict(
            {
                t: torchmetrics.classification.MulticlassAccuracy(num_classes[t], average="micro")
                for t in tasks
            }
        )

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch[0], batch[1]
        task = self.task_names[dataloader_idx]
        logits = self.model(x, task)
        self.acc[task].update(logits.argmax(-1), y)
        self.log(
            f"acc/{task}", self.acc[task], on_step=False, on_epoch=True, add_dataloader_idx=False
        )


def num_classes_of(head: nn.Module) -> int:
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    heads: Mapping[str, nn.Module],
    ctx: RunContext,
    tasks: list[str] | None = None,
) -> dict[str, float]:
    """Accuracy (%) per task of ``model(x, task)`` on ``datasets[task]``."""
    tasks = list(tasks or datasets.keys())
    evaluator = TaskEvaluator(model, tasks, {t: num_classes_of(heads[t]) for t in tasks})
    loaders = [
        DataLoader(datasets[t], batch_size=ctx.eval_batch_size, num_workers=ctx.num_workers)
        for t in tasks
    ]
    trainer = ctx.make_trainer(logger=False)
    trainer.test(evaluator, dataloaders=loaders, verbose=False)
    return {t: 100.0 * float(trainer.callback_metrics[f"acc/{t}"]) for t in tasks}
