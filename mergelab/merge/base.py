"""The merge-method contracts.

A *training-free* method is a pure function on state dicts::

    merge(pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> dict

(task → expert state dict, keys = the backbone's parameter names). It never mutates its
inputs, works for any architecture, records the keys it merged in ``merged_keys``, and treats
a key it cannot merge as an error. Experts may be lazy (:class:`~mergelab.pool.LazyStateDict`):
methods stream over keys so that peak memory holds one parameter per expert, not N models.

An *adaptive* method (AdaMerging) learns on unlabeled data; it implements
``fit(pool, ctx) -> dict`` instead and is run by the pipeline with the pool and run context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from mergelab.errors import CheckpointError, ConfigError

StateDict = dict[str, Tensor]


class MergeMethod:
    """Base for training-free merges. Subclasses implement :meth:`merge_key` (one parameter)
    or override :meth:`merge` when the method needs a global pass (e.g. TIES' global trim)."""

    name: str = "merge"

    def __init__(self) -> None:
        self.merged_keys: list[str] = []

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> StateDict:
        out: StateDict = {}
        self.merged_keys = []
        for key, base, vals in iter_params(pretrained, experts):
            if base.is_floating_point():
                out[key] = self.merge_key(key, base, vals).to(base.dtype)
                self.merged_keys.append(key)
            else:
                out[key] = base.clone()
        return out

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "merged_keys")
        return f"{type(self).__name__}({args})"


class AdaptiveMerge(ABC):
    """Base for merges that learn on unlabeled test data (AdaMerging)."""

    name: str = "adaptive"

    @abstractmethod
    def fit(self, pool, ctx) -> StateDict:
        """Return merged weights for ``pool`` using the run context's Trainer settings."""


def tensor_meta(sd: Mapping[str, Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``sd[key]``; lazy state dicts that answer ``sd.shape(key)`` and
    ``sd.dtype(key)`` from their header are not read."""
    shape, dtype = getattr(sd, "shape", None), getattr(sd, "dtype", None)
    if callable(shape) and callable(dtype):
        return tuple(shape(key)), dtype(key)
    v = sd[key]
    return tuple(v.shape), v.dtype


def check_experts(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> None:
    """Every expert has θ0's keys, and every tensor θ0's shape and kind of dtype: a
    floating-point tensor where θ0's is one (of any precision: merges compute in float32 and
    return θ0's dtype), exactly θ0's dtype for integer / bool buffers. Raises one
    CheckpointError naming the expert, the key and what was expected vs found."""
    if len(experts) == 0:
        raise ConfigError("merge needs at least one expert, got none")
    keys = set(pretrained.keys())
    for task, sd in experts.items():
        got = set(sd.keys())
        if got != keys:
            missing = sorted(keys - got)
            extra = sorted(got - keys)
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
            raise CheckpointError(f"expert {task!r} does not match the pretrained model: {what}")
    for key in pretrained.keys():
        want_shape, want_dtype = tensor_meta(pretrained, key)
        for task, sd in experts.items():
            shape, dtype = tensor_meta(sd, key)
            if shape != want_shape:
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has shape {shape}, expected {want_shape} "
                    "(the pretrained model's)"
                )
            if want_dtype.is_floating_point != dtype.is_floating_point or (
                not want_dtype.is_floating_point and dtype != want_dtype
            ):
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has dtype {dtype}, expected {want_dtype} "
                    "(the pretrained model's)"
                )


def iter_params(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> Iterator[tuple[str, Tensor, list[Tensor]]]:
    """Yield ``(key, θ0[key], [θt[key] for t])`` one key at a time (streams lazy experts).

    Shapes must agree; non-float tensors (integer buffers) must be identical across models,
    since no arithmetic merge of them is meaningful.
    """
    check_experts(pretrained, experts)
    for key in pretrained.keys():
        base = pretrained[key]
        vals = [sd[key] for sd in experts.values()]
        for task, v in zip(experts.keys(), vals):
            if v.shape != base.shape:
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has shape {tuple(v.shape)}, "
                    f"pretrained has {tuple(base.shape)}"
                )
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CheckpointError(f"expert {task!r}: key {key!r} holds non-finite values")
            if not base.is_floating_point() and not torch.equal(v, base):
                raise CheckpointError(
                    f"expert {task!r}: non-float key {key!r} differs from pretrained; "
                    "it cannot be merged arithmetically"
                )
        yield key, base, vals
