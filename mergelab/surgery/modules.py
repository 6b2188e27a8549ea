"""The Representation Surgery module and the multi-task model that routes through it.

- :class:`LowRankAdapter` is the surgery module of Yang et al., "Representation Surgery for
  Multi-Task Model Merging" (ICML 2024), Eq. (4): ``f' = f − up(ReLU(down(f)))``.
- :class:`SurgeryModel` holds the merged encoder (frozen), the frozen heads and one set of
  modules per task. SurgeryV2 (arXiv 2410.14389) places a module after every residual block
  through forward hooks (never a rewritten forward); v1 only on the final feature.
- :func:`expert_targets` runs an (expert) encoder and returns its final feature and its
  per-block token means, the alignment targets of both papers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mergelab.errors import ConfigError
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.blocks import (
    Blocks,
    block_tensor,
    block_token_means,
    discover_blocks,
    with_block_tensor,
)

# Kaiming-uniform slope of the down projection, as in the reference (= nn.Linear's default).
DOWN_INIT_A = math.sqrt(5)

FINAL_SITE = "final"


def block_site(index: int) -> str:
    """Module-dict key of the module after block ``index`` (dots are not allowed in keys)."""
    return f"block_{index}"


class LowRankAdapter(nn.Module):
    """Representation Surgery module (Yang et al., ICML 2024, Eq. 4).

    ``f' = f − up(ReLU(down(f)))`` with ``down: d→r`` and ``up: r→d``, no biases. ``down`` is
    Kaiming-uniform (a=√5) and ``up`` is zero, so an untrained module is exactly the identity.
    Acts on the last dim, so a 3-D token tensor is corrected per token (CLS included).
    """

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        if int(rank) < 1 or int(dim) < 1:
            raise ConfigError(
                f"surgery module needs dim >= 1 and rank >= 1, got dim={dim}, rank={rank}"
            )
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=DOWN_INIT_A, generator=generator)
            nn.init.zeros_(self.up.weight)

    def forward(self, f: Tensor) -> Tensor:
        return f - self.up(torch.relu(self.down(f)))


class SurgeryModel(MultiTaskModel):
    """A merged encoder + frozen heads + per-task surgery modules.

    ``adapters[task][site]`` is the task's module at ``site``: ``"final"`` (the encoder's
    output feature, v1) and, when ``block_sites`` is true, ``"block_<i>"`` after every
    residual block (SurgeryV2), at the width read from the model. ``features(x, task)``
    activates only ``task``'s hooks, so each batch goes through its own task's modules.

    The encoder and heads are shared with the model given (not copied) and frozen; hooks are
    inert unless this model is routing a batch, so the plain merged model is unaffected.

    After training, ``loss_history`` holds the per-step training loss, and in online mode
    ``online_accuracy`` / ``online_counts`` hold the adapt-then-predict accuracy and number of
    samples seen per task (empty otherwise).
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        rank: int,
        kind: str,
        block_sites: bool = False,
        seed: int = 0,
    ):
        super().__init__(encoder, heads)
        self.encoder.requires_grad_(False)
        self.rank = int(rank)
        self.kind = kind
        self.feature_dim = _feature_dim(encoder, self.heads)
        self.blocks: Blocks | None = discover_blocks(encoder) if block_sites else None
        for t in self.tasks:
            if "." in t or t == "":
                raise ConfigError(
                    f"task name {t!r} cannot hold surgery modules: it must be non-empty and contain no '.'"
                )

        # One generator for all inits: the same seed gives the same modules, whatever else
        # the run draws from the global RNG.
        g = torch.Generator().manual_seed(int(seed))
        adapters = {}
        for t in self.tasks:
            sites = {}
            if self.blocks is not None:
                for i in range(len(self.blocks)):
                    sites[block_site(i)] = LowRankAdapter(self.blocks.width, self.rank, g)
            sites[FINAL_SITE] = LowRankAdapter(self.feature_dim, self.rank, g)
            adapters[t] = nn.ModuleDict(sites)
        self.adapters = nn.ModuleDict(adapters)

        self._active: str | None = None
        self._record: list[Tensor] | None = None
        self._handles = []
        if self.blocks is not None:
            for i, block in enumerate(self.blocks.modules):
                self._handles.append(block.register_forward_hook(self._make_hook(i)))

        self.loss_history: list[float] = []
        self.online_accuracy: dict[str, float] = {}
        self.online_counts: dict[str, int] = {}

    # -- routing -------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        return list(self.blocks.names) if self.blocks is not None else []

    def _make_hook(self, index: int):
        site = block_site(index)

        def hook(module: nn.Module, args, output):
            task = self._active
            if task is None:  # not routing: the plain merged model
                return None
            h = block_tensor(output)
            if isinstance(task, str):
                z = self.adapters[task][site](h)
            else:  # a multi-task batch: consecutive segments, each through its task's module
                dim = 1 - self.blocks.token_dim  # the batch dim of the token tensor
                z = torch.cat(
                    [self.adapters[t][site](h.narrow(dim, a, b - a)) for t, a, b in task], dim=dim
                )
            if self._record is not None:
                self._record.append(z.mean(dim=self.blocks.token_dim))
            return with_block_tensor(output, z)

        return hook

    @contextmanager
    def route(self, task: str, record: bool = False) -> Iterator[list[Tensor]]:
        """Activate ``task``'s block modules; with ``record``, yield the list that receives the
        token mean of every corrected block output, in block order (SurgeryV2's loss)."""
        self._check_task(task)
        prev = (self._active, self._record)
        self._active = task
        # A nested route for the same task (features() inside a recording route) keeps
        # recording into the outer list.
        self._record = [] if record else (prev[1] if prev[0] == task else None)
        try:
            yield self._record if self._record is not None else []
        finally:
            self._active, self._record = prev

    @contextmanager
    def route_segments(self, segments: list[tuple[str, int, int]]) -> Iterator[list[Tensor]]:
        """Route one concatenated batch of several tasks: rows ``[a, b)`` belong to task ``t``
        for each ``(t, a, b)``. Yields the list receiving every corrected block's token mean
        (all rows), like ``route(..., record=True)``. Blocks treat samples independently, so
        this equals routing each task's rows on their own, in one encoder pass."""
        for t, _, _ in segments:
            self._check_task(t)
        if self.task_conditional and len({t for t, _, _ in segments}) > 1:
            raise ConfigError(
                "a task-conditional merge runs one task per encoder pass; route each task's "
                "rows separately"
            )
        prev = (self._active, self._record)
        self._active, self._record = list(segments), []
        try:
            yield self._record
        finally:
            self._active, self._record = prev

    def forward(self, x: Tensor, task: str) -> Tensor:
        self._check_task(task)
        return super().forward(x, task)

    def _check_task(self, task: str) -> None:
        if task not in self.adapters:
            raise ConfigError(f"unknown task {task!r} for surgery; expected one of {self.tasks}")

    def features(self, x: Tensor, task: str) -> Tensor:
        with self.route(task):
            f = self.encode(x, task)
        return self.adapters[task][FINAL_SITE](f)

    def surgery_parameters(self) -> list[nn.Parameter]:
        """The only trainable parameters: every task's surgery modules."""
        return list(self.adapters.parameters())

    def train(self, mode: bool = True) -> SurgeryModel:
        # The merged backbone and heads are fixed: keep them in eval mode even while the
        # modules train (Lightning calls .train() on the whole module).
        super().train(mode)
        self.encoder.eval()
        self.heads.eval()
        return self


def _feature_dim(encoder: nn.Module, heads: Mapping[str, nn.Module]) -> int:
    """Width of the final feature, read from the heads (they consume it) or the encoder."""
    dims = {int(h.in_features) for h in heads.values() if hasattr(h, "in_features")}
    if len(dims) == 1:
        return dims.pop()
    if len(dims) > 1:
        raise ConfigError(f"heads disagree on the feature width: {sorted(dims)}")
    for attr in ("output_dim", "embed_dim"):
        if isinstance(getattr(encoder, attr, None), int):
            return int(getattr(encoder, attr))
    raise ConfigError(
        f"cannot read the final feature width of {type(encoder).__name__}: heads have no "
        "`in_features` and the encoder no `output_dim`"
    )


@torch.no_grad()
def expert_targets(encoder: nn.Module, images: Tensor, with_blocks: bool) -> dict[str, Tensor]:
    """An encoder's final feature (``"target"``, ``(B, d)``) and, with ``with_blocks``, the
    token mean of every residual block's output (``"target_blocks"``, ``(B, n_blocks, D)``),
    i.e. the alignment targets of Surgery (v1) and SurgeryV2."""
    if not with_blocks:
        return {"target": encoder(images)}
    means, final = block_token_means(discover_blocks(encoder), lambda: encoder(images))
    return {"target": final, "target_blocks": torch.stack(means, dim=1)}
