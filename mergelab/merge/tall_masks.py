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
Consensus merging). Task vectors are taken in float64 here, so a single expert's θ0 + τMTL is
that expert bit for bit. Streams over parameters: one parameter per expert at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mergelab.merge import masks as tall
from mergelab.merge import ops
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
        thresholds = None
        if self.base == "ties" and self.ties_scope == "global":
            by_task = ops.global_thresholds(pretrained, experts, self.ties_k)
            thresholds = [by_task[t] for t in tasks]
        base_weights, shared = {}, {}
        masks: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
        self.merged_keys = []
        for key, base, vals in iter_params(pretrained, experts):
            base_weights[key] = base
            if not base.is_floating_point():
                continue
            b = base.double()
            taus = torch.stack([v.double() - b for v in vals])  # exact: no rounding here
            # TIES trims the float32 vectors, as ties.py does, so the thresholds match.
            mtl_in = taus if self.base == "task_arithmetic" else taus.float()
            tau_mtl = tall.multitask_vector(
                mtl_in, self.base, thresholds, self.ties_k, self.ties_reduce
            ).double()
            shared[key] = (b + tau_mtl).to(base.dtype)
            for t, m in zip(tasks, tall.tall_masks(taus, tau_mtl, lambdas)):
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
