"""AdaMerging as a merge method (Yang et al., ICLR 2024): validates the configuration, builds
the task vectors and the :class:`~.module.AdaMergingModule`, runs it with the run context's
Trainer and returns θ(λ*) as a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mergelab import validate
from mergelab.errors import ConfigError
from mergelab.merge.adamerging import outputs
from mergelab.merge.adamerging.data import StepImages, task_streams
from mergelab.merge.adamerging.module import GRANULARITIES, AdaMergingModule
from mergelab.merge.adamerging.vectors import TaskVectors, plain_task_vectors, ties_vectors
from mergelab.merge.base import AdaptiveMerge, StateDict

VECTORS = ("task_arithmetic", "ties")


class AdaMerging(AdaptiveMerge):
    """AdaMerging (task-wise / layer-wise) and AdaMerging++ (``vectors="ties"``), Yang et al.
    ICLR 2024: θ(λ) = θ0 + Σt clamp(λ)t τt with λ learned by test-time entropy minimisation.

    Args:
        granularity: ``"task"`` (one λ per task) or ``"layer"`` (one per task per float tensor).
        vectors: ``"task_arithmetic"`` (τt = θt − θ0) or ``"ties"`` (AdaMerging++).
        init: initial λ (0.3 in the paper).
        clamp_min, clamp_max: λ is clamped to this range where it is used ([0, 1]).
        lr, betas: Adam hyperparameters (1e-3, (0.9, 0.999)).
        steps: optimisation steps (500 in the authors' code).
        batch_size: unlabeled test images per task per step (16).
        ties_k: fraction of each task vector kept by the TIES trim (AdaMerging++ only).
        ties_scope: TIES trim scope, passed to ``ties_task_vectors`` (AdaMerging++ only).
        seed: seed of the per-task batch sampling (``None``: the run context's seed).
        save_coefficients: write ``adamerging_coefficients.json`` to the run dir.
        plot: write the task × layer heatmap ``adamerging_coefficients.png``.
    """

    name = "adamerging"

    def __init__(
        self,
        granularity: str = "layer",
        vectors: str = "task_arithmetic",
        init: float = 0.3,
        clamp_min: float = 0.0,
        clamp_max: float = 1.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        steps: int = 500,
        batch_size: int = 16,
        ties_k: float = 0.2,
        ties_scope: str = "global",
        seed: int | None = None,
        save_coefficients: bool = True,
        plot: bool = True,
    ):
        self.granularity = validate.choice("merge.granularity", granularity, GRANULARITIES)
        self.vectors = validate.choice("merge.vectors", vectors, VECTORS)
        self.clamp_max = validate.number("merge.clamp_max", clamp_max)
        self.clamp_min = validate.number("merge.clamp_min", clamp_min, le=self.clamp_max)
        self.init = validate.number("merge.init", init, ge=self.clamp_min, le=self.clamp_max)
        self.lr = validate.number("merge.lr", lr, gt=0)
        self.betas = validate.betas("merge.betas", betas)
        self.steps = validate.integer("merge.steps", steps)
        self.batch_size = validate.integer("merge.batch_size", batch_size)
        self.ties_k = validate.fraction("merge.ties_k", ties_k, open_low=True)
        self.ties_scope = ties_scope  # checked by ties_task_vectors, which owns the scopes
        self.seed = validate.integer("merge.seed", seed, minimum=None, optional=True)
        self.save_coefficients, self.plot = bool(save_coefficients), bool(plot)
        # Filled by fit(): what was learned, for reports and tests.
        self.coefficients_: Tensor | None = None
        self.keys_: list[str] = []
        self.tasks_: list[str] = []
        self.entropy_history_: list[float] = []

    def __repr__(self) -> str:
        return (
            f"AdaMerging(granularity={self.granularity!r}, vectors={self.vectors!r}, "
            f"init={self.init}, lr={self.lr}, steps={self.steps}, "
            f"batch_size={self.batch_size})"
        )

    # -- building blocks (public so that tests and benchmarks can drive them directly) -------

    def task_vectors(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> TaskVectors:
        """τt (task arithmetic) or the TIES-processed vectors (AdaMerging++)."""
        if self.vectors == "ties":
            return ties_vectors(pretrained, experts, k=self.ties_k, scope=self.ties_scope)
        return plain_task_vectors(pretrained, experts)

    def build_module(self, pool) -> AdaMergingModule:
        """The LightningModule for ``pool``: θ0 encoder, frozen heads, task vectors, λ = init."""
        missing = [t for t in pool.tasks if t not in pool.experts]
        if missing:
            raise ConfigError(f"no expert for task {missing[0]!r} in the model pool")
        experts = {t: pool.experts[t] for t in pool.tasks}
        vectors = self.task_vectors(pool.pretrained, experts)
        return AdaMergingModule(
            pool.pretrained_encoder(),
            pool.heads,
            vectors,
            granularity=self.granularity,
            init=self.init,
            clamp_min=self.clamp_min,
            clamp_max=self.clamp_max,
            lr=self.lr,
            betas=self.betas,
        )

    # -- the AdaptiveMerge contract -------------------------------------------------------

    def fit(self, pool, ctx) -> StateDict:
        """Learn λ on the pool's unlabeled test splits with the run's engine (``ctx.engine.fit``), save the
        coefficients (json + heatmap) to ``ctx.out_dir`` and return θ(λ*) as a CPU state dict
        with the pretrained checkpoint's keys and dtypes (integer buffers stay θ0)."""
        module = self.build_module(pool)
        seed = self.seed if self.seed is not None else ctx.seed
        sizes = {t: len(pool.test_sets[t]) for t in module.tasks}
        schedule = task_streams(sizes, self.steps, self.batch_size, seed)
        engine = ctx.engine
        steps = StepImages(pool.test_sets, schedule, engine.global_rank, engine.world_size)
        engine.fit(
            module,
            DataLoader(steps, batch_size=None, num_workers=ctx.num_workers),
            max_steps=self.steps,
        )

        with torch.no_grad():
            merged = module.merged_params()
            lam = module.effective_coefficients().detach().float().cpu()
        self.coefficients_ = lam
        self.keys_ = list(module._vectors.keys)
        self.tasks_ = list(module.tasks)
        self.entropy_history_ = [float(x) for x in module.entropy_history]
        raw = module.coefficients.detach().float().cpu()

        out: StateDict = {}
        for key in pool.pretrained.keys():
            base = pool.pretrained[key]
            out[key] = merged[key].detach().to("cpu", base.dtype) if key in merged else base.clone()

        if engine.is_global_zero:
            out_dir = Path(ctx.out_dir)
            if self.save_coefficients:
                outputs.save_json(out_dir / outputs.COEFFICIENTS_JSON, self, lam, raw)
            if self.plot:
                outputs.save_heatmap(out_dir / outputs.COEFFICIENTS_PNG, self, lam)
        return out
