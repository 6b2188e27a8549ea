"""The corrected model: per-channel affine corrections at chosen sites of a merged model,
applied by forward hooks for the statistics group of the task being routed.

At site s, for the group g of task t and every channel c (Non-local merging, arXiv
2410.12766; REPAIR, arXiv 2211.08403, with one group shared by every task):

    x̂ = (x − μ_merged,g) / σ_merged,g · σ_expert,g + μ_expert,g
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mergelab.errors import ConfigError
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.blocks import block_tensor, with_block_tensor
from mergelab.surgery.correction.sites import Site

STATS = ("mu_merged", "sigma_merged", "mu_expert", "sigma_expert")


class SiteCorrection(nn.Module):
    """The statistics of one site, one row per group: buffers of shape (groups, channels).
    A row at μ = 0, σ = 1 on both sides is the identity (an uncalibrated group changes
    nothing)."""

    def __init__(self, n_groups: int, channels: int):
        super().__init__()
        for s in STATS:
            init = torch.ones if s.startswith("sigma") else torch.zeros
            self.register_buffer(s, init(n_groups, channels))

    def forward(self, x: Tensor, group: int) -> Tensor:
        scale = self.sigma_expert[group] / self.sigma_merged[group]
        shift = self.mu_expert[group] - self.mu_merged[group] * scale
        return (x * scale + shift).to(x.dtype)

    def reset(self, group: int) -> None:
        """Back to the identity for ``group``."""
        for s in STATS:
            getattr(self, s)[group].fill_(1.0 if s.startswith("sigma") else 0.0)


class _ApplyHook:
    """Forward hook on one site: corrects the output for the group being routed, if any.

    A plain object holding the model (not a closure) so deepcopy/pickle of the model carry it.
    """

    def __init__(self, model: CorrectedModel, index: int):
        self.model = model
        self.index = index

    def __call__(self, module: nn.Module, args, output):
        group = self.model._active
        if group is None:
            return None  # dormant outside CorrectedModel.route: the encoder is unchanged
        x = block_tensor(output)
        return with_block_tensor(output, self.model.corrections[self.index](x, group))


class CorrectedModel(MultiTaskModel):
    """A merged multi-task model whose ``sites`` are affinely corrected with the statistics of
    task t's group whenever ``features(x, t)`` runs (the x̂ equation above).

    The batch goes through ``merged.features(x, t)``, so a task-conditional merged model keeps
    routing its own per-task weights; the corrections ride on hooks registered once, here, on
    the shared encoder's site modules. They act only while :meth:`route` has set a task, so
    the merged model given is unchanged outside this model, and hooks other code registers
    later on the same modules (e.g. the bias analysis) see the corrected output.

    Args:
        merged: the merged model (its encoder and heads are shared, not copied).
        sites: the corrected sites, in forward order.
        channels: each site's channel count.
        eps: added to the variances before the square root when statistics are measured.
        group_of: task -> name of its statistics group (default: one group per task).
    """

    def __init__(
        self,
        merged: MultiTaskModel,
        sites: Sequence[Site],
        channels: Sequence[int],
        eps: float,
        group_of: Mapping[str, str] | None = None,
    ):
        super().__init__(merged.encoder, merged.heads)
        if len(sites) != len(channels):
            raise ConfigError(f"{len(sites)} sites but {len(channels)} channel counts")
        self.merged = merged
        self.group_of = {t: t for t in self.tasks} if group_of is None else dict(group_of)
        missing = [t for t in self.tasks if t not in self.group_of]
        if missing:
            raise ConfigError(f"no statistics group for task(s) {missing}")
        self.groups = list(dict.fromkeys(self.group_of[t] for t in self.tasks))
        self.sites = list(sites)
        self.eps = float(eps)
        self.corrections = nn.ModuleList(SiteCorrection(len(self.groups), c) for c in channels)
        self._active: int | None = None
        self._handles = [
            self.encoder.get_submodule(s.name).register_forward_hook(_ApplyHook(self, i))
            for i, s in enumerate(self.sites)
        ]

    def group_index(self, group: str) -> int:
        try:
            return self.groups.index(group)
        except ValueError:
            raise ConfigError(
                f"unknown statistics group {group!r}; this model has {self.groups}"
            ) from None

    def _task_group(self, task: str) -> int:
        if task not in self.group_of:
            raise ConfigError(f"unknown task {task!r}; this model has {self.tasks}")
        return self.groups.index(self.group_of[task])

    @contextmanager
    def route(self, task: str) -> Iterator[None]:
        """Within the block, encoder forwards are ``task``'s: the encoder holds the task's
        weights (a task-conditional merge, :meth:`MultiTaskModel.use_task`) and the sites
        apply the corrections of the task's group — so calibration may also run single
        blocks of the encoder for a task."""
        group = self._task_group(task)
        self.merged.use_task(task)
        prev, self._active = self._active, group
        try:
            yield
        finally:
            self._active = prev

    def features(self, x: Tensor, task: str) -> Tensor:
        with self.route(task):
            return self.merged.features(x, task)

    def set_stats(self, group: str, index: int, **stats: Tensor) -> None:
        """Store some of ``mu_merged, sigma_merged, mu_expert, sigma_expert`` of site
        ``index`` for ``group``."""
        g = self.group_index(group)
        for k, v in stats.items():
            if k not in STATS:
                raise ConfigError(f"unknown statistic {k!r}; expected one of {STATS}")
            getattr(self.corrections[index], k)[g].copy_(v)

    def reset_group(self, group: str) -> None:
        """Every site of ``group`` back to the identity."""
        g = self.group_index(group)
        for corr in self.corrections:
            corr.reset(g)

    def stats_state(self) -> dict[str, Tensor]:
        """All statistics as a flat ``{"<group>/<site name>/<stat>": (channels,)}`` dict."""
        out: dict[str, Tensor] = {}
        for gi, group in enumerate(self.groups):
            for site, corr in zip(self.sites, self.corrections):
                for s in STATS:
                    out[f"{group}/{site.name}/{s}"] = getattr(corr, s)[gi].detach().cpu().clone()
        return out

    def remove_hooks(self) -> None:
        """Detach the correction hooks from the encoder (the model then behaves as merged)."""
        for h in self._handles:
            h.remove()
        self._handles = []
