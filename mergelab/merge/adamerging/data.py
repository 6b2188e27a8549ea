"""AdaMerging's data: each task's unlabeled test split, sampled by a seeded per-task stream,
every step a batch of every task (Yang et al., ICLR 2024, Sec. 3.2).

The whole sampling is fixed up front from ``seed`` (task i draws from its own generator seeded
``seed + i``), so the run does not depend on Lightning's samplers or on the number of
processes: under DDP each process takes rows ``rank::world_size`` of every step's batch (the
global batch is split, not multiplied)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mergelab.engine import rank_rows
from mergelab.errors import ConfigError


def task_streams(
    sizes: Mapping[str, int], steps: int, batch_size: int, seed: int
) -> list[dict[str, Tensor]]:
    """The schedule: ``steps`` steps of ``task → batch_size test indices``. Task i's indices
    are successive random permutations of its split from a generator seeded ``seed + i``
    (without replacement within a pass, like a shuffled loader; a batch may span passes)."""
    for t, n in sizes.items():
        if int(n) < 1:
            raise ConfigError(f"task {t!r} has an empty test split; AdaMerging needs data")
    gens = {t: torch.Generator().manual_seed(int(seed) + i) for i, t in enumerate(sizes)}
    pending = {t: torch.empty(0, dtype=torch.long) for t in sizes}
    schedule = []
    for _ in range(int(steps)):
        step = {}
        for t, n in sizes.items():
            while pending[t].numel() < batch_size:
                pending[t] = torch.cat([pending[t], torch.randperm(int(n), generator=gens[t])])
            step[t], pending[t] = pending[t][:batch_size], pending[t][batch_size:]
        schedule.append(step)
    return schedule


class StepImages(Dataset):
    """Item ``s``: this process's images of step ``s`` (load with ``batch_size=None``),
    ``{"rows": global batch size per task, "tasks": task → images}``; a task with no local
    rows (a global batch smaller than the number of processes) is left out. Labels dropped:
    AdaMerging is unsupervised."""

    def __init__(
        self,
        test_sets: Mapping[str, Dataset],
        schedule: Sequence[Mapping[str, Tensor]],
        rank: int = 0,
        world_size: int = 1,
    ):
        self.test_sets, self.schedule = test_sets, list(schedule)
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, s: int) -> dict[str, Any]:
        step = self.schedule[s]
        tasks = {}
        for t, idx in step.items():
            mine = rank_rows(idx, self.rank, self.world_size)
            if mine.numel():
                tasks[t] = torch.stack([_image(self.test_sets[t][int(i)]) for i in mine])
        return {"rows": max(int(i.numel()) for i in step.values()), "tasks": tasks}


def _image(item: Any) -> Tensor:
    return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
