"""Pure state-dict arithmetic shared by the merge methods (streaming, one key at a time)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mergelab.errors import ConfigError


def float_keys(pretrained: Mapping[str, Tensor]) -> list[str]:
    """Keys of the floating-point tensors (the ones task vectors are defined on)."""
    return [k for k in pretrained.keys() if pretrained[k].is_floating_point()]


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must be a fraction in [0, 1], got {value}")
    return float(value)


def magnitude_threshold(values: Tensor, k: float) -> float:
    """The smallest |value| kept when keeping the top-``k`` fraction of ``values`` by
    magnitude (TIES "trim"). k = 1 keeps everything; k = 0 keeps nothing (+inf)."""
    return _kth_largest_abs_inplace(values.detach().abs().reshape(-1).float().contiguous(), k)


def _kth_largest_abs_inplace(flat_abs: Tensor, k: float) -> float:
    """Selection (introselect, O(n)) on a float32 CPU vector of magnitudes that the caller
    owns: it is partitioned in place, so no second copy is made."""
    n = flat_abs.numel()
    keep = int(round(k * n))
    if keep <= 0:
        return float("inf")
    if keep >= n:
        return 0.0
    arr = flat_abs.cpu().numpy()
    arr.partition(n - keep)  # the keep-th largest lands at index n - keep
    return float(arr[n - keep])


def global_thresholds(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]], k: float
) -> dict[str, float]:
    """Per task, the TIES trim threshold over the task's WHOLE flattened task vector.

    Streams one task at a time into one preallocated vector of |τt| and selects in place:
    peak extra memory is one model-sized float32 vector, never N models.
    """
    keys = float_keys(pretrained)
    total = sum(pretrained[key].numel() for key in keys)
    flat = torch.empty(total, dtype=torch.float32)
    out = {}
    for task, sd in experts.items():
        at = 0
        for key in keys:
            n = pretrained[key].numel()
            torch.sub(
                sd[key].float().reshape(-1),
                pretrained[key].float().reshape(-1),
                out=flat[at : at + n],
            )
            at += n
        flat.abs_()
        out[task] = _kth_largest_abs_inplace(flat, k)
    return out


def trim(tau: Tensor, threshold: float) -> Tensor:
    """Zero the entries of ``tau`` whose magnitude is below ``threshold``."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_sign(trimmed: Tensor) -> Tensor:
    """TIES sign election: per coordinate, the sign of the sum of the trimmed vectors
    (``trimmed`` stacks tasks on dim 0). Coordinates summing to 0 elect +1."""
    s = torch.sign(trimmed.sum(0))
    return torch.where(s == 0, torch.ones_like(s), s)


def disjoint_merge(trimmed: Tensor, sign: Tensor, reduce: str) -> Tensor:
    """Combine only the entries agreeing with the elected sign, by sum or by mean over the
    agreeing (non-zero) entries."""
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    kept = trimmed * agree
    if reduce == "sum":
        return kept.sum(0)
    if reduce == "mean":
        return kept.sum(0) / agree.sum(0).clamp(min=1)
    raise ConfigError(f"unknown TIES reduce {reduce!r}; expected 'sum' or 'mean'")
