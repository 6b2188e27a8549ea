"""The alignment stage: permute every expert (and base) of a pool into one coordinate system
before any merge, so it composes with every merge method and surgery kind.

Non-local pools (experts fine-tuned from different foundations, ``pool.bases``): the first
foundation is the reference; every other foundation is aligned to it, and each expert gets
the permutation of the foundation it was fine-tuned from — so its task vector θt − θ0 stays
in the same coordinates as its θ0. The new ``pretrained`` is the average of the aligned
bases (the non-local paper's choice, arXiv 2410.12766: align the bases, then average).

Local pools (one θ0): each expert is aligned to ``pretrained`` (close to the identity, since
experts sit near θ0; still correct).

The input pool is never modified: the returned pool holds lazy permuted views of the
experts (still streamed by merges) and fresh tensors for the new θ0.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from mergelab.align.archs import spec_for_factory
from mergelab.align.spec import Perms, PermutationSpec, PermutedStateDict
from mergelab.context import RunContext
from mergelab.errors import ConfigError
from mergelab.pool.base import ModelPool


class Alignment(ABC):
    """Base of the ``align=`` group: ``align(pool, ctx) -> ModelPool``.

    Subclasses implement :meth:`find`: the permutation that aligns ``other`` to ``ref``.
    After :meth:`align`, ``report`` holds what was done (per aligned model: seconds,
    objective before/after, fraction of units moved) for the results file.
    """

    name: str = "align"

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None

    @abstractmethod
    def find(
        self,
        spec: PermutationSpec,
        ref: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        pool: ModelPool,
        ctx: RunContext,
        tasks: list[str],
    ) -> tuple[Perms, dict[str, Any]]:
        """Permutations of ``other`` that best match ``ref``, and a dict of diagnostics.
        ``tasks`` names the tasks whose unlabeled data may be used."""

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
            perms = {ref: spec.identity()}
            for f in names[1:]:
                tasks = [t for t in pool.tasks if t in pool.test_sets]
                perms[f] = self._timed(
                    spec, pool.bases[ref], pool.bases[f], pool, ctx, tasks, models, f
                )
            bases = {f: _view(pool.bases[f], spec, perms[f]) for f in names}
            experts = _PermutedExperts(
                pool.experts, spec, {t: perms[pool.expert_base[t]] for t in pool.experts}
            )
            pretrained = _average(list(bases.values()))
            new = dataclasses.replace(pool, pretrained=pretrained, experts=experts, bases=bases)
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

    def _timed(self, spec, ref, other, pool, ctx, tasks, models, label) -> Perms:
        t = time.time()
        perms, info = self.find(spec, ref, other, pool, ctx, tasks)
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
