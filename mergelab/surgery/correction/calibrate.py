"""Measuring the correction statistics (no training).

- Target ("expert") statistics of a group: per site, the mean over the group's experts of each
  expert's per-channel (μ, σ) on the group's data. One expert on its own task's data for
  Non-local merging (arXiv 2410.12766); every expert on the pooled data of all tasks for
  REPAIR (arXiv 2211.08403, whose target for an interpolation is the same interpolation of the
  endpoints' μ and σ).
- Merged statistics: measured on the corrected model, site by site in forward order, with the
  corrections of all EARLIER sites already applied, so each site is calibrated on the
  distribution the corrected model will actually feed it.

Moments are taken over every leading dim (all tokens of all images), σ = √(population
variance + eps) on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mergelab.engine import Engine, TaskBatches
from mergelab.errors import ConfigError
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.blocks import block_tensor, discover_blocks
from mergelab.surgery.correction.model import CorrectedModel
from mergelab.surgery.correction.sites import Site


@dataclass
class GroupData:
    """The data of one statistics group: task → (test split, indices of its unlabeled images),
    read in ``batch_size`` batches. The task says how the merged model routes its batches;
    moments pool over every part."""

    parts: Mapping[str, tuple[Dataset, Tensor]]
    batch_size: int
    num_workers: int = 0

    def batches(self) -> TaskBatches:
        return TaskBatches(self.parts, self.batch_size)


class Moments:
    """Running per-channel mean and std over every leading dim (tokens and images), in float64
    so that sums over ~10^7 activations stay exact enough for a tight match. Under DDP each
    process sums its share; :meth:`finish` adds the shares up."""

    def __init__(self, channels: int) -> None:
        self.channels = int(channels)
        self.n = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s, ss = x.sum(0), (x * x).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.n += x.shape[0]

    def finish(self, eps: float, engine: Engine | None = None) -> tuple[Tensor, Tensor]:
        """(mean, √(population variance + eps)), float64 on the CPU, over every process's
        share when ``engine`` runs several."""
        zero = torch.zeros(self.channels, dtype=torch.float64)
        local = torch.stack(
            [
                zero if self.sum is None else self.sum.cpu(),
                zero if self.sumsq is None else self.sumsq.cpu(),
                torch.full_like(zero, float(self.n)),
            ]
        )
        total = engine.sum(local) if engine is not None else local
        mean = total[0] / total[2]
        var = (total[1] / total[2] - mean * mean).clamp_min(0.0)
        return mean, (var + eps).sqrt()


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the site of interest is measured."""


def _until_stop(fn: Callable, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except _Stop:
        pass


def _capture(moments: Moments, stop: bool = False, keep: list[Tensor] | None = None):
    def hook(module: nn.Module, args, output):
        moments.update(block_tensor(output))
        if keep is not None:
            keep.append(block_tensor(output))
        if stop:
            raise _Stop

    return hook


@torch.no_grad()
def expert_statistics(
    experts: Sequence[Callable[[], nn.Module]],
    sites: Sequence[Site],
    channels: Sequence[int],
    data: GroupData,
    engine: Engine,
    eps: float,
) -> list[tuple[Tensor, Tensor]]:
    """Per site, the mean over ``experts`` (builders, so one expert is in memory at a time) of
    each expert's per-channel (μ, σ) on all of ``data``'s images: one measuring pass per
    expert, every site at once (an expert is never corrected)."""
    total: list[tuple[Tensor, Tensor]] | None = None
    for build in experts:
        expert = build()
        moments = [Moments(c) for c in channels]
        handles = [
            expert.get_submodule(s.name).register_forward_hook(_capture(m))
            for s, m in zip(sites, moments)
        ]
        try:
            engine.run(
                lambda batch, expert=expert: expert(batch["images"]),
                {"expert": expert},
                data.batches(),
                data.num_workers,
            )
        finally:
            for h in handles:
                h.remove()
        del expert
        stats = [m.finish(eps, engine) for m in moments]
        total = stats if total is None else [(a + m, b + s) for (a, b), (m, s) in zip(total, stats)]
    return [(m / len(experts), s / len(experts)) for m, s in total]


@torch.no_grad()
def calibrate(
    model: CorrectedModel,
    group: str,
    data: GroupData,
    targets: Sequence[tuple[Tensor, Tensor]],
    engine: Engine,
    replay: bool,
) -> None:
    """Measure ``group``'s merged statistics site by site in forward order, each with the
    corrections of the earlier sites applied, and store them with the ``targets`` (one
    (μ, σ) pair per site). The group starts from the identity; site i and later stay the
    identity until site i is measured. Every measurement is a pass of ``engine``.

    ``replay`` (see :func:`replayable`): cache every batch's input to block 0 and re-run one
    block at a time, O(depth) block calls, instead of one forward pass per site, O(depth²).
    Same statistics."""
    strays = [t for t in data.parts if model.group_of.get(t) != group]
    if strays:
        raise ConfigError(f"task(s) {strays} are not in statistics group {group!r}")
    model.reset_group(group)
    if replay:
        _by_replay(model, group, data, targets, engine)
    else:
        _by_forward(model, group, data, targets, engine)


def _store(model: CorrectedModel, group: str, i: int, merged, target) -> None:
    (mu, sd), (mu_e, sd_e) = merged, target
    model.set_stats(group, i, mu_merged=mu, sigma_merged=sd, mu_expert=mu_e, sigma_expert=sd_e)


def _by_forward(model: CorrectedModel, group: str, data: GroupData, targets, engine) -> None:
    """One routed forward pass per site, stopped at the site."""
    for i, site in enumerate(model.sites):
        m = Moments(targets[i][0].numel())
        h = model.encoder.get_submodule(site.name).register_forward_hook(_capture(m, stop=True))
        try:
            engine.run(
                lambda batch: _until_stop(model.features, batch["images"], batch["task"]),
                {"model": model},
                data.batches(),
                data.num_workers,
            )
        finally:
            h.remove()
        _store(model, group, i, m.finish(model.eps, engine), targets[i])


def _by_replay(model: CorrectedModel, group: str, data: GroupData, targets, engine) -> None:
    """Per block, re-run only that block on its cached inputs, once per site of the block
    (stopped at the site). The next block's inputs are this block's corrected outputs: from
    the ``block`` site's pass when there is one (so block-only surgery calls each block
    once), else from one more fully corrected pass. Each process replays the batches it
    measured (the passes over cached inputs are not sharded again)."""
    blocks = discover_blocks(model.encoder).modules
    inputs: list[tuple[str, tuple, dict]] = []  # (task, args, kwargs) of block 0, per batch
    task_now: list[str] = []

    def grab(module, args, kwargs):
        inputs.append((task_now[0], args, kwargs))
        raise _Stop

    def first(batch) -> None:
        task_now[:] = [batch["task"]]
        _until_stop(model.features, batch["images"], batch["task"])

    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        engine.run(first, {"model": model}, data.batches(), data.num_workers)
    finally:
        h.remove()

    g = model.group_index(group)
    for b, block in enumerate(blocks):
        outputs: list[Tensor] | None = None
        for i, site in enumerate(model.sites):
            if site.block != b:
                continue
            m = Moments(targets[i][0].numel())
            keep: list[Tensor] | None = [] if site.kind == "block" else None
            h = model.encoder.get_submodule(site.name).register_forward_hook(
                _capture(m, stop=True, keep=keep)
            )

            def rerun(item, block=block) -> None:
                task, args, kwargs = item
                with model.route(task):
                    _until_stop(block, *args, **kwargs)

            try:
                engine.run(rerun, {"model": model}, inputs, shard=False)
            finally:
                h.remove()
            _store(model, group, i, m.finish(model.eps, engine), targets[i])
            if keep is not None:
                # the block's own output (its last site), corrected as its hook will at inference
                outputs = [model.corrections[i](y, g) for y in keep]
        if b + 1 < len(blocks):
            if outputs is None:
                outputs = []

                def corrected(item, block=block, outputs=outputs) -> None:
                    task, args, kwargs = item
                    with model.route(task):
                        outputs.append(block_tensor(block(*args, **kwargs)))

                engine.run(corrected, {"model": model}, inputs, shard=False)
            inputs = [(t, (y, *a[1:]), kw) for y, (t, a, kw) in zip(outputs, inputs)]


@torch.no_grad()
def replayable(model: CorrectedModel, x: Tensor, task: str) -> bool:
    """Whether calibration may re-run the merged encoder one block at a time: the merged model
    computes features as the plain encoder pass of its task (:meth:`MultiTaskModel.features`;
    a subclass may do more inside ``features``, which re-running single blocks would bypass;
    per-task weights of a task-conditional merge are loaded by :meth:`CorrectedModel.route`),
    and on ``x`` its blocks form a plain chain — each called once, its first argument the
    previous block's output, re-running a block on its recorded arguments reproducing its
    output — and the sites are visited block by block. Otherwise calibration uses full forward
    passes (same result, slower)."""
    if type(model.merged).features is not MultiTaskModel.features:
        return False
    blocks = discover_blocks(model.encoder).modules
    calls: list[list] = [[] for _ in blocks]
    handles = []
    for b, block in enumerate(blocks):

        def record(module, args, kwargs, output, b=b):
            calls[b].append((args, kwargs, output))

        handles.append(block.register_forward_hook(record, with_kwargs=True))
    try:
        model.merged.features(x, task)
    finally:
        for h in handles:
            h.remove()
    if any(len(c) != 1 for c in calls):
        return False
    for b, ((args, _kwargs, _output),) in enumerate(calls):
        if not args or not isinstance(args[0], Tensor):
            return False
        if b > 0 and not torch.equal(args[0], block_tensor(calls[b - 1][0][2])):
            return False
    for b in (0, len(blocks) - 1):  # a block is a pure function of its arguments
        args, kwargs, output = calls[b][0]
        again = block_tensor(blocks[b](*args, **kwargs))
        if not torch.allclose(again, block_tensor(output), rtol=1e-5, atol=1e-6):
            return False
    order = [s.block for s in model.sites]
    return order == sorted(order)
