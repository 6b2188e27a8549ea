"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per 2-D weight matrix (position embedding included), with τt = θt − θ0 = Ut St Vtᵀ (thin SVD),
r = min(m, n) and k = ⌊r/T⌋:

1. keep each task's top-k singular triplets and place them side by side:
   Û = [U1,:k | … | UT,:k]  (m × Tk),  Ŝ = [S1,:k, …, ST,:k],  V̂ᵀ = [V1,:kᵀ; …; VT,:kᵀ];
2. remove the interference between tasks' subspaces by replacing Û and V̂ᵀ with their
   closest orthonormal matrices, the polar factors (Û = PΣQᵀ → U⊥ = PQᵀ; same for V̂ᵀ);
3. Δ = U⊥ diag(Ŝ) V⊥ᵀ and θ = θ0 + α·Δ  (the paper's TSV-M merge; α = ``scaling``).

Every other tensor (biases, LayerNorm, class embedding, 4-D patch conv) is the plain mean of
τt, also scaled by α. So is a matrix with fewer singular values than tasks (r < T: no room
for one triplet per task) — never the case for ViT weights with ≤ 8 tasks.

Only the filled Tk columns of Û are orthogonalised (the reference zero-pads Û to m × r; the
zero columns only multiply zero singular values, so Δ is the same). SVDs run in fp32 on the
merge's device (CPU), the result is cast back to θ0's dtype. Streams over parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergelab.merge.base import MergeMethod


def polar_factor(a: Tensor) -> Tensor:
    """The orthonormal factor of ``a``'s polar decomposition, PQᵀ for a = PΣQᵀ: the matrix
    with orthonormal columns (tall ``a``) or rows (wide ``a``) closest to ``a`` in Frobenius
    norm."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def mean_task_vector(base: Tensor, experts: list[Tensor]) -> Tensor:
    """(1/T) Σt (θt − θ0) in fp32, accumulated one expert at a time."""
    acc = torch.zeros_like(base)
    for v in experts:
        acc += v.float() - base
    return acc / len(experts)


def tsv_merge_matrix(taus: list[Tensor]) -> Tensor:
    """Δ of one 2-D parameter from its fp32 task vectors (steps 1–3 of the module doc);
    requires min(m, n) ≥ T."""
    k = min(taus[0].shape) // len(taus)
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_orth = polar_factor(torch.cat(us, dim=1))
    vh_orth = polar_factor(torch.cat(vhs, dim=0))
    return (u_orth * torch.cat(ss)) @ vh_orth


class TSVM(MergeMethod):
    """TSV-M: θ = θ0 + ``scaling`` · Δ, Δ from the orthogonalised per-task singular vectors
    (2-D tensors) or the mean task vector (everything else)."""

    name = "tsv_m"

    def __init__(self, scaling: float = 1.0):
        super().__init__()
        self.scaling = float(scaling)

    def merge_key(self, key: str, base: Tensor, experts: list[Tensor]) -> Tensor:
        b = base.float()
        if b.ndim == 2 and min(b.shape) >= len(experts):
            delta = tsv_merge_matrix([v.float() - b for v in experts])
        else:
            delta = mean_task_vector(b, experts)
        return b + self.scaling * delta
