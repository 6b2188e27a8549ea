"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959).

Both flatten the spectrum of each 2-D weight update so that no direction (and so no task)
dominates; every other tensor is the plain mean of τt = θt − θ0. θ = θ0 + α·Δ everywhere
(α = ``scaling``).

Iso-C (common subspace):  Σt τt = U S Vᵀ,   Δ = σ̄ · U Vᵀ,   σ̄ = mean of the r singular values.

Iso-CTS (common + task-specific subspaces), r = min(m, n), β = ``common_fraction``:

1. sizes (:func:`iso_cts_sizes`): k0 = ⌊β·r⌋; task-specific total = round((r − k0)/T)·T
   (Python's half-to-even round); common size kc = r − total; per-task size s = total/T;
2. common block: the top-kc triplets (Uc, Sc, Vcᵀ) of Σt τt;
3. task blocks: for each t, the top-s triplets of (I − Uc Ucᵀ) τt, the part of τt outside the
   common left subspace;
4. stack the task blocks and the common block, replace U and Vᵀ by their polar factors
   (closest orthonormal matrices), set every singular value to their mean σ̄, Δ = σ̄ · U⊥ V⊥ᵀ.

SVDs in fp32, result cast back to θ0's dtype; both stream over parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergelab import validate
from mergelab.merge.base import MergeMethod
from mergelab.merge.tsv_m import mean_task_vector, polar_factor


def iso_cts_sizes(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common size kc, per-task size s) with kc + T·s = r, as the Iso-CTS reference code
    sizes them (r = 768, T = 8, β = 0.8 → (616, 19)). The task-specific total is capped at
    ⌊r/T⌋·T so kc ≥ 0 even for tiny β."""
    k0 = math.floor(common_fraction * r)
    total = min(round((r - k0) / n_tasks) * n_tasks, (r // n_tasks) * n_tasks)
    return r - total, total // n_tasks


def iso_c_matrix(taus: list[Tensor]) -> Tensor:
    """Iso-C Δ of one 2-D parameter: σ̄ · U Vᵀ of Σt τt."""
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_matrix(taus: list[Tensor], common_fraction: float) -> Tensor:
    """Iso-CTS Δ of one 2-D parameter (steps 1–4 of the module doc)."""
    kc, s = iso_cts_sizes(min(taus[0].shape), len(taus), common_fraction)
    u, sv, vh = torch.linalg.svd(torch.stack(taus).sum(0), full_matrices=False)
    uc, sc, vhc = u[:, :kc], sv[:kc], vh[:kc]
    us, ss, vhs = [], [], []
    if s > 0:
        for tau in taus:
            tu, ts, tvh = torch.linalg.svd(tau - uc @ (uc.T @ tau), full_matrices=False)
            us.append(tu[:, :s])
            ss.append(ts[:s])
            vhs.append(tvh[:s])
    u_orth = polar_factor(torch.cat([*us, uc], dim=1))
    vh_orth = polar_factor(torch.cat([*vhs, vhc], dim=0))
    return torch.cat([*ss, sc]).mean() * (u_orth @ vh_orth)


class IsoC(MergeMethod):
    """Iso-C: θ = θ0 + ``scaling`` · σ̄ U Vᵀ (2-D tensors, from Σt τt) or the mean τt (else)."""

    name = "iso_c"

    def __init__(self, scaling: float = 1.0):
        super().__init__()
        self.scaling = float(scaling)

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        b = base.float()
        if b.ndim == 2:
            delta = iso_c_matrix([v.float() - b for v in experts])
        else:
            delta = mean_task_vector(b, experts)
        return b + self.scaling * delta


class IsoCTS(MergeMethod):
    """Iso-CTS: common (fraction ``common_fraction`` of the rank) + task-specific subspaces,
    isotropic spectrum; θ = θ0 + ``scaling`` · Δ."""

    name = "iso_cts"

    def __init__(self, common_fraction: float = 0.8, scaling: float = 1.0):
        super().__init__()
        self.common_fraction = validate.fraction("merge.common_fraction", common_fraction)
        self.scaling = float(scaling)

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        b = base.float()
        if b.ndim == 2:
            delta = iso_cts_matrix([v.float() - b for v in experts], self.common_fraction)
        else:
            delta = mean_task_vector(b, experts)
        return b + self.scaling * delta
