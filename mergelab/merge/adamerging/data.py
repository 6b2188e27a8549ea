"""AdaMerging's data: each task's unlabeled test split, one shuffled loader per task, zipped
so that every step sees a batch of every task (Yang et al., ICLR 2024, Sec. 3.2)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mergelab.errors import ConfigError


class UnlabeledImages(Dataset):
    """A test split with its labels stripped (AdaMerging adapts on unlabeled test data)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        item = self.data[i]
        return item[0] if isinstance(item, (tuple, list)) else item


class TaskBatches(L.LightningDataModule):
    """One shuffled loader per task, zipped so that every step sees a batch of every task."""

    def __init__(
        self,
        test_sets: Mapping[str, Dataset],
        tasks: list[str],
        batch_size: int,
        num_workers: int,
        seed: int,
    ):
        super().__init__()
        self.test_sets, self.tasks = test_sets, tasks
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def train_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        loaders = {}
        for i, task in enumerate(self.tasks):
            data = UnlabeledImages(self.test_sets[task])
            if len(data) == 0:
                raise ConfigError(f"task {task!r} has an empty test split; AdaMerging needs data")
            loaders[task] = DataLoader(
                data,
                batch_size=self.batch_size,
                shuffle=True,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(self.seed + i),
            )
        # max_size_cycle: small test splits are cycled so every step has every task.
        return CombinedLoader(loaders, mode="max_size_cycle")
