"""AdaMerging's task vectors: τt = θt − θ0 (or their TIES-processed form for AdaMerging++),
flattened into one ``(T, P)`` float32 matrix (P = number of merged scalars).

The matrix lives on the training device as a plain tensor outside the module's state (so DDP
never broadcasts it and a checkpoint never stores it); see :mod:`.module`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from mergelab.errors import CheckpointError
from mergelab.merge.base import iter_params
from mergelab.merge.ties import ties_task_vectors

# Task vectors are stored in float32 even for half-precision checkpoints: fine-tuning deltas
# are small, and fp16/bf16 would round many of them away before λ ever sees them.
VECTOR_DTYPE = torch.float32


class TaskVectors:
    """Per-task vectors for the merged (floating-point) tensors, flattened into one matrix.

    ``flat[t, offsets[i] : offsets[i] + numel(shapes[i])]`` is task t's vector for ``keys[i]``.
    """

    def __init__(self, tasks: list[str], keys: list[str], shapes: list[torch.Size], flat: Tensor):
        self.tasks = tasks
        self.keys = keys
        self.shapes = shapes
        self.flat = flat
        sizes = [math.prod(s) for s in shapes]
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.sizes = sizes

    def column(self, i: int) -> Tensor:
        """The ``(T, numel)`` block of tensor ``keys[i]`` (a view, no copy)."""
        o = self.offsets[i]
        return self.flat[:, o : o + self.sizes[i]]

    def to(self, device: torch.device | str) -> TaskVectors:
        """The same vectors on ``device`` (dtype unchanged)."""
        return TaskVectors(self.tasks, self.keys, self.shapes, self.flat.to(device))


def _float_keys(pretrained: Mapping[str, Tensor]) -> list[str]:
    return [k for k in pretrained.keys() if pretrained[k].is_floating_point()]


def _allocate(pretrained: Mapping[str, Tensor], keys: list[str], n_tasks: int) -> Tensor:
    total = sum(pretrained[k].numel() for k in keys)
    return torch.empty(n_tasks, total, dtype=VECTOR_DTYPE)


def plain_task_vectors(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> TaskVectors:
    """τt = θt − θ0 for every floating-point tensor (task arithmetic's task vectors).

    Streams over keys (:func:`~mergelab.merge.base.iter_params`), so lazy experts are read one
    tensor at a time and only the ``(T, P)`` result is held.
    """
    tasks = list(experts.keys())
    keys = _float_keys(pretrained)
    flat = _allocate(pretrained, keys, len(tasks))
    shapes: list[torch.Size] = []
    offset = 0
    for _key, base, vals in iter_params(pretrained, experts):
        if not base.is_floating_point():
            continue  # integer buffers are not merged; they stay θ0 (checked equal upstream)
        n = base.numel()
        for t, v in enumerate(vals):
            flat[t, offset : offset + n] = (v.to(VECTOR_DTYPE) - base.to(VECTOR_DTYPE)).reshape(-1)
        shapes.append(base.shape)
        offset += n
    return TaskVectors(tasks, keys, shapes, flat)


def ties_vectors(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    k: float,
    scope: str,
) -> TaskVectors:
    """TIES-processed task vectors (Yadav et al., NeurIPS 2023: trim to top-k, elect sign,
    keep agreeing entries) for AdaMerging++; computed by ``mergelab.merge.ties``."""
    tasks = list(experts.keys())
    keys = _float_keys(pretrained)
    processed = dict(ties_task_vectors(pretrained, experts, k=k, scope=scope))
    flat = _allocate(pretrained, keys, len(tasks))
    shapes: list[torch.Size] = []
    offset = 0
    for key in keys:
        base = pretrained[key]
        for t, task in enumerate(tasks):
            # pop: each processed tensor is freed once copied, so the peak stays near one
            # set of vectors instead of two
            vec = processed.get(task, {}).pop(key, None)
            if vec is None:
                raise CheckpointError(
                    f"ties_task_vectors returned no vector for task {task!r}, key {key!r}; "
                    "expected one per task and floating-point tensor"
                )
            if vec.shape != base.shape:
                raise CheckpointError(
                    f"TIES vector for task {task!r}, key {key!r} has shape {tuple(vec.shape)}, "
                    f"expected {tuple(base.shape)}"
                )
            flat[t, offset : offset + base.numel()] = vec.to(VECTOR_DTYPE).reshape(-1)
        shapes.append(base.shape)
        offset += base.numel()
    del processed
    return TaskVectors(tasks, keys, shapes, flat)
