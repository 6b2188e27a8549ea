"""Linear assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) for unit and
head permutations, shared by weight and activation matching.

Convention: ``C[i, j]`` scores reference unit i against unit j of the model being aligned;
the result ``idx`` puts that model's unit ``idx[i]`` at position i.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mergelab.align.spec import WITHIN, HeadPerm


def assign_units(C: Tensor) -> Tensor:
    """The permutation maximising Σ_i C[i, idx[i]]."""
    _, col = linear_sum_assignment(C.detach().double().cpu().numpy(), maximize=True)
    return torch.as_tensor(col, dtype=torch.long)


def units_value(C: Tensor, idx: Tensor) -> float:
    """Σ_i C[i, idx[i]] (picked first, summed in float64)."""
    return float(C[torch.arange(len(idx), device=C.device), idx.to(C.device)].double().sum())


def assign_heads(C: dict[str, Tensor], within_head: bool) -> HeadPerm:
    """Heads and within-head channels jointly, from ``C[w][h, g, j, k]`` = the score of
    reference head h's channel j against head g's channel k, for w in ("qk", "v").

    The best within-head permutation of every pair (h, g) is a small assignment of its own;
    the head assignment then maximises the sum of those optima — the exact maximiser over
    (heads, within-head perms) of the objective that is linear in each. With
    ``within_head=False`` channels keep their order inside a head (pair score = trace).
    """
    some = next(iter(C.values()))
    H, hd = some.shape[0], some.shape[2]
    score = np.zeros((H, H))
    best = {w: np.tile(np.arange(hd), (H, H, 1)) for w in WITHIN}
    for w, Cw in C.items():
        c = Cw.detach().double().cpu().numpy()
        if not within_head:
            score += np.trace(c, axis1=2, axis2=3)
            continue
        for h in range(H):
            for g in range(H):
                rows, cols = linear_sum_assignment(c[h, g], maximize=True)
                best[w][h, g] = cols
                score[h, g] += c[h, g][rows, cols].sum()
    _, order = linear_sum_assignment(score, maximize=True)
    ar = np.arange(H)
    return HeadPerm(
        torch.as_tensor(order, dtype=torch.long),
        torch.as_tensor(best["qk"][ar, order], dtype=torch.long),
        torch.as_tensor(best["v"][ar, order], dtype=torch.long),
    )


def heads_value(C: dict[str, Tensor], hp: HeadPerm) -> float:
    """Σ_w Σ_h Σ_j C[w][h, order[h], j, within_w[h, j]] — the objective of ``hp``."""
    total = 0.0
    for w, Cw in C.items():
        H, hd = Cw.shape[0], Cw.shape[2]
        h = torch.arange(H)[:, None].expand(H, hd)
        j = torch.arange(hd)[None, :].expand(H, hd)
        g = hp.order[:, None].expand(H, hd)
        total += float(Cw.cpu()[h, g, j, hp.within(w)].double().sum())
    return total
