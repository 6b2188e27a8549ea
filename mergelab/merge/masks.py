"""TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, arXiv 2405.07813) — the mask computation shared by Consensus merging
(``consensus.py``) and the task-conditional TALL-masks method.

With τt = θt − θ0 and the multi-task vector τMTL (unscaled: Σt τt, or the TIES-merged vector),
the TALL mask of task t keeps the coordinates where τt is closer to the multi-task model than
to the pretrained one::

    mt = 1{ |τt| > λt · |τMTL − τt| }          (strict >, as the authors' code)

Task t then runs θ0 + mt ⊙ τMTL (TALL masks, a task id is needed); Consensus merging keeps the
coordinates at least k tasks agree on, one model for all tasks::

    m = 1{ Σt mt ≥ k },   θ = θ0 + α · (m ⊙ τMTL)

Building blocks, usable one parameter tensor at a time:

- :func:`multitask_vector` — τMTL of one parameter from its stacked task vectors;
- :func:`tall_masks` — the T boolean masks of one parameter;
- :func:`consensus_mask` — their k-agreement;
- :func:`iter_tall_masks` — streams a whole model: yields, per key, θ0[key], τMTL and the masks,
  holding one parameter per expert at a time. τMTL = Σt τt, or — ``mtl="ties"`` — the
  unscaled merge of :class:`~mergelab.merge.ties.Ties` itself (so its trim semantics are
  mergelab's TIES, whatever ``ties.py`` settles on), computed first as one fp32 model copy
  that is released key by key.

λt can differ per task (the paper picks each from {0.2, …, 0.6} by that task's validation
accuracy of θ0 + mt ⊙ τMTL; FusionBench uses a fixed 0.6 without data): pass a mapping
task → λ, or one float for every task.

Typical use (a task-conditional merge)::

    for p in iter_tall_masks(pretrained, experts, lambdas=0.6, mtl="task_arithmetic"):
        if p.masks is None:               # integer buffer: same in every model
            continue
        for i, task in enumerate(experts):  # masks follow the experts' order
            theta_t = p.base.float() + p.masks[i] * p.tau_mtl

Masks come back as ``torch.bool`` (one byte per weight); packing them into bits for storage is
the caller's choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab import validate
from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge import ops
from mergelab.merge.base import check_experts, iter_params, tensor_meta
from mergelab.merge.ties import Ties

MTL_KINDS = ("task_arithmetic", "ties")
TIES_REDUCES = ("sum", "mean")
TIES_SCOPES = ("global", "per_tensor")


def check_mtl(kind: str, ties_k: float, ties_reduce: str, ties_scope: str) -> None:
    """Validate the multi-task-vector settings (one clear ConfigError per bad value)."""
    validate.choice("multi-task vector", kind, MTL_KINDS)
    validate.fraction("ties_k", ties_k)
    validate.choice("ties_reduce", ties_reduce, TIES_REDUCES)
    validate.choice("ties_scope", ties_scope, TIES_SCOPES)


def check_shapes(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> None:
    """Every expert tensor has θ0's shape — checked before a whole-model pass (TIES' global
    thresholds), which would otherwise fail with a bare shape error. Lazy state dicts answer
    from their header (``sd.shape(key)``) without reading the tensor."""

    def shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
        fn = getattr(sd, "shape", None)
        return tuple(fn(key)) if callable(fn) else tuple(sd[key].shape)

    for key in pretrained.keys():
        want = shape(pretrained, key)
        for task, sd in experts.items():
            got = shape(sd, key)
            if got != want:
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has shape {got}, pretrained has {want}"
                )


def multitask_vector(
    taus: Tensor,
    kind: str = "task_arithmetic",
    thresholds: Sequence[float] | None = None,
    ties_k: float = 0.2,
    ties_reduce: str = "sum",
) -> Tensor:
    """τMTL of one parameter, unscaled, from its task vectors stacked on dim 0.

    ``task_arithmetic``: Σt τt. ``ties``: trim → elect → disjoint merge (``ties_reduce``) with
    the ``ops`` primitives, given per-task ``thresholds`` (e.g. :func:`ops.global_thresholds`)
    or, when None, the top-``ties_k`` within this tensor. Note: this per-tensor TIES uses the
    trim thresholds it is given; :func:`iter_tall_masks` instead takes τMTL from the
    :class:`~mergelab.merge.ties.Ties` class, so it always matches ``merge=ties``.
    """
    if kind == "task_arithmetic":
        return taus.sum(0)
    if kind != "ties":
        raise ConfigError(f"multi-task vector must be one of {MTL_KINDS}, got {kind!r}")
    trimmed = torch.stack(
        [
            ops.trim(
                tau,
                thresholds[i] if thresholds is not None else ops.magnitude_threshold(tau, ties_k),
            )
            for i, tau in enumerate(taus)
        ]
    )
    return ops.disjoint_merge(trimmed, ops.elect_sign(trimmed), ties_reduce)


def tall_masks(taus: Tensor, tau_mtl: Tensor, lambdas: float | Sequence[float] | Tensor) -> Tensor:
    """TALL masks of one parameter: ``out[t] = |τt| > λt · |τMTL − τt|`` (bool, shape of ``taus``).

    ``taus`` stacks the T task vectors on dim 0; ``lambdas`` is one λ or one per task.
    """
    lam = torch.as_tensor(lambdas, dtype=taus.dtype)
    if lam.ndim == 1:
        if lam.numel() != taus.shape[0]:
            raise ConfigError(f"got {lam.numel()} TALL-mask lambdas for {taus.shape[0]} tasks")
        lam = lam.reshape(-1, *([1] * (taus.ndim - 1)))
    elif lam.ndim != 0:
        raise ConfigError("TALL-mask lambdas must be one number or one per task")
    return taus.abs() > lam * (tau_mtl.unsqueeze(0) - taus).abs()


def consensus_mask(masks: Tensor, k: int) -> Tensor:
    """Consensus mask: coordinates kept by at least ``k`` of the T masks (stacked on dim 0).
    k = 0 keeps everything (plain TA/TIES); k > T keeps nothing (θ0)."""
    return masks.sum(0) >= k


@dataclass
class MaskedParam:
    """One parameter as :func:`iter_tall_masks` yields it. For a non-float key (an integer
    buffer, identical in every model) ``tau_mtl`` and ``masks`` are None."""

    key: str
    base: Tensor  # θ0[key], as stored (its own dtype)
    tau_mtl: Tensor | None  # fp32 unscaled multi-task vector
    masks: Tensor | None  # bool, (T, *shape): TALL mask per task, in the experts' order


def resolve_lambdas(lambdas: float | Mapping[str, float], tasks: Sequence[str]) -> list[float]:
    """One λ per task (in ``tasks`` order) from a float or a task → λ mapping."""
    if isinstance(lambdas, Mapping):
        missing = [t for t in tasks if t not in lambdas]
        if missing:
            raise ConfigError(f"TALL-mask lambda missing for task {missing[0]!r}")
        out = [float(lambdas[t]) for t in tasks]
    else:
        out = [float(lambdas)] * len(tasks)
    if any(v < 0 for v in out):
        raise ConfigError(f"TALL-mask lambdas must be ≥ 0, got {out}")
    return out


def iter_tall_masks(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    lambdas: float | Mapping[str, float] = 0.6,
    mtl: str = "task_arithmetic",
    ties_k: float = 0.2,
    ties_reduce: str = "sum",
    ties_scope: str = "global",
    ties_mode: str = "reference",
    ties_extra_zeros: int = 0,
) -> Iterator[MaskedParam]:
    """Stream over every key of ``pretrained``: θ0[key], τMTL[key] and the T TALL masks.

    Holds one parameter per expert at a time (lazy experts stay lazy). With ``mtl="ties"``
    the TIES merge runs first (its own passes over the experts) and its fp32 result — one
    model copy — is released key by key as the stream advances.
    """
    check_mtl(mtl, ties_k, ties_reduce, ties_scope)
    check_experts(pretrained, experts)
    tasks = list(experts)
    lam = resolve_lambdas(lambdas, tasks)
    ties_merged: dict[str, Tensor] = {}
    if mtl == "ties":
        check_shapes(pretrained, experts)
        ties = Ties(
            k=ties_k,
            scaling=1.0,
            reduce=ties_reduce,
            scope=ties_scope,
            mode=ties_mode,
            extra_zeros=ties_extra_zeros,
        )
        ties_merged = ties.merge(_Float32(pretrained), experts)  # θ0 + τMTL, fp32
    for key, base, vals in iter_params(pretrained, experts):
        if not base.is_floating_point():
            yield MaskedParam(key, base, None, None)
            continue
        b = base.float()
        taus = torch.stack([v.float() - b for v in vals])
        # a round trip through θ space, as in the authors' code (θ0 + τMTL, then − θ0)
        tau_mtl = ties_merged.pop(key) - b if mtl == "ties" else taus.sum(0)
        yield MaskedParam(key, base, tau_mtl, tall_masks(taus, tau_mtl, lam))


class _Float32(Mapping[str, Tensor]):
    """θ0 seen in fp32 (float keys), so that the TIES pass returns an fp32 τMTL whatever
    θ0's storage dtype."""

    def __init__(self, sd: Mapping[str, Tensor]):
        self.sd = sd

    def __getitem__(self, key: str) -> Tensor:
        v = self.sd[key]
        return v.float() if v.is_floating_point() else v

    def __iter__(self) -> Iterator[str]:
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)

    def shape(self, key: str) -> tuple[int, ...]:
        fn = getattr(self.sd, "shape", None)
        return tuple(fn(key)) if callable(fn) else tuple(self.sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        dtype = tensor_meta(self.sd, key)[1]
        return torch.float32 if dtype.is_floating_point else dtype
