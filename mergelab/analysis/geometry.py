"""Task-vector geometry (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
arXiv 2212.04089, Fig. 7): per task the norm ‖τt‖ of τt = θt − θ0 and its size relative to
the pretrained weights ‖τt‖ / ‖θ0‖, and the pairwise cosine similarities
cos(τs, τt) = ⟨τs, τt⟩ / (‖τs‖ ‖τt‖), over all floating-point parameters.

These define a pool's regime: experts fine-tuned close to θ0 (small ratios, near-orthogonal
task vectors) are the *local* regime the merging papers work in. Computed streaming, one
parameter at a time over (possibly lazy) experts: the Gram matrix Σ_keys τ τᵀ accumulates in
float64, so memory holds one parameter per expert.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

JSON_NAME = "task_vectors.json"
PNG_NAME = "task_vectors.png"


def task_vector_geometry(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> dict[str, Any]:
    """Norms, norm ratios and the cosine matrix of the task vectors τt = θt − θ0.

    Returns ``{"tasks", "n_params", "pretrained_norm", "norms": {t}, "ratios": {t},
    "cosine": T×T list, "median_ratio", "mean_cosine"}`` (``mean_cosine``: mean over pairs
    s < t; None with one task)."""
    tasks = list(experts)
    if not tasks:
        raise ConfigError("task-vector geometry needs at least one expert, got none")
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    base_sq = torch.zeros((), dtype=torch.float64)
    n_params = 0
    for key in pretrained.keys():
        base = pretrained[key]
        if not base.is_floating_point():
            continue
        b = base.detach().reshape(-1).float()
        taus = torch.empty(len(tasks), b.numel())
        for i, task in enumerate(tasks):
            v = experts[task][key]
            if v.shape != base.shape:
                raise CheckpointError(
                    f"expert {task!r}: key {key!r} has shape {tuple(v.shape)}, "
                    f"pretrained has {tuple(base.shape)}"
                )
            torch.sub(v.detach().reshape(-1).float(), b, out=taus[i])
        gram += (taus @ taus.T).double()
        base_sq += torch.dot(b, b).double()
        n_params += b.numel()
    norms = gram.diagonal().clamp(min=0).sqrt()
    base_norm = float(base_sq.sqrt())
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / denom.clamp(min=1e-300), torch.zeros_like(gram))
    cosine.fill_diagonal_(1.0)
    ratios = {
        t: float(norms[i]) / base_norm if base_norm > 0 else None for i, t in enumerate(tasks)
    }
    pairs = [float(cosine[i, j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    finite_ratios = [r for r in ratios.values() if r is not None]
    return {
        "tasks": tasks,
        "n_params": n_params,
        "pretrained_norm": base_norm,
        "norms": {t: float(norms[i]) for i, t in enumerate(tasks)},
        "ratios": ratios,
        "cosine": [[float(c) for c in row] for row in cosine],
        "median_ratio": statistics.median(finite_ratios) if finite_ratios else None,
        "mean_cosine": sum(pairs) / len(pairs) if pairs else None,
    }


def summary(geometry: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the geometry a results.json carries (everything but the matrix)."""
    return {k: v for k, v in geometry.items() if k != "cosine"}


def plot_cosine(geometry: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Heatmap of the pairwise cosine matrix with every value written in its cell (the task
    arithmetic paper's figure); tick labels carry ‖τt‖/‖θ0‖."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(geometry["tasks"])
    cos = torch.tensor(geometry["cosine"]).numpy()
    size = max(4.0, 0.75 * len(tasks) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(cos, cmap="viridis", vmin=min(0.0, float(cos.min())), vmax=1.0)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(
                j,
                i,
                f"{cos[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if cos[i, j] > 0.6 else "white",
            )
    ratios = geometry.get("ratios") or {}
    labels = [f"{t}\n({ratios[t]:.3f})" if ratios.get(t) is not None else t for t in tasks]
    ax.set_xticks(range(len(tasks)), [t for t in tasks], rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels)
    ax.set_ylabel("task (‖τt‖ / ‖θ0‖)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    med, mean = geometry.get("median_ratio"), geometry.get("mean_cosine")
    sub = []
    if med is not None:
        sub.append(f"median ‖τ‖/‖θ0‖ = {med:.3f}")
    if mean is not None:
        sub.append(f"mean pairwise cosine = {mean:.3f}")
    ax.set_title(
        (title or "task-vector cosine similarity") + ("\n" + ", ".join(sub) if sub else "")
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cached_geometry(pool, cache_dir: str | Path) -> dict[str, Any]:
    """:func:`task_vector_geometry` of ``pool`` (its ``pretrained`` and ``experts``),
    computed once per pool: cached next to the baseline rows, under the same pool identity
    and the per-task fingerprints of the tasks it covers."""
    from mergelab.eval.baselines import cache_dir_of
    from mergelab.eval.provenance import key_hash, normalized, pool_identity, task_fingerprint
    from mergelab.files import atomic_write

    key = normalized(
        {
            "pool": pool_identity(pool),
            "tasks": {t: task_fingerprint(pool, t) for t in pool.experts},
        }
    )
    path = cache_dir_of(cache_dir) / f"{pool.family}-{key_hash(key)}.geometry.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["geometry"]
    geometry = task_vector_geometry(pool.pretrained, pool.experts)
    atomic_write(path, json.dumps({"key": key, "geometry": geometry}, indent=2))
    return geometry


def write_geometry(
    geometry: Mapping[str, Any], out_dir: str | Path, title: str | None = None
) -> None:
    """``task_vectors.json`` and the heatmap ``task_vectors.png`` in ``out_dir``."""
    from mergelab.files import atomic_write

    out_dir = Path(out_dir)
    atomic_write(out_dir / JSON_NAME, json.dumps(dict(geometry), indent=2))
    plot_cosine(geometry, out_dir / PNG_NAME, title)
