"""The alignment stage: permute every expert (and base) of a pool into one coordinate system
before any merge, so it composes with every merge method and surgery kind.

Non-local pools (experts fine-tuned from different foundations, ``pool.bases``): the first
foundation is the reference; every other foundation is aligned to it, and each expert gets
the permutation of the foundation it was fine-tuned from — so its task vector θt − θ0 stays
in the same coordinates as its θ0. The new ``pretrained`` is the average of the aligned
bases (the non-local paper's choice, arXiv 2410.12766: align the bases, then average).

Local pools (one θ0): each expert is aligned to ``pretrained`` (close to the identity, since
experts sit near θ0; still correct).

The embedding space (``embedding: procrustes``, non-local pools only). Two foundations
pretrained contrastively with different seeds agree on their output embedding only up to an
orthogonal map: the loss sees cosines, and any rotation Q of the image embedding (with the
text tower's) leaves every cosine unchanged. Each task's zero-shot head lives in its own
foundation's space, so without a rotation the merged encoder's embedding can serve only one
foundation's heads. Permutations of the residual stream cannot express a rotation, so after
them each foundation's embedding is rotated by an orthogonal Q onto the reference's (how Q is
found is the method's: Procrustes on ``proj`` for weight matching, on embeddings of unlabeled
data for activation matching), and the heads of that foundation's experts are rotated with it
(``W → W Q``): ``(W Q)(f Q)ᵀ = W fᵀ`` for orthogonal Q and ‖f Q‖ = ‖f‖, so every expert (and
base) computes exactly the logits it computed before.
Local pools are never rotated: there θ0 and every expert share one frozen head, which already
pins one embedding space for all of them (rotating an expert alone would break θ0's head).

The input pool is never modified: the returned pool holds lazy permuted views of the
experts (still streamed by merges) and fresh tensors for the new θ0.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mergelab import validate
from mergelab.align.archs import spec_for_factory
from mergelab.align.spec import Perms, PermutationSpec, PermutedStateDict
from mergelab.context import RunContext
from mergelab.errors import ConfigError
from mergelab.pool.base import ModelPool

EMBEDDING = ("procrustes", "none")


class Alignment(ABC):
    """Base of the ``align=`` group: ``align(pool, ctx) -> ModelPool``.

    Subclasses implement :meth:`find`: the permutation that aligns ``other`` to ``ref``
    (with ``rotate``, also the embedding rotation ``Perms.embedding``).
    ``embedding``: ``procrustes`` rotates each foundation's output embedding onto the
    reference's (and its experts' heads with it) in non-local pools; ``none`` leaves it.
    After :meth:`align`, ``report`` holds what was done (per aligned model: seconds,
    objective before/after, fraction of units moved) for the results file.
    """

    name: str = "align"

    def __init__(self, embedding: str = "none") -> None:
        self.report: dict[str, Any] | None = None
        self.embedding = validate.choice("align.embedding", embedding, EMBEDDING)

    @abstractmethod
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
        """Permutations of ``other`` that best match ``ref``, and a dict of diagnostics.
        ``tasks`` names the tasks whose unlabeled data may be used. With ``rotate`` the
        result also holds the orthogonal embedding rotation (``Perms.embedding``)."""

    def params(self) -> dict[str, Any]:
        """The method's hyperparameters (recorded in ``pool.meta["align"]``)."""
        return {k: v for k, v in vars(self).items() if k != "report"}

    def align(self, pool: ModelPool, ctx: RunContext) -> ModelPool:
        spec = spec_for_factory(pool.encoder_factory)
        models: dict[str, dict[str, Any]] = {}
        if pool.bases:
            names = list(pool.bases)
            ref = names[0]
            missing = [t for t in pool.experts if pool.expert_base.get(t) not in pool.bases]
            if missing:
                raise ConfigError(
                    f"align: expert {missing[0]!r} has no foundation among the pool's bases "
                    f"{names} (expert_base says {pool.expert_base.get(missing[0])!r})"
                )
            rotate = self.embedding == "procrustes"
            if rotate:
                _check_rotatable(spec, pool)
            perms = {ref: spec.identity()}
            for f in names[1:]:
                tasks = [t for t in pool.tasks if t in pool.test_sets]
                perms[f] = self._timed(
                    spec, pool.bases[ref], pool.bases[f], pool, ctx, tasks, models, f, rotate
                )
            bases = {f: _view(pool.bases[f], spec, perms[f]) for f in names}
            experts = _PermutedExperts(
                pool.experts, spec, {t: perms[pool.expert_base[t]] for t in pool.experts}
            )
            heads = {
                t: rotate_head(h, perms[pool.expert_base[t]].embedding) if t in pool.expert_base
                else h
                for t, h in pool.heads.items()
            }  # fmt: skip
            pretrained = _average(list(bases.values()))
            new = dataclasses.replace(
                pool, pretrained=pretrained, experts=experts, bases=bases, heads=heads
            )
            kind = "foundations"
        else:
            ref = "pretrained"
            perms = {}
            for t in pool.experts:
                tasks = [t] if t in pool.test_sets else []
                perms[t] = self._timed(
                    spec, pool.pretrained, pool.experts[t], pool, ctx, tasks, models, t
                )
            new = dataclasses.replace(pool, experts=_PermutedExperts(pool.experts, spec, perms))
            kind = "experts"
        new.meta = {**pool.meta, "align": {"method": self.name, "reference": ref, **self.params()}}
        self.report = _summary(self.name, spec.arch, ref, kind, models, len(pool.experts))
        return new

    def _timed(self, spec, ref, other, pool, ctx, tasks, models, label, rotate=False) -> Perms:
        t = time.time()
        perms, info = self.find(spec, ref, other, pool, ctx, tasks, rotate=rotate)
        models[label] = {"seconds": round(time.time() - t, 3), **info, "moved": perms.moved()}
        return perms


def weight_cosine(
    spec: PermutationSpec, ref: Mapping[str, Tensor], other: Mapping[str, Tensor], perms: Perms
) -> float:
    """cos(θ_ref, π(θ_other)) over every floating tensor of the spec — the weight-matching
    objective Σ⟨W_ref, π W_other⟩, normalised to [-1, 1] so models of any size compare."""
    dot = na = nb = 0.0
    for key in spec.axes:
        a = ref[key]
        if not a.is_floating_point():
            continue
        b = spec.permute(key, other[key].to(a.device), perms).double()
        a = a.double()
        dot += float((a * b).sum())
        na += float((a * a).sum())
        nb += float((b * b).sum())
    return dot / max((na * nb) ** 0.5, 1e-30)


def procrustes(X: Tensor, Y: Tensor) -> Tensor:
    """The orthogonal Q minimising ‖X Q − Y‖_F (Schönemann 1966). ``X``, ``Y``: (n, d).
    Float64."""
    return procrustes_cross(X.double().T @ Y.double())


def procrustes_cross(M: Tensor) -> Tensor:
    """The orthogonal Q maximising tr(Qᵀ M) = ⟨Q, M⟩, given the cross-product M = Xᵀ Y:
    Q = U Vᵀ from the SVD M = U Σ Vᵀ (float64)."""
    U, _, Vt = torch.linalg.svd(M.double())
    return U @ Vt


def rotate_head(head: nn.Module, Q: Tensor | None) -> nn.Module:
    """A copy of the linear head ``head`` reading embeddings rotated by ``Q`` (``f → f Q``):
    weight ``W → W Q``, bias kept, so ``(W Q)(f Q)ᵀ = W fᵀ`` and ‖f Q‖ = ‖f‖ (a cosine head
    gives the same logits too). ``Q`` None: ``head`` itself."""
    if Q is None:
        return head
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"align.embedding=procrustes rotates the embedding space, so every head must be "
            f"linear (nn.Linear, e.g. a ClassificationHead); got {type(head).__name__}; use "
            "align.embedding=none"
        )
    new = copy.deepcopy(head)
    with torch.no_grad():
        w = head.weight.double() @ Q.to(head.weight.device, torch.float64)
        new.weight.copy_(w.to(head.weight.dtype))
    return new


def _check_rotatable(spec: PermutationSpec, pool: ModelPool) -> None:
    """Fail before any work when the embedding rotation cannot be applied exactly."""
    if spec.embedding is None:
        raise ConfigError(
            f"align.embedding=procrustes: the {spec.arch} spec has no output-embedding tensor "
            "in the state dict to rotate; use align.embedding=none"
        )
    for t, h in pool.heads.items():
        if t in pool.expert_base and not isinstance(h, nn.Linear):
            rotate_head(h, torch.eye(1))  # raises the one message


def _view(state: Mapping[str, Tensor], spec: PermutationSpec, perms: Perms) -> Mapping[str, Tensor]:
    return state if perms.is_identity() else PermutedStateDict(state, spec, perms)


class _PermutedExperts(Mapping[str, Mapping[str, Tensor]]):
    """task → that expert permuted by its own permutation; experts are read when indexed."""

    def __init__(self, experts: Mapping, spec: PermutationSpec, perms: dict[str, Perms]):
        self._experts, self._spec, self._perms = experts, spec, perms

    def __getitem__(self, task: str) -> Mapping[str, Tensor]:
        return _view(self._experts[task], self._spec, self._perms[task])

    def __iter__(self) -> Iterator[str]:
        return iter(self._experts)

    def __len__(self) -> int:
        return len(self._experts)


def _average(states: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key in states[0]:
        first = states[0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = first.double().clone()
        for s in states[1:]:
            acc += s[key].double()
        out[key] = (acc / len(states)).to(first.dtype)
    return out


def _summary(method, arch, ref, kind, models, n_experts) -> dict[str, Any]:
    """Means over the aligned models, plus the per-model records."""
    out: dict[str, Any] = {"method": method, "arch": arch, "reference": ref, "aligned": kind}
    if models:
        total = sum(m["seconds"] for m in models.values())
        out["seconds_total"] = round(total, 3)
        out["seconds_per_expert"] = round(total / max(n_experts, 1), 3)
        for k in next(iter(models.values())):
            vals = [m[k] for m in models.values() if isinstance(m.get(k), (int, float))]
            if k != "seconds" and vals and len(vals) == len(models):
                out[f"mean_{k}"] = round(sum(vals) / len(vals), 6)
    out["models"] = models
    return out
