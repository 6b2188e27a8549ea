"""Consensus merging (Wang et al., ICML 2024, arXiv 2405.07813): drop the weights that fewer
than k tasks need, then task arithmetic / TIES on what is left — one model for all tasks.

With τt = θt − θ0, τMTL the unscaled multi-task vector (Σt τt, or the TIES-merged vector) and
the TALL masks mt = 1{|τt| > λ·|τMTL − τt|} (see :mod:`mergelab.merge.masks`)::

    m = 1{ Σt mt ≥ k },     θ = θ0 + α · (m ⊙ τMTL)

k = 2 removes "selfish" (one task only) and "catastrophic" (no task) weights; k = 0 is plain
task arithmetic / TIES with scaling α. λ is fixed here (FusionBench: 0.6, no data); the paper
picks λt per task and α on validation data.

Streams over parameters: one parameter per expert at a time (plus one pass for TIES' global
trim thresholds when ``base=ties``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mergelab import validate
from mergelab.merge.base import MergeMethod, StateDict
from mergelab.merge.masks import check_mtl, consensus_mask, iter_tall_masks
from mergelab.merge.ties import Ties


class Consensus(MergeMethod):
    """Consensus-TA / Consensus-TIES: θ0 + ``scaling`` · (1{Σt mt ≥ ``k``} ⊙ τMTL); the
    ``ties_*`` settings are :class:`~mergelab.merge.ties.Ties`' own (``ties_mode``:
    reference | mergelab trim counting, ``ties_extra_zeros``: τ = 0 entries counted in d)."""

    name = "consensus"

    def __init__(
        self,
        k: int = 2,
        tall_lambda: float = 0.6,
        scaling: float = 0.3,
        base: str = "task_arithmetic",
        ties_k: float = 0.2,
        ties_reduce: str = "sum",
        ties_scope: str = "global",
        ties_mode: str = "reference",
        ties_extra_zeros: int = 0,
    ):
        super().__init__()
        k = validate.integer("consensus k (a number of tasks)", k, minimum=0)
        tall_lambda = validate.number("consensus tall_lambda", tall_lambda, ge=0)
        check_mtl(base, ties_k, ties_reduce, ties_scope)
        if base == "ties":  # TIES' own checks of its trim settings, at config time
            Ties(k=ties_k, scope=ties_scope, mode=ties_mode, extra_zeros=ties_extra_zeros)
        self.k = int(k)
        self.tall_lambda = float(tall_lambda)
        self.scaling = float(scaling)
        self.base = base
        self.ties_k = float(ties_k)
        self.ties_reduce = ties_reduce
        self.ties_scope = ties_scope
        self.ties_mode = ties_mode
        self.ties_extra_zeros = int(ties_extra_zeros)

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> StateDict:
        out: StateDict = {}
        self.merged_keys = []
        params = iter_tall_masks(
            pretrained,
            experts,
            self.tall_lambda,
            self.base,
            self.ties_k,
            self.ties_reduce,
            self.ties_scope,
            self.ties_mode,
            self.ties_extra_zeros,
        )
        for p in params:
            if p.tau_mtl is None:
                out[p.key] = p.base.clone()
                continue
            keep = consensus_mask(p.masks, self.k)
            merged = p.base.float() + self.scaling * (p.tau_mtl * keep)
            out[p.key] = merged.to(p.base.dtype)
            self.merged_keys.append(p.key)
        return out
