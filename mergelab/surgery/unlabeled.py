"""The unlabeled adaptation data of a task: a seeded subset of its test split, images only.

Training-free repairs (stats, REPAIR) and the representation-bias analysis measure on what
the papers use: unlabeled test images of each task. Drawing the subset from a seed makes every
pass (expert, merged, before/after) see the same images in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


def unlabeled_indices(n: int, num_samples: int | None, seed: int) -> Tensor:
    """The sorted indices of ``num_samples`` of ``n`` items (all if None or more than ``n``),
    drawn without replacement with ``seed``: the same subset for every pass."""
    if num_samples is None or num_samples >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: int(num_samples)].sort().values


def unlabeled_loader(
    dataset: Dataset, num_samples: int | None, batch_size: int, seed: int, num_workers: int = 0
) -> DataLoader:
    """A fixed, ordered loader over ``num_samples`` images of ``dataset`` (all if None or more
    than there are), drawn without replacement with ``seed`` and kept in index order, so that
    every pass sees the same images in the same order. Labels are dropped."""
    n = len(dataset)
    if num_samples is not None and num_samples < n:
        dataset = Subset(dataset, unlabeled_indices(n, num_samples, seed).tolist())
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_images
    )


def _images(items: list) -> Tensor:
    first = items[0]
    if isinstance(first, (tuple, list)):
        return torch.stack([it[0] for it in items])
    return torch.stack(list(items))
