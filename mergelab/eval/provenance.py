"""What produced a run's numbers: the code (git commit), the libraries, the device, precision
and world size — and content fingerprints of a pool (weights, heads, test data) that key the
caches of numbers computed once per pool (baselines, task-vector geometry)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.context import RunContext
from mergelab.pool.base import ModelPool

log = logging.getLogger(__name__)

# bump when the baseline computation itself changes, so older cached rows are not reused
BASELINE_FORMAT = 2
PACKAGES = {
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "lightning": "lightning",
    "mergelab": "mergelab",
}
_DIGEST_ELEMENTS = 1 << 16  # per tensor, in the weight fingerprints


# --- the run ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of the mergelab source checkout; both None when
    mergelab is not run from a git checkout of itself (e.g. an installed wheel)."""
    pkg = Path(__file__).resolve().parents[1]
    none = {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "mergelab" != pkg:  # a checkout of something else that contains mergelab
            return none
        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return none


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, dist in PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def runtime(ctx: RunContext) -> dict[str, Any]:
    """Device, precision and world size as Lightning resolves the run's trainer config."""
    tr = dict(ctx.trainer)
    device = ctx.device
    out: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "accelerator": str(tr.get("accelerator", "cpu")),
        "precision": str(tr.get("precision", "32-true")),
        "num_nodes": tr.get("num_nodes", 1),
        "devices": tr.get("devices", 1),
        "world_size": None,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        out["world_size"] = ctx.engine.world_size
        out["precision"] = ctx.engine.precision
    except Exception as e:  # noqa: BLE001 — provenance must never fail a run
        log.debug("could not resolve the trainer config: %s", e)
        devices, nodes = out["devices"], out["num_nodes"]
        if isinstance(devices, int) and isinstance(nodes, int):
            out["world_size"] = devices * nodes
    return out


def provenance(ctx: RunContext) -> dict[str, Any]:
    """Everything about the run's environment that a number depends on."""
    return {**code_version(), "versions": library_versions(), **runtime(ctx)}


# --- fingerprints of a pool ------------------------------------------------------------------


def _digest_tensor(h: Any, t: Tensor, limit: int | None = _DIGEST_ELEMENTS) -> None:
    t = t.detach().cpu().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    part = t[:limit] if limit is not None else t
    h.update(part.contiguous().view(torch.uint8).numpy().tobytes())


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    fn = getattr(sd, "shape", None)  # lazy state dicts answer from their header
    return tuple(fn(key)) if callable(fn) else tuple(sd[key].shape)


def weights_fingerprint(sd: Mapping[str, Tensor]) -> str:
    """Keys and shapes of a state dict, plus the leading values of its first, middle and last
    tensors (sorted by name): cheap on lazy checkpoints, and different for any retrained,
    permuted or rebuilt model."""
    h = hashlib.sha256()
    keys = sorted(sd.keys())
    for key in keys:
        h.update(f"{key}:{_shape(sd, key)};".encode())
    for key in dict.fromkeys([keys[0], keys[len(keys) // 2], keys[-1]] if keys else []):
        _digest_tensor(h, sd[key])
    return h.hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        _digest_tensor(h, t, None)
    return h.hexdigest()[:16]


def dataset_fingerprint(ds: Any) -> dict[str, Any]:
    """Size and a digest of the first and last items as the pool serves them — after the
    transform, so preprocessing, data source and data version all show."""
    n = len(ds)
    h = hashlib.sha256()
    for i in sorted({0, n - 1}) if n else []:
        for part in ds[i] if isinstance(ds[i], (tuple, list)) else (ds[i],):
            if isinstance(part, Tensor):
                _digest_tensor(h, part, None)
            else:
                h.update(repr(part).encode())
    return {"n": n, "digest": h.hexdigest()[:16]}


def pool_identity(pool: ModelPool) -> dict[str, Any]:
    """What a pool is, apart from its tasks: family, backbone, meta (the zoo config and data
    version for the embedded zoo, the checkpoint files for real pools) and a fingerprint of
    θ0. Numbers cached per pool are keyed by this plus :func:`task_fingerprint` per task."""
    return {
        "format": BASELINE_FORMAT,
        "family": pool.family,
        "backbone": pool.backbone,
        "meta": pool.meta,
        "pretrained": weights_fingerprint(pool.pretrained),
    }


def task_fingerprint(pool: ModelPool, task: str) -> dict[str, Any]:
    """Content fingerprints of one task's expert, head and test data (after preprocessing),
    and in a non-local pool of the foundation its expert was fine-tuned from (its zero-shot
    row is evaluated with that foundation)."""
    out = {
        "expert": weights_fingerprint(pool.experts[task]),
        "head": module_fingerprint(pool.heads[task]),
        "data": dataset_fingerprint(pool.test_sets[task]),
    }
    if pool.bases:
        out["base"] = weights_fingerprint(pool.base_of(task))
    return out


def normalized(key: Any) -> Any:
    """``key`` as it reads back from json (for comparing with a cached copy)."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
