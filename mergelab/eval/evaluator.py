"""Per-task top-1 accuracy, computed by a measuring pass of the engine (``Trainer.predict``).

Under DDP each process classifies whole batches of the single-process batching (batch k on
rank k mod N, no padded sampler), so every test sample is counted exactly once; the per-task
counts of correct and seen samples are summed over the processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from mergelab.context import RunContext
from mergelab.engine import TaskBatches
from mergelab.errors import ConfigError


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
    """Accuracy (%) per task of ``model(x, task)`` on ``datasets[task]`` (``heads`` is kept
    for callers that pass it; the model routes to its own heads)."""
    tasks = list(tasks or datasets.keys())
    empty = [t for t in tasks if len(datasets[t]) == 0]
    if empty:
        raise ConfigError(f"task {empty[0]!r} has an empty test split; nothing to evaluate")
    slot = {t: i for i, t in enumerate(tasks)}
    # counts[i] = (correct, seen) of task i on this process
    counts = torch.zeros(len(tasks), 2, dtype=torch.long)

    def step(batch) -> None:
        pred = model(batch["images"], batch["task"]).argmax(dim=-1)
        hit = int((pred == batch["label"]).sum())
        counts[slot[batch["task"]]] += torch.tensor([hit, int(batch["label"].numel())])

    batches = TaskBatches({t: (datasets[t], None) for t in tasks}, ctx.eval_batch_size)
    ctx.engine.run(step, {"model": model}, batches, ctx.num_workers)
    total = ctx.engine.sum(counts)
    return {t: 100.0 * float(total[i, 0]) / float(total[i, 1]) for t, i in slot.items()}
