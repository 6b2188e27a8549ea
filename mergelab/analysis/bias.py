"""Representation bias: how far a (merged, possibly repaired) model's representations are from
each task's expert, block by block, and plots of it.

"Representation bias" is the quantity Representation Surgery (Yang et al., ICML 2024, §3) and
SurgeryV2 (arXiv 2410.14389, §3) measure and reduce: for task t and block l,

    bias_t,l = mean_images mean_channels | mean_tokens(z_merged,t,l) − mean_tokens(z_expert,t,l) |

(the L1 distance of the token-mean residual streams, the same quantity SurgeryV2's loss
aligns), plus the same L1 distance between the final image features. The model is measured as
routed for task t, i.e. after whatever surgery its ``features(x, t)`` applies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab import validate
from mergelab.context import RunContext
from mergelab.engine import TaskBatches
from mergelab.errors import ConfigError
from mergelab.files import atomic_path
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.blocks import block_token_means, discover_blocks
from mergelab.surgery.unlabeled import unlabeled_indices

FINAL = "final"


def measure_bias(
    model: MultiTaskModel,
    pool: ModelPool,
    ctx: RunContext,
    max_images: int = 256,
    expert_cache: dict | None = None,
) -> dict:
    """Per task, the L1 representation bias of ``model`` against the task's expert at every
    block output and at the final feature (Surgery §3 / SurgeryV2 §3, equation above).

    Uses up to ``max_images`` images of each task's test split (the same seeded subset for
    every call, so before/after numbers are comparable). Returns a JSON-serialisable
    ``{"blocks": [block names..., "final"], "per_task": {task: [floats]}}``.

    Measuring passes of the engine (its device, precision and processes: under DDP each
    process measures whole batches and the sums are added up).

    ``expert_cache``: pass the same dict to the before- and after-surgery calls so each
    expert is loaded and run once (its representations of the seeded subset are fixed).
    """
    max_images = validate.integer("analysis.max_images", max_images)
    blocks = discover_blocks(model.encoder)
    names = [*blocks.names, FINAL]
    for task in model.tasks:
        _check_task(pool, task)
    subsets = {
        t: unlabeled_indices(len(pool.test_sets[t]), int(max_images), ctx.seed) for t in model.tasks
    }
    cache = expert_cache if expert_cache is not None else {}
    for task in model.tasks:
        if task not in cache:
            cache[task] = _expert_representations(pool, task, subsets[task], ctx, len(blocks))

    slot = {t: i for i, t in enumerate(model.tasks)}
    # per task: Σ over images of the per-image L1 (mean over channels), per block + final
    totals = torch.zeros(len(model.tasks), len(names) + 1, dtype=torch.float64)

    def step(batch) -> None:
        task, rows = batch["task"], batch["rows"].cpu()
        m_means, m_final = block_token_means(blocks, partial(model.features, batch["images"], task))
        e_means, e_final = cache[task]["means"][rows], cache[task]["final"][rows]
        mine = [*m_means, m_final]
        theirs = [*e_means.unbind(1), e_final]
        for i, (m, e) in enumerate(zip(mine, theirs)):
            l1 = (m.float().cpu() - e.float()).abs().mean(dim=-1)
            totals[slot[task], i] += l1.double().sum()
        totals[slot[task], -1] += rows.numel()

    parts = {t: (pool.test_sets[t], subsets[t]) for t in model.tasks}
    ctx.engine.run(step, {"model": model}, TaskBatches(parts, ctx.eval_batch_size), ctx.num_workers)
    totals = ctx.engine.sum(totals)
    per_task = {t: [float(v) for v in totals[i, :-1] / totals[i, -1]] for t, i in slot.items()}
    return {"blocks": names, "per_task": per_task}


def _expert_representations(
    pool: ModelPool, task: str, indices: Tensor, ctx: RunContext, depth: int
) -> dict[str, Tensor]:
    """The expert's block token-means ``(n, depth, D)`` and final features ``(n, d)`` on
    ``indices`` of the task's test split, in that order, on every process."""
    expert = pool.expert_encoder(task)
    expert_blocks = discover_blocks(expert)
    if len(expert_blocks) != depth:
        raise ConfigError(f"expert {task!r} has {len(expert_blocks)} blocks, the model has {depth}")

    def run(enc: nn.Module, x: Tensor) -> dict[str, Tensor]:
        means, final = block_token_means(expert_blocks, partial(enc, x))
        return {"means": torch.stack(means, dim=1), "final": final}

    out = ctx.engine.compute(
        run, expert, pool.test_sets[task], indices, ctx.eval_batch_size, ctx.num_workers
    )
    return {"means": out["means"], "final": out["final"]}


def _check_task(pool: ModelPool, task: str) -> None:
    if task not in pool.test_sets or task not in pool.experts:
        raise ConfigError(
            f"task {task!r} has no expert or test split in the pool (pool tasks: {list(pool.tasks)})"
        )


# ----------------------------------------------------------------------------------- plots


def plot_bias(
    before: Mapping[str, Any], after: Mapping[str, Any] | None, path: str | os.PathLike
) -> Path:
    """PNG of representation bias vs depth (Surgery/SurgeryV2 figure style): one colour per
    task, ``before`` solid and ``after`` (e.g. after surgery) dashed. Returns the path."""
    names, before_rows = _check_bias(before, "before")
    after_rows = None
    if after is not None:
        after_names, after_rows = _check_bias(after, "after")
        if after_names != names:
            raise ConfigError(
                f"plot_bias: 'after' blocks {after_names} differ from 'before' {names}"
            )
        missing = [t for t in before_rows if t not in after_rows]
        if missing:
            raise ConfigError(f"plot_bias: 'after' has no values for task(s) {missing}")

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    xs = list(range(len(names)))
    colours = _colours(len(before_rows))
    for colour, (task, ys) in zip(colours, before_rows.items()):
        ax.plot(xs, ys, "-o", color=colour, label=task, markersize=3)
        if after_rows is not None:
            ax.plot(xs, after_rows[task], "--o", color=colour, markersize=3)
    ax.set_xticks(xs, [_short(n) for n in names])
    ax.set_xlabel("block")
    ax.set_ylabel("L1 distance to expert (token mean)")
    ax.set_title("Representation bias vs depth")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if after_rows is not None:
        handles += [Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--")]
        labels += ["before", "after"]
    ax.legend(handles, labels, fontsize="small", loc="upper left", ncols=2)
    return _save_png(fig, path)


def plot_projection(
    model: MultiTaskModel,
    pool: ModelPool,
    tasks: Sequence[str] | None,
    path: str | os.PathLike,
    max_images: int = 200,
    seed: int = 0,
    label: str = "merged",
    ctx: RunContext | None = None,
) -> Path:
    """PNG of a 2-D PCA of final image features, ``model`` (routed per task) vs the task's
    expert, one panel per task, as in the representation-bias figures of Surgery (ICML 2024,
    Fig. 1) and SurgeryV2. The PCA of each panel is fit on both point sets together so they
    share axes. ``tasks=None`` shows up to the first four of the model's tasks. Features come
    from measuring passes of ``ctx``'s engine (default: one CPU process); only rank 0 writes."""
    tasks = list(model.tasks[:4] if tasks is None else tasks)
    if not tasks:
        raise ConfigError("plot_projection needs at least one task")
    for t in tasks:
        if t not in model.tasks:
            raise ConfigError(f"plot_projection: unknown task {t!r}; the model has {model.tasks}")
        _check_task(pool, t)
    max_images = validate.integer("analysis.max_images (a projection)", max_images, minimum=2)

    from matplotlib.figure import Figure

    ctx = ctx if ctx is not None else RunContext(out_dir=Path(path).parent)
    bs, nw = ctx.eval_batch_size, ctx.num_workers
    panels = []
    for t in tasks:
        ds = pool.test_sets[t]
        idx = unlabeled_indices(len(ds), int(max_images), seed)
        mine = ctx.engine.compute(lambda m, x, t=t: {"f": m.features(x, t)}, model, ds, idx, bs, nw)
        expert = pool.expert_encoder(t)
        theirs = ctx.engine.compute(lambda e, x: {"f": e(x)}, expert, ds, idx, bs, nw)
        del expert
        panels.append((t, *_pca2(mine["f"].float(), theirs["f"].float())))
    if not ctx.is_global_zero:  # every process measured its share; rank 0 draws
        return Path(path)

    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (t, m2, e2) in zip(axes, panels):
        ax.scatter(e2[:, 0], e2[:, 1], s=6, alpha=0.6, label="expert", color="tab:blue")
        ax.scatter(m2[:, 0], m2[:, 1], s=6, alpha=0.6, label=label, color="tab:red")
        ax.set_title(t, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small", markerscale=2)
    fig.suptitle(f"Final features, PCA: {label} vs expert")
    return _save_png(fig, path)


def _pca2(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``a`` and ``b`` on the top-2 principal axes of their union."""
    both = torch.cat([a, b]).double()
    centred = both - both.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    proj = centred @ vh[:k].T
    if k < 2:  # degenerate (1 feature): pad so the scatter still has two axes
        proj = torch.cat([proj, torch.zeros(proj.shape[0], 2 - k, dtype=proj.dtype)], dim=1)
    return proj[: len(a)].float(), proj[len(a) :].float()


def _check_bias(d: Mapping[str, Any], what: str) -> tuple[list[str], dict[str, list[float]]]:
    if not isinstance(d, Mapping) or "blocks" not in d or "per_task" not in d:
        raise ConfigError(
            f"plot_bias: {what!r} must be a measure_bias() result with 'blocks' and 'per_task'"
        )
    names = list(d["blocks"])
    rows = {t: list(map(float, v)) for t, v in d["per_task"].items()}
    if not rows:
        raise ConfigError(f"plot_bias: {what!r} has no tasks")
    for t, v in rows.items():
        if len(v) != len(names):
            raise ConfigError(
                f"plot_bias: {what!r} task {t!r} has {len(v)} values for {len(names)} blocks"
            )
    return names, rows


def _short(name: str) -> str:
    """'transformer.resblocks.3' -> '3' (block index); 'final' stays."""
    return name.rsplit(".", 1)[-1]


def _colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Render with Agg (matplotlib.figure.Figure never touches pyplot's global backend) and
    write atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)
