"""Training-free statistics surgery: per-task, per-channel correction of variance collapse.

Implements the correction of "Non-local merging" (arXiv 2410.12766, code name TACT): at each
chosen site of the merged model, for task t and channel c,

    x̂ = (x − μ_merged,t) / σ_merged,t · σ_expert,t + μ_expert,t

with the moments taken over all tokens and images of task t's unlabeled test split
(σ = √(population variance + eps) on both sides, so a dead channel is left alone). Expert
moments come from the expert; merged moments are measured on the merged model with the
corrections of all EARLIER sites already applied, so each site sees the distribution the
corrected model will actually feed it. No training. REPAIR (Jordan et al., 2023) is the
single shared-statistics version for two models.

Sites (per residual block, discovered from the block, never hard-coded):

- ``block``       the block's output (the residual stream; the default),
- ``attn``        the attention module's output (before the residual add),
- ``ln2``         the output of the second LayerNorm (the MLP's input),
- ``mlp_hidden``  the MLP hidden layer before the activation.

Depth and widths are read from the model. Sites are calibrated in the order the forward pass
visits them (found by tracing one batch), which is what "earlier" means above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.pool.state import save_state_dict
from mergelab.surgery.base import Surgery
from mergelab.surgery.blocks import block_tensor, discover_blocks, with_block_tensor

# Site kind -> attribute paths tried inside one block, first match wins. "" is the block
# itself. open_clip ResidualAttentionBlock, Hugging Face CLIPEncoderLayer, timm Block.
SITE_PATHS: dict[str, tuple[str, ...]] = {
    "attn": ("attn", "self_attn"),
    "ln2": ("ln_2", "layer_norm2", "norm2"),
    "mlp_hidden": ("mlp.c_fc", "mlp.fc1"),
    "block": ("",),
}

_STATS = ("mu_merged", "sigma_merged", "mu_expert", "sigma_expert")


@dataclass(frozen=True)
class Site:
    """One corrected location: its kind, the block it lives in, and its module name."""

    kind: str
    block: int
    name: str  # qualified module name inside the encoder, e.g. "transformer.resblocks.2.ln_2"


def discover_sites(encoder: nn.Module, kinds: Sequence[str]) -> list[Site]:
    """The sites of ``kinds`` in every block of ``encoder`` (block by block, static order).

    Unknown kinds, or a kind whose submodule a block does not have, are a ConfigError.
    """
    kinds = _check_kinds(kinds)
    blocks = discover_blocks(encoder)
    sites: list[Site] = []
    for b, (block, block_name) in enumerate(zip(blocks.modules, blocks.names)):
        for kind in kinds:
            path = _find_path(block, kind)
            name = f"{block_name}.{path}" if path else block_name
            sites.append(Site(kind, b, name))
    return sites


def _check_kinds(kinds: Sequence[str] | str) -> list[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(kinds)
    valid = ", ".join(sorted(SITE_PATHS))
    if not kinds:
        raise ConfigError(f"stats surgery needs at least one site; valid sites: {valid}")
    for k in kinds:
        if k not in SITE_PATHS:
            raise ConfigError(f"unknown stats surgery site {k!r}; valid sites: {valid}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"stats surgery sites must not repeat, got {kinds}")
    return kinds


def _find_path(block: nn.Module, kind: str) -> str:
    for path in SITE_PATHS[kind]:
        if path == "":
            return path
        try:
            block.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise ConfigError(
        f"site {kind!r}: block {type(block).__name__} has none of the submodules "
        f"{', '.join(SITE_PATHS[kind])}"
    )


def unlabeled_loader(
    dataset: Dataset, num_samples: int | None, batch_size: int, seed: int, num_workers: int = 0
) -> DataLoader:
    """A fixed, ordered loader over ``num_samples`` images of ``dataset`` (all if None or more
    than there are), drawn with ``seed`` so that every pass sees the same images in the same
    order. Labels are dropped: adaptation data is unlabeled."""
    n = len(dataset)
    if num_samples is not None and num_samples < n:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:num_samples].sort().values.tolist()
        dataset = Subset(dataset, idx)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_images
    )


def _images(items: list) -> Tensor:
    first = items[0]
    if isinstance(first, (tuple, list)):
        return torch.stack([it[0] for it in items])
    return torch.stack(list(items))


class _Moments:
    """Running per-channel mean and std over every leading dim (tokens and images), in
    float64 so that sums over ~10^7 activations stay exact enough for a tight match."""

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
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean * mean).clamp_min(0.0)
        return mean.float(), (var + eps).sqrt().float()


class _SiteCorrection(nn.Module):
    """Per-task moments of one site, shape (tasks, channels). Initialised to the identity
    (μ = 0, σ = 1 on both sides) so an uncalibrated site leaves its input untouched."""

    def __init__(self, n_tasks: int, channels: int):
        super().__init__()
        for s in _STATS:
            init = torch.ones if s.startswith("sigma") else torch.zeros
            self.register_buffer(s, init(n_tasks, channels))

    def forward(self, x: Tensor, task: int) -> Tensor:
        scale = self.sigma_expert[task] / self.sigma_merged[task]
        shift = self.mu_expert[task] - self.mu_merged[task] * scale
        return (x * scale + shift).to(x.dtype)


class _ApplyHook:
    """Forward hook on one site: corrects the output for the model's active task, if any.

    A plain object holding the model (not a closure) so deepcopy/pickle of the model carry it.
    """

    def __init__(self, model: StatsSurgeryModel, index: int):
        self.model = model
        self.index = index

    def __call__(self, module: nn.Module, args, output):
        task = self.model._active
        if task is None:
            return None  # dormant outside StatsSurgeryModel.features: the encoder is unchanged
        x = block_tensor(output)
        return with_block_tensor(output, self.model.corrections[self.index](x, task))


class StatsSurgeryModel(MultiTaskModel):
    """A merged encoder whose sites are affinely corrected with task t's statistics whenever
    ``features(x, t)`` runs (Non-local merging, arXiv 2410.12766, the x̂ equation above).

    The correction hooks are registered once, here, on the encoder's site modules, and act
    only while :meth:`features` (or :meth:`route`) has set a task, so hooks that other code
    registers later on the same modules (e.g. :func:`mergelab.surgery.bias.measure_bias`)
    see the corrected output.
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads,
        sites: Sequence[Site],
        channels: Sequence[int],
        eps: float,
    ):
        super().__init__(encoder, heads)
        if len(sites) != len(channels):
            raise ConfigError(f"{len(sites)} sites but {len(channels)} channel counts")
        self.sites = list(sites)
        self.eps = eps
        self.corrections = nn.ModuleList(_SiteCorrection(len(self.tasks), c) for c in channels)
        self._active: int | None = None
        self._handles = [
            encoder.get_submodule(s.name).register_forward_hook(_ApplyHook(self, i))
            for i, s in enumerate(self.sites)
        ]

    def task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ConfigError(f"unknown task {task!r}; this model has {self.tasks}") from None

    @contextmanager
    def route(self, task: str) -> Iterator[None]:
        """Within the block, encoder forwards apply ``task``'s corrections."""
        prev, self._active = self._active, self.task_index(task)
        try:
            yield
        finally:
            self._active = prev

    def features(self, x: Tensor, task: str) -> Tensor:
        with self.route(task):
            return self.encoder(x)

    def set_stats(self, task: str, index: int, **stats: Tensor) -> None:
        """Store some of ``mu_merged, sigma_merged, mu_expert, sigma_expert`` for one site."""
        t = self.task_index(task)
        for k, v in stats.items():
            if k not in _STATS:
                raise ConfigError(f"unknown statistic {k!r}; expected one of {_STATS}")
            getattr(self.corrections[index], k)[t].copy_(v)

    def stats_state(self) -> dict[str, Tensor]:
        """All statistics as a flat ``{"<task>/<site name>/<stat>": (channels,)}`` dict."""
        out: dict[str, Tensor] = {}
        for ti, task in enumerate(self.tasks):
            for site, corr in zip(self.sites, self.corrections):
                for s in _STATS:
                    out[f"{task}/{site.name}/{s}"] = getattr(corr, s)[ti].detach().cpu().clone()
        return out

    def remove_hooks(self) -> None:
        """Detach the correction hooks from the encoder (the model then behaves as merged)."""
        for h in self._handles:
            h.remove()
        self._handles = []


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the site of interest is measured."""


class StatsSurgery(Surgery):
    """Statistics surgery (Non-local merging / TACT, arXiv 2410.12766): per task and per
    channel, rescale and shift the merged model's activations at ``sites`` so their mean and
    std match the task's expert on that task's unlabeled data. Training-free.

    Args:
        sites: site kinds to correct in every block, from ``attn``, ``ln2``, ``mlp_hidden``,
            ``block``.
        num_samples: images of each task's test split to measure on (None = all).
        batch_size: images per forward pass while measuring.
        eps: added to the variances before the square root (guards dead channels).
        save_stats: write the statistics to ``ctx.out_dir / stats_file`` (safetensors).
        stats_file: file name for the statistics.
        replay: cache each batch's block inputs and re-run one block at a time (O(depth)
            block calls) instead of one forward pass per site (O(depth²)); identical
            statistics. Used only when the blocks form a plain chain (checked on one batch).
        load_from: a statistics file written by a previous run to use instead of measuring
            (its tasks and sites must match this model and ``sites``).
    """

    name = "stats"

    def __init__(
        self,
        sites: Sequence[str] = ("block",),
        num_samples: int | None = 1024,
        batch_size: int = 128,
        eps: float = 1e-5,
        save_stats: bool = True,
        stats_file: str = "stats_surgery.safetensors",
        replay: bool = True,
        load_from: str | None = None,
    ):
        self.sites = _check_kinds(sites)
        if num_samples is not None and int(num_samples) < 1:
            raise ConfigError(f"num_samples must be a positive integer or null, got {num_samples}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
        if not float(eps) > 0:
            raise ConfigError(f"eps must be > 0 (it guards division by a zero std), got {eps}")
        self.num_samples = None if num_samples is None else int(num_samples)
        self.batch_size = int(batch_size)
        self.eps = float(eps)
        self.save_stats = bool(save_stats)
        self.stats_file = str(stats_file)
        self.replay = bool(replay)
        self.load_from = None if load_from in (None, "") else str(load_from)
        if self.load_from is not None and not Path(self.load_from).is_file():
            raise CheckpointError(f"stats surgery load_from: file not found: {self.load_from}")

    def apply(self, model: MultiTaskModel, pool: ModelPool, ctx: RunContext) -> StatsSurgeryModel:
        """Measure expert and (sequentially corrected) merged moments for every task of
        ``model`` and return the corrected model. ``model.encoder`` is shared, not copied; its
        behaviour outside the returned model's ``features`` is unchanged."""
        if self.load_from is not None:
            return load_stats(model, self.load_from, self.sites, self.eps, pool.backbone)
        tasks = model.tasks
        for t in tasks:
            if t not in pool.test_sets or t not in pool.experts:
                raise ConfigError(
                    f"stats surgery: task {t!r} has no expert or test split in the pool "
                    f"(pool tasks: {list(pool.tasks)})"
                )
            if len(pool.test_sets[t]) == 0:
                raise ConfigError(f"stats surgery: the test split of task {t!r} is empty")
        loaders = {
            t: unlabeled_loader(
                pool.test_sets[t], self.num_samples, self.batch_size, ctx.seed, ctx.num_workers
            )
            for t in tasks
        }
        home = _param_device(model)
        device = ctx.device
        encoder = model.encoder
        was_training = encoder.training
        encoder.eval().to(device)
        try:
            with torch.no_grad():
                probe = next(iter(loaders[tasks[0]])).to(device)
                sites, channels = _trace(encoder, discover_sites(encoder, self.sites), probe)
                replay = self.replay and _replayable(encoder, sites, probe)
                out = StatsSurgeryModel(encoder, model.heads, sites, channels, self.eps).to(device)
                for t in tasks:
                    self._calibrate(out, pool, t, loaders[t], device, replay)
        finally:
            model.to(home)  # encoder and heads go back even if measuring failed
            encoder.train(was_training)
        out.to(home).train(model.training)
        out.encoder.train(was_training)
        if self.save_stats:
            self._save(out, Path(ctx.out_dir) / self.stats_file, pool.backbone)
        return out

    def _calibrate(
        self,
        out: StatsSurgeryModel,
        pool: ModelPool,
        task: str,
        loader: DataLoader,
        device: torch.device,
        replay: bool,
    ) -> None:
        names = [s.name for s in out.sites]
        # Expert moments: one pass, all sites at once (the expert is never corrected).
        expert = pool.expert_encoder(task).to(device)
        moments = [_Moments() for _ in names]
        handles = [
            expert.get_submodule(n).register_forward_hook(_capture(m))
            for n, m in zip(names, moments)
        ]
        try:
            for x in loader:
                expert(x.to(device))
        finally:
            for h in handles:
                h.remove()
        del expert
        expert_stats = [m.finish(self.eps) for m in moments]
        # Merged moments, site by site in forward order, with the earlier sites already
        # corrected; site i and later are still the identity (their statistics, expert ones
        # included, are stored only once site i is measured).
        if replay:
            self._merged_by_replay(out, task, loader, device, expert_stats)
        else:
            self._merged_by_forward(out, task, loader, device, expert_stats)

    def _merged_by_forward(self, out, task, loader, device, expert_stats) -> None:
        """One encoder pass per site, stopped at the site: O(depth²) block calls."""
        for i, site in enumerate(out.sites):
            m = _Moments()
            h = out.encoder.get_submodule(site.name).register_forward_hook(_capture(m, stop=True))
            try:
                with out.route(task):
                    for x in loader:
                        _until_stop(out.encoder, x.to(device))
            finally:
                h.remove()
            _store(out, task, i, m.finish(self.eps), expert_stats[i])

    def _merged_by_replay(self, out, task, loader, device, expert_stats) -> None:
        """Same statistics in O(depth) block calls: cache every batch's input to block 0, then
        per block re-run only that block on the cached inputs, once per site (stopped at the
        site). The next block's inputs are this block's corrected outputs: from the ``block``
        site's pass when there is one (so block-only surgery calls each block once), else
        from one more fully corrected pass."""
        blocks = discover_blocks(out.encoder).modules
        inputs: list[tuple[tuple, dict]] = []

        def grab(module, args, kwargs):
            inputs.append((args, kwargs))
            raise _Stop

        h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for x in loader:
                _until_stop(out.encoder, x.to(device))
        finally:
            h.remove()
        t = out.task_index(task)
        with out.route(task):
            for b, block in enumerate(blocks):
                outputs: list[Tensor] | None = None
                for i, site in enumerate(out.sites):
                    if site.block != b:
                        continue
                    m = _Moments()
                    keep: list[Tensor] | None = [] if site.kind == "block" else None
                    h = out.encoder.get_submodule(site.name).register_forward_hook(
                        _capture(m, stop=True, keep=keep)
                    )
                    try:
                        for args, kwargs in inputs:
                            _until_stop(block, *args, **kwargs)
                    finally:
                        h.remove()
                    _store(out, task, i, m.finish(self.eps), expert_stats[i])
                    if keep is not None:
                        # the block's own output (last site of the block), corrected exactly
                        # as its hook will correct it at inference
                        outputs = [out.corrections[i](y, t) for y in keep]
                if b + 1 < len(blocks):
                    if outputs is None:
                        outputs = [block_tensor(block(*a, **kw)) for a, kw in inputs]
                    inputs = [((y, *a[1:]), kw) for y, (a, kw) in zip(outputs, inputs)]

    def _save(self, out: StatsSurgeryModel, path: Path, backbone: str) -> None:
        if _process_rank() != 0:
            return  # every rank computes the same statistics; one writes them
        meta = {
            "method": "stats",
            "paper": "arXiv 2410.12766",
            "backbone": str(backbone),
            "tasks": json.dumps(out.tasks),
            "sites": json.dumps([[s.kind, s.block, s.name] for s in out.sites]),
            "num_samples": json.dumps(self.num_samples),
            "eps": repr(self.eps),
        }
        save_state_dict(out.stats_state(), path, metadata=meta)


def load_stats(
    model: MultiTaskModel,
    path: str | os.PathLike,
    kinds: Sequence[str],
    eps: float,
    backbone: str | None = None,
) -> StatsSurgeryModel:
    """A :class:`StatsSurgeryModel` on ``model`` with statistics read from a file written by
    :class:`StatsSurgery` (no measuring). Its sites must be exactly the ``kinds`` sites of
    this encoder, it must hold every task of ``model`` and, when ``backbone`` is given, have
    been measured on that backbone; otherwise a CheckpointError."""
    from safetensors import safe_open

    want = {s.name: s for s in discover_sites(model.encoder, kinds)}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        try:
            saved = [Site(k, int(b), n) for k, b, n in json.loads(meta["sites"])]
        except (KeyError, ValueError, TypeError):
            raise CheckpointError(
                f"{path}: not a stats surgery file (no 'sites' metadata)"
            ) from None
        if backbone is not None and meta.get("backbone", backbone) != backbone:
            raise CheckpointError(
                f"{path}: statistics were measured on backbone {meta['backbone']!r}, "
                f"this run uses {backbone!r}"
            )
        if {s.name for s in saved} != set(want):
            raise CheckpointError(
                f"{path}: saved sites {[s.name for s in saved]} do not match the {list(kinds)} "
                f"sites of this encoder {sorted(want)}"
            )
        keys = set(f.keys())
        missing = [
            f"{t}/{s.name}/{st}" for t in model.tasks for s in saved for st in _STATS
            if f"{t}/{s.name}/{st}" not in keys
        ]  # fmt: skip
        if missing:
            raise CheckpointError(f"{path}: missing statistic {missing[0]!r}")
        channels = [
            f.get_slice(f"{model.tasks[0]}/{s.name}/mu_expert").get_shape()[-1] for s in saved
        ]
        out = StatsSurgeryModel(model.encoder, model.heads, saved, channels, eps)
        out.to(_param_device(model))
        for t in model.tasks:
            for i, s in enumerate(saved):
                stats = {st: f.get_tensor(f"{t}/{s.name}/{st}") for st in _STATS}
                if any(v.shape != (channels[i],) for v in stats.values()):
                    raise CheckpointError(f"{path}: task {t!r} site {s.name!r} has a wrong shape")
                out.set_stats(t, i, **stats)
    return out


def _store(out: StatsSurgeryModel, task: str, i: int, merged, expert) -> None:
    (mu, sd), (mu_e, sd_e) = merged, expert
    out.set_stats(task, i, mu_merged=mu, sigma_merged=sd, mu_expert=mu_e, sigma_expert=sd_e)


def _until_stop(module: nn.Module, *args, **kwargs) -> None:
    try:
        module(*args, **kwargs)
    except _Stop:
        pass


def _capture(moments: _Moments, stop: bool = False, keep: list[Tensor] | None = None):
    def hook(module: nn.Module, args, output):
        moments.update(block_tensor(output))
        if keep is not None:
            keep.append(block_tensor(output))
        if stop:
            raise _Stop

    return hook


def _trace(encoder: nn.Module, sites: list[Site], x: Tensor) -> tuple[list[Site], list[int]]:
    """Order ``sites`` as one forward pass visits them and read each site's channel count."""
    seen: dict[int, tuple[int, int]] = {}  # site index -> (call order, channels)

    def recorder(i: int):
        def hook(module, args, output):
            if i not in seen:
                seen[i] = (len(seen), int(block_tensor(output).shape[-1]))

        return hook

    handles = [
        encoder.get_submodule(s.name).register_forward_hook(recorder(i))
        for i, s in enumerate(sites)
    ]
    try:
        encoder(x)
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for i, s in enumerate(sites) if i not in seen]
    if missing:
        raise ConfigError(
            f"stats surgery: site module(s) never called in a forward pass: {missing}"
        )
    order = sorted(range(len(sites)), key=lambda i: seen[i][0])
    return [sites[i] for i in order], [seen[i][1] for i in order]


def _replayable(encoder: nn.Module, sites: list[Site], x: Tensor) -> bool:
    """Whether the encoder's blocks form a plain chain that can be re-run one block at a time:
    each block called once, its first argument the previous block's output, re-running a
    block on its recorded arguments reproducing its output, and the sites visited block by
    block. Otherwise calibration falls back to full forward passes (same result, slower)."""
    blocks = discover_blocks(encoder).modules
    calls: list[list] = [[] for _ in blocks]
    handles = []
    for b, block in enumerate(blocks):

        def record(module, args, kwargs, output, b=b):
            calls[b].append((args, kwargs, output))

        handles.append(block.register_forward_hook(record, with_kwargs=True))
    try:
        encoder(x)
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
    order = [s.block for s in sites]
    return order == sorted(order)


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _process_rank() -> int:
    # Lightning reads RANK / LOCAL_RANK / SLURM_PROCID / JSM_NAMESPACE_RANK for us.
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)
