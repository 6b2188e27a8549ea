"""Statistics surgery: the variance-collapse correction of "Non-local merging" (Sharma, Roy,
Dziugaite, arXiv 2410.12766, code name TACT). Training-free.

At every chosen site of every block of the merged model, per task t and channel c,

    x̂ = (x − μ_merged,t) / σ_merged,t · σ_expert,t + μ_expert,t

with the moments taken over all tokens of ``num_samples`` unlabeled images of task t's test
split: the expert's from expert t, the merged model's measured with the corrections of all
earlier sites already applied. Default sites: the paper's four per block — attention output,
after the second LayerNorm, MLP hidden before the activation, block output.

The mechanism (sites, hooks, sequential calibration, file) lives in
:mod:`mergelab.surgery.correction`; a kind only says which tasks share one set of statistics
(:meth:`StatsSurgery.groups`): here every task has its own. :mod:`mergelab.surgery.repair`
shares one set across tasks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from mergelab import validate
from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.base import Surgery
from mergelab.surgery.correction.calibrate import (
    GroupData,
    calibrate,
    expert_statistics,
    replayable,
)
from mergelab.surgery.correction.io import load_stats, save_stats
from mergelab.surgery.correction.model import CorrectedModel
from mergelab.surgery.correction.sites import PAPER_SITES, check_kinds, discover_sites, trace_sites
from mergelab.surgery.unlabeled import unlabeled_indices, unlabeled_loader  # noqa: F401 (re-export)


class StatsSurgery(Surgery):
    """Per task and per channel, rescale and shift the merged model's activations at
    ``sites`` so their mean and std match the task's expert on that task's unlabeled data
    (Non-local merging / TACT, arXiv 2410.12766, the x̂ equation above). Training-free.

    Args:
        sites: site kinds corrected in every block, from ``attn``, ``ln2``, ``mlp_hidden``,
            ``block`` (default: all four, the paper's).
        num_samples: unlabeled images per task to measure on (None = the whole test split).
        batch_size: images per forward pass while measuring.
        eps: added to the variances before the square root (guards dead channels).
        seed: draws each task's ``num_samples`` images.
        save_stats: write the statistics to ``ctx.out_dir / stats_file`` (safetensors).
        stats_file: file name for the statistics.
        replay: cache each batch's block inputs and re-run one block at a time (O(depth)
            block calls) instead of one forward pass per site (O(depth²)); identical
            statistics. Used only when the merged encoder's blocks form a plain chain.
        load_from: a statistics file written by a previous run of this kind to use instead
            of measuring (its tasks and sites must match this model and ``sites``).
    """

    name = "stats"
    paper = "arXiv 2410.12766"

    def __init__(
        self,
        sites: Sequence[str] = PAPER_SITES,
        num_samples: int | None = 1024,
        batch_size: int = 128,
        eps: float = 1e-5,
        seed: int = 0,
        save_stats: bool = True,
        stats_file: str = "stats_surgery.safetensors",
        replay: bool = True,
        load_from: str | None = None,
    ):
        self.sites = check_kinds(sites)
        self.num_samples = validate.integer("surgery.num_samples", num_samples, optional=True)
        self.batch_size = validate.integer("surgery.batch_size", batch_size)
        self.eps = validate.number("surgery.eps", eps, gt=0)  # guards division by a zero std
        self.seed = validate.integer("surgery.seed", seed, minimum=None)
        self.save_stats = bool(save_stats)
        self.stats_file = str(stats_file)
        self.replay = bool(replay)
        self.load_from = None if load_from in (None, "") else str(load_from)
        if self.load_from is not None and not Path(self.load_from).is_file():
            raise CheckpointError(
                f"{self.name} surgery load_from: file not found: {self.load_from}"
            )

    def groups(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        """Statistics group -> its tasks: the merged statistics are measured on the pooled
        unlabeled data of the group's tasks, the target is the mean of their experts' statistics
        on that same data. Non-local merging: one group per task (expert t on task t's data)."""
        return {t: [t] for t in tasks}

    def apply(self, model: MultiTaskModel, pool: ModelPool, ctx: RunContext) -> CorrectedModel:
        """Measure every group's expert and (sequentially corrected) merged statistics and
        return the corrected model. ``model`` is shared, not copied; its behaviour outside the
        returned model's ``features`` is unchanged."""
        groups = self.groups(model.tasks)
        group_of = {t: g for g, members in groups.items() for t in members}
        if self.load_from is not None:
            out = load_stats(model, self.load_from, self.sites, self.name, group_of, pool.backbone)
            return out.to(_param_device(model))
        for t in model.tasks:
            if t not in pool.test_sets or t not in pool.experts:
                raise ConfigError(
                    f"{self.name} surgery: task {t!r} has no expert or test split in the pool "
                    f"(pool tasks: {list(pool.tasks)})"
                )
            if len(pool.test_sets[t]) == 0:
                raise ConfigError(f"{self.name} surgery: the test split of task {t!r} is empty")
        parts = {
            t: (
                pool.test_sets[t],
                unlabeled_indices(len(pool.test_sets[t]), self.num_samples, self.seed),
            )
            for t in model.tasks
        }
        with _measuring(model), torch.no_grad():
            # Structure probes on one batch where the model is (which sites run, in which
            # order, at which width; whether blocks form a chain), not measuring passes.
            task0 = model.tasks[0]
            ds0, idx0 = parts[task0]
            probe = torch.stack([_image(ds0[int(i)]) for i in idx0[: self.batch_size]])
            probe = probe.to(_param_device(model))
            sites, channels = trace_sites(
                model.encoder,
                discover_sites(model.encoder, self.sites),
                partial(model.features, probe, task0),
            )
            out = CorrectedModel(model, sites, channels, self.eps, group_of)
            replay = self.replay and replayable(out, probe, task0)
            for group, members in groups.items():
                data = GroupData({t: parts[t] for t in members}, self.batch_size, ctx.num_workers)
                experts = [partial(pool.expert_encoder, t) for t in members]
                targets = expert_statistics(experts, sites, channels, data, ctx.engine, self.eps)
                calibrate(out, group, data, targets, ctx.engine, replay)
        out.to(_param_device(model))
        out.training = model.training  # the shared modules keep their own modes
        out.corrections.train(model.training)
        if self.save_stats and ctx.is_global_zero:
            save_stats(
                out,
                Path(ctx.out_dir) / self.stats_file,
                method=self.name,
                backbone=pool.backbone,
                paper=self.paper,
                num_samples=self.num_samples,
                seed=self.seed,
            )
        return out


@contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block; afterwards (even after an error) back on its
    device (the engine's passes move it) with every submodule in the mode it had."""
    modes = {m: m.training for m in model.modules()}
    home = _param_device(model)
    model.eval()
    try:
        yield
    finally:
        model.to(home)
        for m, mode in modes.items():
            m.training = mode


def _image(item) -> torch.Tensor:
    return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
