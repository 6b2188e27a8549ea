"""TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, arXiv 2405.07813): one model per task, cheaply.

With τt = θt − θ0 and τMTL the unscaled multi-task vector (Σt τt, or the TIES-merged vector),
task t keeps the coordinates of τMTL where its own vector is closer to the multi-task vector
than to zero::

    mt = 1{ |τt| > λt · |τMTL − τt| }          (strict >, as the authors' code)
    θt = θ0 + α · (mt ⊙ τMTL)                   (the paper: α = 1; a task id is needed)

The result is task-conditional (:class:`~mergelab.merge.conditional.TaskConditionalMerge`):
θ0 and θ0 + τMTL shared, one bit-packed mask per task, and α as every task's rescaler. λ is
fixed (FusionBench: 0.6, no data); the paper picks λt per task from {0.2, …, 0.6} on
validation data, which mergelab's benchmark does not have (its test split is the unlabeled
adaptation data) — pass a task → λ mapping to set them yourself.

The mask and the multi-task vector are those of :mod:`mergelab.merge.masks` (shared with
Consensus merging; ``base=ties`` takes τMTL from the Ties class through it). With
``base=task_arithmetic`` the task vectors are taken in float64, so a single expert's
θ0 + τMTL is that expert bit for bit. Streams over parameters: one parameter per expert at a
time (plus the TIES pass for ``base=ties``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from mergelab.merge import masks as tall
from mergelab.merge.base import MergeMethod, check_experts, iter_params
from mergelab.merge.conditional import TaskConditionalMerge, pack_bits


class TallMasks(MergeMethod):
    """TALL masks: task t runs θ0 + ``scaling`` · (mt ⊙ τMTL), mt = 1{|τt| > λ|τMTL − τt|}.

    Args:
        tall_lambda: λ, one number or a task → λ mapping (FusionBench: 0.6).
        scaling: α applied to every task's masked vector (the paper: 1, τMTL unscaled).
        base: the multi-task vector, ``task_arithmetic`` (Σt τt) or ``ties``.
        ties_k, ties_reduce, ties_scope: TIES settings when ``base=ties`` (paper: 0.2, sum,
            global).
    """

    name = "tall_masks"

    def __init__(
        self,
        tall_lambda: float | Mapping[str, float] = 0.6,
        scaling: float = 1.0,
        base: str = "task_arithmetic",
        ties_k: float = 0.2,
        ties_reduce: str = "sum",
        ties_scope: str = "global",
    ):
        super().__init__()
        tall.check_mtl(base, ties_k, ties_reduce, ties_scope)
        self.tall_lambda = (
            {str(t): float(v) for t, v in tall_lambda.items()}
            if isinstance(tall_lambda, Mapping)
            else float(tall_lambda)
        )
        self.scaling = float(scaling)
        self.base = base
        self.ties_k = float(ties_k)
        self.ties_reduce = ties_reduce
        self.ties_scope = ties_scope

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> TaskConditionalMerge:
        check_experts(pretrained, experts)
        tasks = list(experts)
        lambdas = tall.resolve_lambdas(self.tall_lambda, tasks)
        if self.base == "ties":  # τMTL from the Ties class, as Consensus merging takes it
            params = (
                (p.key, p.base, p.tau_mtl, p.masks)
                for p in tall.iter_tall_masks(
                    pretrained, experts, self.tall_lambda, "ties",
                    self.ties_k, self.ties_reduce, self.ties_scope,
                )
            )  # fmt: skip
        else:
            params = _task_arithmetic_masks(pretrained, experts, lambdas)
        base_weights, shared = {}, {}
        masks: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
        self.merged_keys = []
        for key, base, tau_mtl, task_masks in params:
            base_weights[key] = base
            if tau_mtl is None:  # an integer buffer, the same in every model
                continue
            shared[key] = (base.double() + tau_mtl.double()).to(base.dtype)
            for t, m in zip(tasks, task_masks):
                masks[t][key] = pack_bits(m)
            self.merged_keys.append(key)
        return TaskConditionalMerge(
            base_weights,
            shared,
            masks,
            dict.fromkeys(tasks, self.scaling),
            method=self.name,
            meta={"tall_lambda": dict(zip(tasks, lambdas))},
        )


def _task_arithmetic_masks(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    lambdas: list[float],
) -> Iterator[tuple[str, Tensor, Tensor | None, Tensor | None]]:
    """Per key: θ0, τMTL = Σt τt and the TALL masks, from float64 task vectors — the
    difference of two float32 weights is exact in float64, so θ0 + τMTL of a single expert is
    that expert bit for bit (float32 τt would round it)."""
    for key, base, vals in iter_params(pretrained, experts):
        if not base.is_floating_point():
            yield key, base, None, None
            continue
        b = base.double()
        taus = torch.stack([v.double() - b for v in vals])
        tau_mtl = tall.multitask_vector(taus, "task_arithmetic")
        yield key, base, tau_mtl, tall.tall_masks(taus, tau_mtl, lambdas)
