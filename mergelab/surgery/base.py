"""The surgery contract, and the shared driver of the trained surgery kinds (v1, v2).

A surgery kind is an object with ``apply(model, pool, ctx) -> MultiTaskModel``: it takes the
merged multi-task model and returns one whose ``forward(x, task)`` routes each batch through
the task's own repair. The pipeline calls nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mergelab import validate
from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.lit import (
    SAMPLINGS,
    StepDataset,
    SurgeryLit,
    TaskSource,
    make_schedule,
    online_schedule,
    used_indices,
)
from mergelab.surgery.modules import SurgeryModel, expert_targets


class Surgery(ABC):
    """A representation-repair step applied to the merged model (or none).

    What the pipeline reads besides :meth:`apply`: ``rank`` (the width of the repair
    modules, ``None`` for kinds without), ``identity`` (``apply`` returns its input
    unchanged, so nothing needs measuring twice) and :meth:`extra_rows`.
    """

    name: str = "surgery"
    rank: int | None = None
    identity: bool = False

    @abstractmethod
    def apply(self, model: MultiTaskModel, pool: ModelPool, ctx: RunContext) -> MultiTaskModel:
        """Return a model whose ``forward(x, task)`` uses ``task``'s repair."""

    def extra_rows(self, model: MultiTaskModel) -> dict[str, dict[str, float]]:
        """Per-task accuracies this surgery measured itself on ``model`` (the one ``apply``
        returned), keyed by the suffix of their table row; none by default."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class AdapterSurgery(Surgery):
    """Trains per-task low-rank modules (Representation Surgery, Yang et al., ICML 2024) on
    the unlabeled test split of every task, aligning the merged model to each expert.

    Subclasses set ``name``, ``block_sites`` (modules after every block: SurgeryV2) and
    ``merged_in_loop`` (whether the merged backbone must run inside the loss), and implement
    :meth:`loss` — the paper's objective for one task's batch.

    Args:
        rank: width r of every module's bottleneck.
        lr, betas, weight_decay: Adam settings (paper: 1e-3, (0.9, 0.999), 0).
        steps: optimiser steps (paper: 500); ignored online.
        batch_size: samples per task per step (paper: 16); ignored online (always 1).
        sampling: ``all_tasks`` (one batch of every task per step, losses summed: the
            authors' loop) or ``round_robin`` (one task per step, cycling).
        online: adapt-then-predict on a single pass over the test data, batch size 1; the
            returned model carries ``online_accuracy`` (%) and ``online_counts`` per task.
        cache: compute fixed targets once (v1: merged and expert final features; v2: the
            experts' per-block token means and final features) over the drawn test indices;
            ``false`` runs the reference loop that re-runs the expert (and merged model)
            every step — same schedule, same result, slower.
        seed: seeds the module initialisation and the sampling schedule.
        load_from: a ``surgery.safetensors`` to load instead of training (evaluation only).
        save: write the trained modules to ``<out_dir>/surgery.safetensors``.
    """

    name = "adapter"
    block_sites = False
    merged_in_loop = False

    def __init__(
        self,
        rank: int = 16,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        steps: int = 500,
        batch_size: int = 16,
        sampling: str = "all_tasks",
        online: bool = False,
        cache: bool = True,
        seed: int = 0,
        load_from: str | None = None,
        save: bool = True,
    ):
        self.rank = validate.integer("surgery rank", rank)
        self.lr = validate.number("surgery lr", lr, gt=0)
        self.betas = validate.betas("surgery betas", betas)
        self.weight_decay = validate.number("surgery weight_decay", weight_decay, ge=0)
        self.steps = validate.integer("surgery steps", steps)
        self.batch_size = validate.integer("surgery batch_size", batch_size)
        self.sampling = validate.choice("surgery sampling", sampling, SAMPLINGS)
        self.online = bool(online)
        self.cache = bool(cache)
        self.seed = validate.integer("surgery seed", seed, minimum=None)
        self.load_from = None if load_from in (None, "") else str(load_from)
        self.save = bool(save)
        if self.load_from is not None and not Path(self.load_from).is_file():
            raise CheckpointError(f"surgery load_from: file not found: {self.load_from}")

    @abstractmethod
    def loss(self, model: SurgeryModel, task: str, batch: dict[str, Tensor]) -> Tensor:
        """The surgery objective on one task's batch (targets already in ``batch``)."""

    def step_loss(self, model: SurgeryModel, batches: dict[str, dict[str, Tensor]]) -> Tensor:
        """One optimisation step's loss: the sum of the task losses (the authors' loop).
        Kinds that can evaluate all tasks in one pass override this (same value, faster)."""
        return torch.stack([self.loss(model, t, b) for t, b in batches.items()]).sum()

    def extra_rows(self, model: MultiTaskModel) -> dict[str, dict[str, float]]:
        """Online runs: the adapt-then-predict accuracy, as the row ``[online]``."""
        online = getattr(model, "online_accuracy", None) if self.online else None
        return {"online": dict(online)} if online else {}

    # -- the run ------------------------------------------------------------------------
    def build(self, model: MultiTaskModel) -> SurgeryModel:
        """Untrained (identity) modules on ``model``'s encoder and heads."""
        return SurgeryModel(
            model.encoder,
            model.heads,
            self.rank,
            self.name,
            block_sites=self.block_sites,
            seed=self.seed,
        )

    def apply(self, model: MultiTaskModel, pool: ModelPool, ctx: RunContext) -> SurgeryModel:
        """Train (or, with ``load_from``, load) the modules on ``model`` and return the routed
        model; trained modules are saved to ``<ctx.out_dir>/surgery.safetensors``."""
        from mergelab.surgery.io import SURGERY_FILE, load_surgery, save_surgery

        smodel = self.build(model)
        if self.load_from is not None:
            load_surgery(smodel, self.load_from)
            return smodel.eval()

        missing = [t for t in smodel.tasks if t not in pool.test_sets]
        if missing:
            raise ConfigError(
                f"surgery needs unlabeled test data for task {missing[0]!r}; the pool has {sorted(pool.test_sets)}"
            )
        sizes = {t: len(pool.test_sets[t]) for t in smodel.tasks}
        if self.online:
            schedule = online_schedule(sizes, self.sampling, self.seed)
        else:
            schedule = make_schedule(sizes, self.steps, self.batch_size, self.sampling, self.seed)

        sources, experts = self._sources(smodel, pool, ctx, schedule)
        lit = SurgeryLit(
            smodel, self.step_loss, self.lr, self.betas, self.weight_decay,
            experts=experts, with_blocks=self.block_sites, online=self.online,
        )  # fmt: skip
        engine = ctx.engine
        steps = StepDataset(schedule, sources, engine.global_rank, engine.world_size)
        # round_robin and online steps leave some tasks' modules without a gradient
        partial_steps = any(len(step) < len(smodel.tasks) for step in schedule)
        engine.fit(
            lit,
            DataLoader(steps, batch_size=None, num_workers=ctx.num_workers),
            max_steps=len(schedule),
            find_unused_parameters=partial_steps,
        )

        smodel.loss_history = lit.loss_history()
        if self.online:
            smodel.online_accuracy, smodel.online_counts = lit.online_results()
        smodel = smodel.cpu().eval()
        if self.save and engine.is_global_zero:
            save_surgery(smodel, Path(ctx.out_dir) / SURGERY_FILE, backbone=pool.backbone)
        return smodel

    def _sources(self, smodel: SurgeryModel, pool: ModelPool, ctx: RunContext, schedule):
        """Per-task batch builders, and the experts the reference loop needs (none cached).

        Cached: every target is fixed by the schedule, so compute it once per drawn index
        (DESIGN §6). v1 also caches the merged model's final feature, since its modules sit
        after the whole backbone; v2 keeps the merged backbone in the loop.
        """
        if not self.cache:
            sources = {t: TaskSource(dataset=pool.test_sets[t]) for t in smodel.tasks}
            experts = {t: pool.expert_encoder(t).requires_grad_(False) for t in smodel.tasks}
            return sources, experts

        engine, bs, nw = ctx.engine, ctx.eval_batch_size, ctx.num_workers
        sources = {}
        for t in smodel.tasks:
            ds, idx = pool.test_sets[t], used_indices(schedule, t)
            expert = pool.expert_encoder(t).requires_grad_(False)
            cached = engine.compute(
                lambda enc, x: expert_targets(enc, x, self.block_sites), expert, ds, idx, bs, nw
            )
            del expert  # one expert in memory at a time
            if not self.merged_in_loop:
                smodel.use_task(t)  # a task-conditional merge: task t's weights
                merged = engine.compute(
                    lambda enc, x: {"feature": enc(x)}, smodel.encoder, ds, idx, bs, nw
                )
                cached["feature"] = merged["feature"]
            row_of = torch.full((len(ds),), -1, dtype=torch.long)
            row_of[idx] = torch.arange(idx.numel())
            if self.merged_in_loop:
                cached.pop("label")  # read with the images
                sources[t] = TaskSource(dataset=ds, cached=cached, row_of=row_of)
            else:
                sources[t] = TaskSource(cached=cached, row_of=row_of)
        return sources, None
