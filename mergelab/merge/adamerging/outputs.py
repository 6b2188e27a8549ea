"""What a fitted AdaMerging leaves in the run dir: the learned coefficients λ as json
(effective and raw, per task and column, with the entropy curve) and a task × layer heatmap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mergelab.files import atomic_path, atomic_write

if TYPE_CHECKING:
    from mergelab.merge.adamerging.method import AdaMerging

COEFFICIENTS_JSON = "adamerging_coefficients.json"
COEFFICIENTS_PNG = "adamerging_coefficients.png"
# Above this many coefficients per task the heatmap shows tensor indices instead of names
# (the json keeps the names); ViT-B/32 has ~150 float tensors.
MAX_NAMED_TICKS = 40


def columns(method: AdaMerging) -> list[str]:
    """Column names of λ: one shared column task-wise, one per merged tensor layer-wise."""
    return ["all tensors"] if method.granularity == "task" else list(method.keys_)


def _effective(method: AdaMerging, lam: Tensor) -> Tensor:
    return lam[:, :1] if method.granularity == "task" else lam


def coefficients_record(method: AdaMerging, lam: Tensor, raw: Tensor) -> dict[str, Any]:
    """The json record of a fitted ``method``: effective (clamped) λ as used in θ(λ), raw λ,
    the settings that produced them and the entropy per step."""
    cols = columns(method)
    eff = _effective(method, lam).tolist()
    return {
        "method": method.name,
        "granularity": method.granularity,
        "vectors": method.vectors,
        "init": method.init,
        "clamp": [method.clamp_min, method.clamp_max],
        "steps": len(method.entropy_history_),
        "lr": method.lr,
        "batch_size": method.batch_size,
        "tasks": method.tasks_,
        "columns": cols,
        "coefficients": eff,
        "raw_coefficients": raw.tolist(),
        "by_task": {t: dict(zip(cols, row)) for t, row in zip(method.tasks_, eff)},
        "entropy_history": method.entropy_history_,
    }


def save_json(path: Path, method: AdaMerging, lam: Tensor, raw: Tensor) -> Path:
    """Write :func:`coefficients_record` to ``path`` atomically."""
    return atomic_write(path, json.dumps(coefficients_record(method, lam, raw), indent=2))


def save_heatmap(path: Path, method: AdaMerging, lam: Tensor) -> Path:
    """Plot effective λ as a task × column heatmap and write it to ``path`` atomically."""
    # A bare Figure with the Agg canvas: no pyplot, so no global backend switch and no
    # figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eff = _effective(method, lam).numpy()
    cols = columns(method)
    n_rows, n_cols = eff.shape
    named = n_cols <= MAX_NAMED_TICKS
    # room for the rotated tensor names under the heatmap when they are shown
    label_room = 0.06 * max(len(c) for c in cols) if named else 0.5
    fig = Figure(figsize=(min(max(7, 4 + 0.15 * n_cols), 24), 1.2 + 0.4 * n_rows + label_room))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(
        eff,
        aspect="auto",
        cmap="viridis",
        vmin=method.clamp_min,
        vmax=method.clamp_max,
        interpolation="nearest",
    )
    ax.set_yticks(range(n_rows), method.tasks_)
    if named:
        ax.set_xticks(range(n_cols), cols, rotation=90 if n_cols > 1 else 0, fontsize=6)
    else:
        ax.set_xlabel("parameter tensor index (names in " + COEFFICIENTS_JSON + ")")
    ax.set_title(f"AdaMerging coefficients λ ({method.granularity}-wise, {method.vectors})")
    fig.colorbar(im, ax=ax, label="λ (clamped)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
