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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mergelab.errors import ConfigError
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.blocks import block_tensor, discover_blocks
from mergelab.surgery.correction.model import CorrectedModel
from mergelab.surgery.correction.sites import Site

# The data of one statistics group: (task, loader of that task's unlabeled images) pairs. The
# task says how the merged model routes the batch; moments pool over every part.
Parts = Sequence[tuple[str, DataLoader]]


class Moments:
    """Running per-channel mean and std over every leading dim (tokens and images), in float64
    so that sums over ~10^7 activations stay exact enough for a tight match."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s, ss = x.sum(0), (x * x).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.n += x.shape[0]

    def finish(self, eps: float) -> tuple[Tensor, Tensor]:
        """(mean, √(population variance + eps)), float64."""
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean * mean).clamp_min(0.0)
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
    parts: Parts,
    device: torch.device,
    eps: float,
) -> list[tuple[Tensor, Tensor]]:
    """Per site, the mean over ``experts`` (builders, so one expert is in memory at a time) of
    each expert's per-channel (μ, σ) on all of ``parts``' images: one pass per expert, every
    site at once (an expert is never corrected)."""
    total: list[tuple[Tensor, Tensor]] | None = None
    for build in experts:
        expert = build().to(device)
        moments = [Moments() for _ in sites]
        handles = [
            expert.get_submodule(s.name).register_forward_hook(_capture(m))
            for s, m in zip(sites, moments)
        ]
        try:
            for _, loader in parts:
                for x in loader:
                    expert(x.to(device))
        finally:
            for h in handles:
                h.remove()
        del expert
        stats = [m.finish(eps) for m in moments]
        total = stats if total is None else [(a + m, b + s) for (a, b), (m, s) in zip(total, stats)]
    return [(m / len(experts), s / len(experts)) for m, s in total]


@torch.no_grad()
def calibrate(
    model: CorrectedModel,
    group: str,
    parts: Parts,
    targets: Sequence[tuple[Tensor, Tensor]],
    device: torch.device,
    replay: bool,
) -> None:
    """Measure ``group``'s merged statistics site by site in forward order, each with the
    corrections of the earlier sites applied, and store them with the ``targets`` (one
    (μ, σ) pair per site). The group starts from the identity; site i and later stay the
    identity until site i is measured.

    ``replay`` (see :func:`replayable`): cache every batch's input to block 0 and re-run one
    block at a time, O(depth) block calls, instead of one forward pass per site, O(depth²).
    Same statistics."""
    strays = [t for t, _ in parts if model.group_of.get(t) != group]
    if strays:
        raise ConfigError(f"task(s) {strays} are not in statistics group {group!r}")
    model.reset_group(group)
    if replay:
        _by_replay(model, group, parts, targets, device)
    else:
        _by_forward(model, group, parts, targets, device)


def _store(model: CorrectedModel, group: str, i: int, merged, target) -> None:
    (mu, sd), (mu_e, sd_e) = merged, target
    model.set_stats(group, i, mu_merged=mu, sigma_merged=sd, mu_expert=mu_e, sigma_expert=sd_e)


def _by_forward(model: CorrectedModel, group: str, parts: Parts, targets, device) -> None:
    """One routed forward pass per site, stopped at the site."""
    for i, site in enumerate(model.sites):
        m = Moments()
        h = model.encoder.get_submodule(site.name).register_forward_hook(_capture(m, stop=True))
        try:
            for task, loader in parts:
                for x in loader:
                    _until_stop(model.features, x.to(device), task)
        finally:
            h.remove()
        _store(model, group, i, m.finish(model.eps), targets[i])


def _by_replay(model: CorrectedModel, group: str, parts: Parts, targets, device) -> None:
    """Per block, re-run only that block on its cached inputs, once per site of the block
    (stopped at the site). The next block's inputs are this block's corrected outputs: from
    the ``block`` site's pass when there is one (so block-only surgery calls each block
    once), else from one more fully corrected pass."""
    blocks = discover_blocks(model.encoder).modules
    inputs: list[tuple[str, tuple, dict]] = []  # (task, args, kwargs) of block 0, per batch
    for task, loader in parts:

        def grab(module, args, kwargs, task=task):
            inputs.append((task, args, kwargs))
            raise _Stop

        h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for x in loader:
                _until_stop(model.features, x.to(device), task)
        finally:
            h.remove()

    g = model.group_index(group)
    for b, block in enumerate(blocks):
        outputs: list[Tensor] | None = None
        for i, site in enumerate(model.sites):
            if site.block != b:
                continue
            m = Moments()
            keep: list[Tensor] | None = [] if site.kind == "block" else None
            h = model.encoder.get_submodule(site.name).register_forward_hook(
                _capture(m, stop=True, keep=keep)
            )
            try:
                for task, args, kwargs in inputs:
                    with model.route(task):
                        _until_stop(block, *args, **kwargs)
            finally:
                h.remove()
            _store(model, group, i, m.finish(model.eps), targets[i])
            if keep is not None:
                # the block's own output (its last site), corrected as its hook will at inference
                outputs = [model.corrections[i](y, g) for y in keep]
        if b + 1 < len(blocks):
            if outputs is None:
                outputs = []
                for task, args, kwargs in inputs:
                    with model.route(task):
                        outputs.append(block_tensor(block(*args, **kwargs)))
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
