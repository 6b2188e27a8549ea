"""The statistics file: a safetensors of ``"<group>/<site name>/<stat>"`` tensors whose
metadata names the method, backbone, groups (with the task -> group map) and sites, so that a
later run can correct the same merged model without measuring again."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from mergelab.errors import CheckpointError
from mergelab.pool.base import MultiTaskModel
from mergelab.pool.state import save_state_dict
from mergelab.surgery.correction.model import STATS, CorrectedModel
from mergelab.surgery.correction.sites import Site, discover_sites


def save_stats(
    model: CorrectedModel, path: str | os.PathLike, method: str, backbone: str, **meta: object
) -> None:
    """Write ``model``'s statistics atomically, with the method, the backbone and ``meta``
    (JSON-encoded) beside the groups, the task -> group map and the sites. Only global rank 0
    writes: every rank measures the same statistics."""
    if _process_rank() != 0:
        return
    header = {k: json.dumps(v) for k, v in meta.items()}
    header.update(
        method=str(method),
        backbone=str(backbone),
        groups=json.dumps(model.groups),
        group_of=json.dumps(model.group_of),
        sites=json.dumps([[s.kind, s.block, s.name] for s in model.sites]),
        eps=json.dumps(model.eps),
    )
    save_state_dict(model.stats_state(), path, metadata=header)


def load_stats(
    model: MultiTaskModel,
    path: str | os.PathLike,
    kinds: Sequence[str],
    method: str,
    group_of: Mapping[str, str],
    backbone: str | None = None,
) -> CorrectedModel:
    """A :class:`CorrectedModel` on ``model`` with statistics read from a file written by
    :func:`save_stats` (no measuring). The file must come from ``method``, hold exactly the
    ``kinds`` sites of this encoder, map every task of ``model`` to the group ``group_of``
    expects and, when ``backbone`` is given, have been measured on that backbone; otherwise a
    CheckpointError."""
    from safetensors import safe_open

    want = {s.name for s in discover_sites(model.encoder, kinds)}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        try:
            saved = [Site(k, int(b), n) for k, b, n in json.loads(meta["sites"])]
            eps = float(json.loads(meta["eps"]))
        except (KeyError, ValueError, TypeError):
            raise CheckpointError(f"{path}: not a statistics surgery file") from None
        saved_method = meta.get("method")
        if saved_method != method:
            raise CheckpointError(
                f"{path}: statistics of method {saved_method!r}, expected {method!r}"
            )
        saved_backbone = meta.get("backbone")
        if backbone is not None and saved_backbone not in (None, backbone):
            raise CheckpointError(
                f"{path}: statistics were measured on backbone {saved_backbone!r}, "
                f"this run uses {backbone!r}"
            )
        if {s.name for s in saved} != want:
            raise CheckpointError(
                f"{path}: saved sites {[s.name for s in saved]} do not match the {list(kinds)} "
                f"sites of this encoder {sorted(want)}"
            )
        if "group_of" in meta:
            saved_group_of = json.loads(meta["group_of"])
        else:  # files written before groups existed: one group per task
            saved_group_of = {t: t for t in json.loads(meta.get("tasks", "[]"))}
        for t in model.tasks:
            if saved_group_of.get(t) != group_of[t]:
                raise CheckpointError(
                    f"{path}: task {t!r} has statistics group {saved_group_of.get(t)!r}, "
                    f"expected {group_of[t]!r} (saved tasks: {sorted(saved_group_of)})"
                )
        groups = list(dict.fromkeys(group_of[t] for t in model.tasks))
        keys = set(f.keys())
        missing = [
            f"{g}/{s.name}/{st}" for g in groups for s in saved for st in STATS
            if f"{g}/{s.name}/{st}" not in keys
        ]  # fmt: skip
        if missing:
            raise CheckpointError(f"{path}: missing statistic {missing[0]!r}")
        channels = [f.get_slice(f"{groups[0]}/{s.name}/mu_expert").get_shape()[-1] for s in saved]
        out = CorrectedModel(model, saved, channels, eps, {t: group_of[t] for t in model.tasks})
        for g in groups:
            for i, s in enumerate(saved):
                stats = {st: f.get_tensor(f"{g}/{s.name}/{st}") for st in STATS}
                if any(tuple(v.shape) != (channels[i],) for v in stats.values()):
                    raise CheckpointError(f"{path}: group {g!r} site {s.name!r} has a wrong shape")
                out.set_stats(g, i, **stats)
    return out


def _process_rank() -> int:
    # Lightning reads RANK / LOCAL_RANK / SLURM_PROCID / JSM_NAMESPACE_RANK for us.
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)
