"""The expert-by-expert accumulation shared by the data-driven merges (RegMean, Fisher):
:func:`predict_pass` (one statistics pass through a Lightning Trainer) and
:class:`ExpertAccumulator` (the merged state dict, one expert at a time).

Both methods load one expert, compute a per-parameter statistic on its task's data (a Gram
matrix, a diagonal Fisher), fold that expert into running sums and drop it before the next,
so that only one expert's statistics are in memory at a time. The keys that carry a
statistic are merged by the method's own rule; every other floating-point tensor is the
plain mean of the experts; integer buffers must equal θ0's and are kept.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from mergelab.errors import CheckpointError

StateDict = dict[str, Tensor]
T = TypeVar("T")

_EVAL_MODE_WARNING = r".*module\(s\) in eval mode.*"
# predict_step returns nothing on purpose: the statistics accumulate inside the module
_NO_PREDICTIONS_WARNING = r".*predict returned None.*"


def predict_pass(
    make_module: Callable[[], Any],
    loader,
    ctx,
    extract: Callable[[Any], T],
    **trainer_kwargs: Any,
) -> T:
    """Run ``trainer.predict`` (the run context's Trainer, no logger) of the LightningModule
    ``make_module()`` over ``loader`` and return ``extract(module)``.

    The Trainer and the module refer to each other (trainer → strategy → module → trainer),
    so reference counting never frees them, nor the expert encoder the module holds; the
    collection here frees that expert before the caller loads the next one ("one expert in
    memory at a time" would otherwise hold until the cyclic collector happened to run)."""
    module = make_module()
    trainer = ctx.make_trainer(logger=False, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING)
        warnings.filterwarnings("ignore", message=_NO_PREDICTIONS_WARNING)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    out = extract(module)
    del module, trainer
    gc.collect()
    return out


class ExpertAccumulator:
    """θ* key by key from experts added one at a time.

    ``add(task, state, stats, update)`` hands every key of θ0 that has a statistic in
    ``stats`` to ``update(key, θt[key], stat)`` (the method's own accumulator) and averages
    the remaining floating-point keys; ``result(finish)`` returns a state dict with θ0's keys
    and dtypes, ``finish(key)`` giving the merged value of every key that had a statistic.
    """

    def __init__(self, pretrained: Mapping[str, Tensor], method: str):
        self.pretrained = pretrained
        self.method = method
        self.count = 0
        self.sums: dict[str, Tensor] = {}
        self.stat_keys: set[str] = set()

    def add(
        self,
        task: str,
        state: Mapping[str, Tensor],
        stats: dict[str, Tensor],
        update: Callable[[str, Tensor, Tensor], None],
    ) -> None:
        """Fold expert ``task`` in. ``stats`` is consumed (popped key by key, so a statistic
        is freed as soon as it has been added); a statistic whose key θ0 lacks is an error."""
        for key, base in self.pretrained.items():
            if key in stats:
                update(key, state[key], stats.pop(key))
                self.stat_keys.add(key)
            elif base.is_floating_point():
                v = state[key].float()
                if key in self.sums:
                    self.sums[key] += v
                else:
                    self.sums[key] = v.clone()
            elif not torch.equal(state[key], base):
                raise CheckpointError(
                    f"expert {task!r}: non-float key {key!r} differs from pretrained; "
                    "it cannot be merged arithmetically"
                )
        if stats:
            raise CheckpointError(
                f"{self.method}: parameter {next(iter(stats))!r} of the encoder is not a key "
                "of the pretrained state dict"
            )
        self.count += 1

    def result(self, finish: Callable[[str], Tensor]) -> StateDict:
        """The merged state dict (CPU, θ0's keys and dtypes); running sums are released as
        they are used."""
        out: StateDict = {}
        for key, base in self.pretrained.items():
            if key in self.stat_keys:
                out[key] = finish(key).to(base.dtype)
            elif base.is_floating_point():
                out[key] = (self.sums.pop(key) / self.count).to(base.dtype)
            else:
                out[key] = base.clone()
        return out
