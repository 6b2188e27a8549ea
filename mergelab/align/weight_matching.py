"""Weight matching (Git Re-Basin, Ainsworth et al., ICLR 2023, arXiv 2209.04836, §3.2 / Alg. 1).

Find permutations π of model B maximising Σ_ℓ ⟨W_ℓ^A, π(W_ℓ^B)⟩ over every tensor. The
objective is linear in each single permutation when the others are fixed, so coordinate
descent solves one permutation at a time exactly by a linear assignment on

    C[i, j] = Σ_{tensors it permutes} ⟨row i of W^A, row j of W^B with the other perms applied⟩

visiting the permutations in a seeded random order, until a whole sweep improves nothing
(or ``max_iter`` sweeps). Two departures from the paper's Algorithm 1, both explained where
they happen: the first sweep starts from the hubs (the residual stream), and a coordinate
whose score matrix cannot have changed is not solved again. A head group (one attention
layer's heads with their within-head q/k and v permutations) is one coordinate, solved
exactly by nested assignments (:func:`mergelab.align.assign.assign_heads`).

Embedding rotation (``embedding: procrustes``, non-local pools; why: :mod:`mergelab.align.base`):
once the permutations are fixed, the output projection's rows (the residual stream) are in
the reference's order, so the rotation of the embedding is the orthogonal Procrustes solution
of ``π(proj_B) Q ≈ proj_A`` — the same objective, ⟨proj_A, π(proj_B) Q⟩, maximised over Q.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mergelab import validate
from mergelab.align.assign import assign_heads, assign_units, heads_value, units_value
from mergelab.align.base import Alignment, procrustes, weight_cosine
from mergelab.align.spec import WITHIN, Perms, PermutationSpec, head_parts
from mergelab.context import RunContext
from mergelab.pool.base import ModelPool


def weight_matching(
    spec: PermutationSpec,
    ref: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    max_iter: int = 100,
    seed: int = 0,
    within_head: bool = True,
    rel_tol: float = 1e-9,
    device: torch.device | str = "cpu",
) -> tuple[Perms, int]:
    """Permutations of ``other`` that maximise its weight inner product with ``ref``, and the
    number of sweeps run. Tensors are compared in float32 on ``device``."""
    spec.check_shapes({k: tuple(v.shape) for k, v in ref.items()}, "align reference")
    spec.check_shapes({k: tuple(v.shape) for k, v in other.items()}, "align model")
    A = {k: ref[k].to(device, torch.float32) for k in spec.axes if ref[k].is_floating_point()}
    B = {k: other[k].to(device, torch.float32) for k in A}
    perms = spec.identity()
    coords = spec.coordinates
    # A coordinate's score matrix depends only on the permutations of the other axes of the
    # tensors it touches; when none of those changed since it was last solved, solving it
    # again would return the same answer, so it is skipped (exact, and most of a late sweep).
    deps = {c: spec.neighbours(c) for c in coords}
    changed = dict.fromkeys(coords, 0)
    solved = dict.fromkeys(coords, -1)
    g = torch.Generator().manual_seed(int(seed))
    sweeps = step = 0
    while sweeps < int(max_iter):
        sweeps += 1
        progress = False
        order = [coords[i] for i in torch.randperm(len(coords), generator=g).tolist()]
        if sweeps == 1:
            # Hubs first (the residual stream, which every other permutation neighbours):
            # solved while the rest is still unpermuted, its score sees the true signal of
            # the embeddings / projections plus unbiased noise. Solved after the blocks, it
            # meets block permutations already fitted to the identity stream — a local
            # optimum that keeps it there (seen on ViT-B/32-sized random towers).
            order.sort(key=lambda c: -len(deps[c]))  # stable: ties keep the seeded order
        for c in order:
            step += 1
            if solved[c] >= 0 and all(changed[d] < solved[c] for d in deps[c]):
                continue
            solved[c] = step
            if c in spec.units:
                C = _unit_scores(spec, A, B, perms, c)
                new = assign_units(C)
                old_v, new_v = units_value(C, perms.units[c]), units_value(C, new)
            else:
                Cs = _head_scores(spec, A, B, perms, c)
                new = assign_heads(Cs, within_head)
                old_v, new_v = heads_value(Cs, perms.heads[c]), heads_value(Cs, new)
            # strict improvement only: equal-score alternatives must not make it cycle
            if new_v > old_v + rel_tol * max(abs(old_v), 1.0):
                progress = True
                changed[c] = step
                if c in spec.units:
                    perms.units[c] = new
                else:
                    perms.heads[c] = new
        if not progress:
            break
    return perms, sweeps


def embedding_rotation(
    spec: PermutationSpec, ref: Mapping[str, Tensor], other: Mapping[str, Tensor], perms: Perms
) -> Tensor:
    """The orthogonal Q (d × d, float64) maximising ⟨W_ref, π(W_other) Q⟩ on the tensor that
    writes the embedding (its embedding axis last, every other axis flattened into rows)."""
    e = spec.embedding
    d = e.dim
    a = ref[e.key].movedim(e.axis, -1).reshape(-1, d)
    b = spec.permute(e.key, other[e.key], perms, skip="embedding").movedim(e.axis, -1)
    return procrustes(b.reshape(-1, d).to(a.device), a)


def _unit_scores(spec, A, B, perms, c) -> Tensor:
    n = spec.units[c]
    C = None
    for key, ax in spec.touching(c):
        if key not in A:
            continue
        a = A[key].movedim(ax, 0).reshape(n, -1)
        b = spec.permute(key, B[key], perms, skip=c).movedim(ax, 0).reshape(n, -1)
        C = a @ b.T if C is None else C.addmm_(a, b.T)
    return C


def _head_scores(spec, A, B, perms, c) -> dict[str, Tensor]:
    H, hd = spec.heads[c].n_heads, spec.heads[c].head_dim
    feats: dict[str, tuple[list[Tensor], list[Tensor]]] = {w: ([], []) for w in WITHIN}
    for key, ax in spec.touching(c):
        if key not in A:
            continue
        a = A[key].movedim(ax, 0)
        b = spec.permute(key, B[key], perms, skip=c).movedim(ax, 0)
        for part, lo, hi in head_parts(spec.axes[key][ax]):
            feats[part.within][0].append(a[lo:hi].reshape(H, hd, -1))
            feats[part.within][1].append(b[lo:hi].reshape(H, hd, -1))
    return {
        w: torch.einsum("hjx,gkx->hgjk", torch.cat(fa, -1), torch.cat(fb, -1))
        for w, (fa, fb) in feats.items()
        if fa
    }


class WeightMatching(Alignment):
    """``align=weight_matching``: Git Re-Basin weight matching (arXiv 2209.04836), no data.

    ``max_iter`` bounds the coordinate-descent sweeps; ``seed`` fixes the random order of the
    permutations; ``within_head`` also permutes channels inside each attention head (q/k
    shared, v shared with the output projection), not only whole heads; a step must raise the
    objective by ``rel_tol`` (relative) to count as progress; ``embedding``: ``procrustes``
    also rotates each foundation's output embedding onto the reference's by Procrustes on
    the output projection (non-local pools, see the module docstring), ``none`` does not.
    """

    name = "weight_matching"

    def __init__(
        self,
        max_iter: int = 100,
        seed: int = 0,
        within_head: bool = True,
        rel_tol: float = 1e-9,
        embedding: str = "procrustes",
    ):
        super().__init__(embedding)
        self.max_iter = validate.integer("align.max_iter", max_iter)
        self.seed = validate.integer("align.seed", seed, minimum=None)
        self.within_head = bool(within_head)
        self.rel_tol = validate.number("align.rel_tol", rel_tol, ge=0)

    def find(
        self,
        spec: PermutationSpec,
        ref: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        pool: ModelPool,
        ctx: RunContext,
        tasks: list[str],
        rotate: bool = False,
    ) -> tuple[Perms, dict[str, Any]]:
        ref, other = dict(ref.items()), dict(other.items())  # read lazy files once
        perms, sweeps = weight_matching(
            spec, ref, other, self.max_iter, self.seed, self.within_head, self.rel_tol, ctx.device
        )
        if rotate:
            perms.embedding = embedding_rotation(spec, ref, other, perms).cpu()
        return perms, {
            "sweeps": sweeps,
            "weight_cosine_before": weight_cosine(spec, ref, other, spec.identity()),
            "weight_cosine_after": weight_cosine(spec, ref, other, perms),
        }
