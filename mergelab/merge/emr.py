"""EMR-merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024, arXiv 2405.17461): Elect, Mask & Rescale — one model per task, no data.

With τt = θt − θ0, per coordinate:

    γ     = +1 where Σt τt > 0, else −1                         (elect the sign)
    τuni  = γ ⊙ max{ |τt| : τt·γ > 0 }  (0 where no task agrees) (elect the magnitude)
    Mt    = 1{ τt·γ > 0 }                                        (task-specific mask)
    λt    = Σn mean|τt,n| / Σn mean|Mt,n ⊙ τuni,n|               (task-specific rescaler;
            n runs over parameter tensors, each tensor's mean counting equally)
    θt    = θ0 + λt · (Mt ⊙ τuni)                                (task t's model; task id needed)

A task whose mask is empty gets λt = 0 (its model is θ0 whatever λt is).

The result is task-conditional (:class:`~mergelab.merge.conditional.TaskConditionalMerge`):
θ0 and θ0 + τuni shared, one bit-packed mask and one rescaler per task. Computed in float64
one parameter at a time (one parameter per expert in memory), so a single expert, or several
identical ones, comes back bit for bit (λ = 1 exactly).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mergelab.merge.base import MergeMethod, check_experts, iter_params
from mergelab.merge.conditional import TaskConditionalMerge, pack_bits


class EMR(MergeMethod):
    """EMR-merging: elected unified vector + per-task masks and rescalers (tuning-free; the
    method has no hyperparameters)."""

    name = "emr"

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> TaskConditionalMerge:
        check_experts(pretrained, experts)
        tasks = list(experts)
        base_weights, shared = {}, {}
        masks: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
        num = torch.zeros(len(tasks), dtype=torch.float64)  # Σn mean|τt,n|
        den = torch.zeros(len(tasks), dtype=torch.float64)  # Σn mean|Mt,n ⊙ τuni,n|
        self.merged_keys = []
        for key, base, vals in iter_params(pretrained, experts):
            base_weights[key] = base
            if not base.is_floating_point():
                continue
            b = base.double()
            taus = torch.stack([v.double() - b for v in vals])
            gamma = torch.where(taus.sum(0) > 0, 1.0, -1.0).to(taus.dtype)
            agree = taus * gamma > 0  # (T, *shape): the masks Mt
            tau_uni = gamma * (taus.abs() * agree).amax(dim=0)
            shared[key] = (b + tau_uni).to(base.dtype)
            if base.numel():
                flat = taus.flatten(1)
                num += flat.abs().mean(dim=1)
                den += (agree * tau_uni).flatten(1).abs().mean(dim=1)
            for t, m in zip(tasks, agree):
                masks[t][key] = pack_bits(m)
            self.merged_keys.append(key)
        scales = {t: float(n / d) if d > 0 else 0.0 for t, n, d in zip(tasks, num, den)}
        return TaskConditionalMerge(base_weights, shared, masks, scales, method=self.name)
