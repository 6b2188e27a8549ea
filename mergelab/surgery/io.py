"""Saving and re-loading trained surgery modules (Surgery v1 / SurgeryV2).

The file is ``<out_dir>/surgery.safetensors``: the modules' tensors (keys
``<task>.<site>.{down,up}.weight``) plus metadata naming what they were trained for — kind,
rank, tasks, block names, widths, backbone — so that an evaluation-only run
(``surgery.load_from=<path>``) refuses a file that does not fit its model, by name.
Tensors are stored as they are, so a round trip is bit-exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergelab.errors import CheckpointError
from mergelab.pool.state import save_state_dict
from mergelab.surgery.modules import SurgeryModel

SURGERY_FILE = "surgery.safetensors"
FORMAT = "mergelab.surgery/1"


def surgery_metadata(model: SurgeryModel, backbone: str = "") -> dict[str, str]:
    """What the modules were trained for (safetensors metadata is str → str)."""
    return {
        "format": FORMAT,
        "kind": model.kind,
        "rank": str(model.rank),
        "tasks": json.dumps(model.tasks),
        "blocks": json.dumps(model.block_names),
        "width": str(model.blocks.width if model.blocks is not None else 0),
        "feature_dim": str(model.feature_dim),
        "backbone": backbone,
    }


def save_surgery(model: SurgeryModel, path: str | os.PathLike, backbone: str = "") -> Path:
    """Write ``model``'s surgery modules and metadata to ``path`` atomically."""
    path = Path(path)
    save_state_dict(model.adapters.state_dict(), path, surgery_metadata(model, backbone))
    return path


def read_surgery(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The tensors and metadata of a surgery file; a clear CheckpointError if it is not one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"surgery file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a mergelab surgery file (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    return tensors, meta


def load_surgery(model: SurgeryModel, path: str | os.PathLike) -> SurgeryModel:
    """Load trained modules into ``model`` (built with the same kind/rank/tasks/blocks)."""
    tensors, meta = read_surgery(path)
    expected = surgery_metadata(model)
    for key in ("kind", "rank", "tasks", "blocks", "width", "feature_dim"):
        if meta.get(key) != expected[key]:
            raise CheckpointError(
                f"surgery file {path} was trained with {key}={meta.get(key)}, "
                f"but this run expects {key}={expected[key]}"
            )
    own = model.adapters.state_dict()
    for k, v in own.items():
        if k not in tensors:
            raise CheckpointError(f"surgery file {path}: missing tensor {k!r}")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"surgery file {path}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
            )
    extra = sorted(set(tensors) - set(own))
    if extra:
        raise CheckpointError(f"surgery file {path}: unexpected tensor {extra[0]!r}")
    model.adapters.load_state_dict(tensors, strict=True)
    return model
