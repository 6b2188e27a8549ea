"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: per task keep the top-k fraction of τt by magnitude — over the task's WHOLE
   flattened vector (``scope: global``, the authors' code) or within each tensor
   (``scope: per_tensor``).
2. Elect: per coordinate, γ = sign(Σt trimmed τt).
3. Disjoint merge: combine only entries whose sign agrees with γ, by sum (the vision code's
   default) or mean (the paper's T5 setting); θ = θ0 + λ · merged.

Streaming: the global thresholds are found one task at a time; the merge then visits one
parameter at a time holding that parameter for every expert — never N whole models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mergelab.errors import ConfigError
from mergelab.merge import ops
from mergelab.merge.base import MergeMethod, StateDict, check_experts, iter_params

SCOPES = ("global", "per_tensor")


class Ties(MergeMethod):
    """TIES-merging with top-``k`` trim, sign election and disjoint ``reduce`` (sum | mean)."""

    name = "ties"

    def __init__(
        self, k: float = 0.2, scaling: float = 0.3, reduce: str = "sum", scope: str = "global"
    ):
        super().__init__()
        self.k = ops.check_fraction("ties k", k)
        self.scaling = float(scaling)
        if reduce not in ("sum", "mean"):
            raise ConfigError(f"ties reduce must be 'sum' or 'mean', got {reduce!r}")
        if scope not in SCOPES:
            raise ConfigError(f"ties scope must be one of {SCOPES}, got {scope!r}")
        self.reduce = reduce
        self.scope = scope

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> StateDict:
        check_experts(pretrained, experts)
        thresholds = (
            ops.global_thresholds(pretrained, experts, self.k) if self.scope == "global" else None
        )
        out: StateDict = {}
        self.merged_keys = []
        for key, base, vals in iter_params(pretrained, experts):
            if not base.is_floating_point():
                out[key] = base.clone()
                continue
            b = base.float()
            trimmed = _trimmed_vectors(b, vals, list(experts), thresholds, self.k)
            merged = ops.disjoint_merge(trimmed, ops.elect_sign(trimmed), self.reduce)
            out[key] = (b + self.scaling * merged).to(base.dtype)
            self.merged_keys.append(key)
        return out


def ties_task_vectors(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    k: float = 0.2,
    scope: str = "global",
) -> dict[str, dict[str, Tensor]]:
    """Per-task TIES-processed task vectors (trimmed, then only the entries agreeing with the
    elected sign kept), for AdaMerging++ where λ scales each task's processed vector.
    Float keys only."""
    check_experts(pretrained, experts)
    ops.check_fraction("ties k", k)
    if scope not in SCOPES:
        raise ConfigError(f"ties scope must be one of {SCOPES}, got {scope!r}")
    thresholds = ops.global_thresholds(pretrained, experts, k) if scope == "global" else None
    out: dict[str, dict[str, Tensor]] = {t: {} for t in experts}
    for key, base, vals in iter_params(pretrained, experts):
        if not base.is_floating_point():
            continue
        trimmed = _trimmed_vectors(base.float(), vals, list(experts), thresholds, k)
        sign = ops.elect_sign(trimmed)
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        for i, task in enumerate(experts):
            out[task][key] = trimmed[i] * agree[i]
    return out


def _trimmed_vectors(
    base: Tensor,
    vals: list[Tensor],
    tasks: list[str],
    thresholds: dict[str, float] | None,
    k: float,
) -> Tensor:
    """Stack (tasks first) of the trimmed task vectors of one parameter: global thresholds
    when given, else the top-k within this tensor."""
    out = []
    for v, task in zip(vals, tasks):
        tau = v.float() - base
        thr = thresholds[task] if thresholds is not None else ops.magnitude_threshold(tau, k)
        out.append(ops.trim(tau, thr))
    return torch.stack(out)
