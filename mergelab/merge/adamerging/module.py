"""The LightningModule that learns AdaMerging's coefficients λ (Yang et al., ICLR 2024).

Each step builds θ(λ) = θ0 + Σt clamp(λ)t τt functionally (``torch.func.functional_call``)
with one ``addmv`` per tensor: nothing is copied per step besides the merged weights
themselves, and autograd sends gradients to λ only (task vectors, θ0 and heads never require
grad). A Lightning Trainer from the run context runs the loop, so CPU, GPU, bf16-mixed and DDP
come from the user's trainer config.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call

from mergelab import validate
from mergelab.engine import loss_scale
from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge.adamerging.objective import mean_entropy
from mergelab.merge.adamerging.vectors import TaskVectors

GRANULARITIES = ("task", "layer")
# The frozen encoder and heads are in eval mode on purpose (see AdaMergingModule.train), so
# Lightning's warning about modules in eval mode is noise.
EVAL_MODE_WARNING = r".*module\(s\) in eval mode.*"


class AdaMergingModule(L.LightningModule):
    """Learns merging coefficients λ for θ(λ) = θ0 + Σt clamp(λ)t τt by entropy minimisation
    (AdaMerging, Yang et al. ICLR 2024). ``encoder`` holds θ0 and stays frozen; ``heads`` are
    frozen; λ (``self.coefficients``) is the only parameter that trains.

    ``coefficients`` has shape ``(T, 1)`` task-wise (the one column is shared by every
    tensor) and ``(T, K)`` layer-wise (K = number of floating-point tensors).
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        vectors: TaskVectors,
        granularity: str = "layer",
        init: float = 0.3,
        clamp_min: float = 0.0,
        clamp_max: float = 1.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
    ):
        super().__init__()
        missing = [t for t in vectors.tasks if t not in heads]
        if missing:
            raise ConfigError(f"no classification head for task {missing[0]!r}")
        self.encoder = encoder.requires_grad_(False)
        self.heads = nn.ModuleDict({t: heads[t] for t in vectors.tasks}).requires_grad_(False)
        self.tasks = list(vectors.tasks)
        self.granularity = validate.choice("granularity", granularity, GRANULARITIES)
        self.clamp_max = validate.number("clamp_max", clamp_max)
        self.clamp_min = validate.number("clamp_min", clamp_min, le=self.clamp_max)
        self.lr, self.betas = validate.number("lr", lr, gt=0), validate.betas("betas", betas)
        n_cols = 1 if granularity == "task" else len(vectors.keys)
        self.coefficients = nn.Parameter(torch.full((len(self.tasks), n_cols), float(init)))
        # Not a buffer: a registered buffer would be broadcast by DDP on every forward and
        # written into every checkpoint. It follows the module in _apply() below instead.
        self._vectors = vectors
        self.entropy_history: list[float] = []
        self._history: list[Tensor] = []  # this process's scaled loss share per step
        names = dict(self.encoder.named_parameters())
        names.update(dict(self.encoder.named_buffers()))
        unknown = [k for k in vectors.keys if k not in names]
        if unknown:
            raise CheckpointError(
                f"task vector key {unknown[0]!r} is not a parameter or buffer of the encoder"
            )

    # Keep the task vectors on the module's device (but never change their dtype: see
    # VECTOR_DTYPE) whenever Lightning or the user moves the module.
    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0))
        if probe.device != self._vectors.flat.device:
            self._vectors = self._vectors.to(probe.device)
        return out

    def setup(self, stage: str) -> None:
        # Runs in every process (ddp_spawn children too): the frozen encoder and heads are
        # in eval mode on purpose (see train()), so Lightning's warning about it is noise.
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)

    def train(self, mode: bool = True) -> AdaMergingModule:
        # λ is fitted for the network as it runs at test time: no dropout / drop-path noise.
        super().train(mode)
        self.encoder.eval()
        self.heads.eval()
        return self

    def effective_coefficients(self) -> Tensor:
        """clamp(λ, clamp_min, clamp_max) with shape (T, K) — what θ(λ) actually uses."""
        lam = self.coefficients.clamp(self.clamp_min, self.clamp_max)
        if self.granularity == "task":
            lam = lam.expand(-1, len(self._vectors.keys))
        return lam

    def merged_params(self) -> dict[str, Tensor]:
        """θ(λ) for every merged tensor, differentiable w.r.t. λ only.

        Built in the task vectors' precision with autocast off: under bf16-mixed the forward
        runs in bf16, but the weights themselves must not be rounded before they are used.
        """
        lam = self.effective_coefficients()
        tv = self._vectors
        params = dict(self.encoder.named_parameters())
        params.update(dict(self.encoder.named_buffers()))
        out: dict[str, Tensor] = {}
        with torch.autocast(device_type=tv.flat.device.type, enabled=False):
            lam = lam.to(tv.flat.dtype)
            for i, key in enumerate(tv.keys):
                base = params[key]
                # θ = θ0 + τ(:, i)ᵀ λ(:, i): one fused matrix-vector product per tensor.
                merged = torch.addmv(
                    base.reshape(-1).to(tv.flat.dtype), tv.column(i).t(), lam[:, i]
                )
                out[key] = merged.view(tv.shapes[i]).to(base.dtype)
        return out

    def entropy_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Σt mean entropy of task t's head on its batch (``batch``: task → images, any subset
        of the tasks), all tasks through ONE θ(λ).

        All tasks' images go through the encoder as one concatenated batch (same weights, one
        pass); features are split back per task for the task's own head.
        """
        tasks = [t for t in self.tasks if t in batch]
        images = [self._images(batch[t]) for t in tasks]
        # λ joins the graph even without images, so every process has a gradient to reduce
        loss = self.coefficients.sum() * 0.0
        if not tasks:
            return loss
        params = self.merged_params()
        feats = functional_call(self.encoder, params, (torch.cat(images),))
        for task, f in zip(tasks, feats.split([len(x) for x in images])):
            loss = loss + mean_entropy(self.heads[task](f))
        return loss

    @staticmethod
    def _images(item: Any) -> Tensor:
        # Test sets yield (image, label); AdaMerging is unsupervised, so labels are dropped here.
        return item[0] if isinstance(item, (tuple, list)) else item

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """One AdaMerging step on this process's share of the step (a
        :class:`~.data.StepImages` item): the summed per-task mean entropy at the current λ,
        scaled so that DDP's gradient average is the single-device gradient."""
        tasks = batch["tasks"]
        local = max((len(x) for x in tasks.values()), default=0)
        loss = self.entropy_loss(tasks) * loss_scale(
            local, int(batch["rows"]), self.trainer.world_size
        )
        self._history.append(loss.detach())
        if self.loggers:
            self.log("adamerging/entropy", loss, prog_bar=True, batch_size=1)
        return loss

    def on_train_end(self) -> None:
        """The single-device entropy of every step: the processes' scaled shares, summed."""
        if self._history:
            total = self.trainer.strategy.reduce(
                torch.stack(self._history).double(), reduce_op="sum"
            )
            self.entropy_history = (total / self.trainer.world_size).cpu().tolist()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on λ only (the paper's optimiser; lr and betas from the config)."""
        return torch.optim.Adam([self.coefficients], lr=self.lr, betas=self.betas)
