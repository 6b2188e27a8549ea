"""AdaMerging and AdaMerging++ (Yang et al., "AdaMerging: Adaptive Model Merging for
Multi-Task Learning", ICLR 2024).

The merged weights are a learnable combination of task vectors τt = θt − θ0:

    task-wise   θ(λ)   = θ0   + Σt clamp(λt)   τt       (one λ per task)
    layer-wise  θ_l(λ) = θ0_l + Σt clamp(λt,l) τt,l     (one λ per task per float tensor l)

with λ initialised to 0.3 and clamped to [0, 1] where it is used. λ is learned by minimising,
summed over tasks, the mean Shannon entropy H(p) = −Σc pc log pc of the softmax of the task's
head logits on that task's unlabeled test batches. AdaMerging++ is the same with the
TIES-processed task vectors (trim, elect sign, disjoint) in place of τt.

Implementation notes (why it looks like this):
- The task vectors live on the training device as ONE ``(T, P)`` float32 matrix (P = number of
  merged scalars), as plain tensors outside the module's state (so DDP never broadcasts them
  and a checkpoint never stores them). θ0 is the frozen encoder's own parameters.
- Each step builds θ(λ) functionally (``torch.func.functional_call``) with one ``addmv`` per
  tensor: nothing is copied per step besides the merged weights themselves, and autograd
  sends gradients to λ only (task vectors, θ0 and heads never require grad).
- A Lightning Trainer from the run context runs the loop, so CPU, GPU, bf16-mixed and DDP
  come from the user's trainer config.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge.base import AdaptiveMerge, StateDict, iter_params

GRANULARITIES = ("task", "layer")
VECTORS = ("task_arithmetic", "ties")
COEFFICIENTS_JSON = "adamerging_coefficients.json"
COEFFICIENTS_PNG = "adamerging_coefficients.png"
# Task vectors are stored in float32 even for half-precision checkpoints: fine-tuning deltas
# are small, and fp16/bf16 would round many of them away before λ ever sees them.
VECTOR_DTYPE = torch.float32
# Above this many coefficients per task the heatmap shows tensor indices instead of names
# (the json keeps the names); ViT-B/32 has ~150 float tensors.
_MAX_NAMED_TICKS = 40
_EVAL_MODE_WARNING = r".*module\(s\) in eval mode.*"


# --------------------------------------------------------------------------------------------
# Task vectors
# --------------------------------------------------------------------------------------------


class TaskVectors:
    """Per-task vectors for the merged (floating-point) tensors, flattened into one matrix.

    ``flat[t, offsets[i] : offsets[i] + numel(shapes[i])]`` is task t's vector for ``keys[i]``.
    """

    def __init__(self, tasks: list[str], keys: list[str], shapes: list[torch.Size], flat: Tensor):
        self.tasks = tasks
        self.keys = keys
        self.shapes = shapes
        self.flat = flat
        sizes = [math.prod(s) for s in shapes]
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.sizes = sizes

    def column(self, i: int) -> Tensor:
        """The ``(T, numel)`` block of tensor ``keys[i]`` (a view, no copy)."""
        o = self.offsets[i]
        return self.flat[:, o : o + self.sizes[i]]

    def to(self, device: torch.device | str) -> TaskVectors:
        """The same vectors on ``device`` (dtype unchanged)."""
        return TaskVectors(self.tasks, self.keys, self.shapes, self.flat.to(device))


def _float_keys(pretrained: Mapping[str, Tensor]) -> list[str]:
    return [k for k in pretrained.keys() if pretrained[k].is_floating_point()]


def _allocate(pretrained: Mapping[str, Tensor], keys: list[str], n_tasks: int) -> Tensor:
    total = sum(pretrained[k].numel() for k in keys)
    return torch.empty(n_tasks, total, dtype=VECTOR_DTYPE)


def plain_task_vectors(
    pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
) -> TaskVectors:
    """τt = θt − θ0 for every floating-point tensor (task arithmetic's task vectors).

    Streams over keys (:func:`~mergelab.merge.base.iter_params`), so lazy experts are read one
    tensor at a time and only the ``(T, P)`` result is held.
    """
    tasks = list(experts.keys())
    keys = _float_keys(pretrained)
    flat = _allocate(pretrained, keys, len(tasks))
    shapes: list[torch.Size] = []
    offset = 0
    for _key, base, vals in iter_params(pretrained, experts):
        if not base.is_floating_point():
            continue  # integer buffers are not merged; they stay θ0 (checked equal upstream)
        n = base.numel()
        for t, v in enumerate(vals):
            flat[t, offset : offset + n] = (v.to(VECTOR_DTYPE) - base.to(VECTOR_DTYPE)).reshape(-1)
        shapes.append(base.shape)
        offset += n
    return TaskVectors(tasks, keys, shapes, flat)


def ties_vectors(
    pretrained: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    k: float,
    scope: str,
) -> TaskVectors:
    """TIES-processed task vectors (Yadav et al., NeurIPS 2023: trim to top-k, elect sign,
    keep agreeing entries) for AdaMerging++; computed by ``mergelab.merge.ties``."""
    try:
        from mergelab.merge.ties import ties_task_vectors
    except ImportError as e:  # pragma: no cover - only while ties.py is missing
        raise ConfigError(
            "merge.vectors='ties' (AdaMerging++) needs mergelab.merge.ties.ties_task_vectors, "
            f"which could not be imported: {e}"
        ) from e
    tasks = list(experts.keys())
    keys = _float_keys(pretrained)
    processed = dict(ties_task_vectors(pretrained, experts, k=k, scope=scope))
    flat = _allocate(pretrained, keys, len(tasks))
    shapes: list[torch.Size] = []
    offset = 0
    for key in keys:
        base = pretrained[key]
        for t, task in enumerate(tasks):
            # pop: each processed tensor is freed once copied, so the peak stays near one
            # set of vectors instead of two
            vec = processed.get(task, {}).pop(key, None)
            if vec is None:
                raise CheckpointError(
                    f"ties_task_vectors returned no vector for task {task!r}, key {key!r}; "
                    "expected one per task and floating-point tensor"
                )
            if vec.shape != base.shape:
                raise CheckpointError(
                    f"TIES vector for task {task!r}, key {key!r} has shape {tuple(vec.shape)}, "
                    f"expected {tuple(base.shape)}"
                )
            flat[t, offset : offset + base.numel()] = vec.to(VECTOR_DTYPE).reshape(-1)
        shapes.append(base.shape)
        offset += base.numel()
    del processed
    return TaskVectors(tasks, keys, shapes, flat)


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits) (AdaMerging's surrogate
    objective, H(ŷ) = −Σc ŷc log ŷc). Computed in float32 so bf16 logits stay accurate."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------
# The LightningModule
# --------------------------------------------------------------------------------------------


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
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        missing = [t for t in vectors.tasks if t not in heads]
        if missing:
            raise ConfigError(f"no classification head for task {missing[0]!r}")
        self.encoder = encoder.requires_grad_(False)
        self.heads = nn.ModuleDict({t: heads[t] for t in vectors.tasks}).requires_grad_(False)
        self.tasks = list(vectors.tasks)
        self.granularity = granularity
        self.clamp_min, self.clamp_max = float(clamp_min), float(clamp_max)
        self.lr, self.betas = float(lr), tuple(float(b) for b in betas)
        n_cols = 1 if granularity == "task" else len(vectors.keys)
        self.coefficients = nn.Parameter(torch.full((len(self.tasks), n_cols), float(init)))
        # Not a buffer: a registered buffer would be broadcast by DDP on every forward and
        # written into every checkpoint. It follows the module in _apply() below instead.
        self._vectors = vectors
        self.entropy_history: list[Tensor] = []
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
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING)

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
        """Σt mean entropy of task t's head on its batch, all tasks through ONE θ(λ).

        All tasks' images go through the encoder as one concatenated batch (same weights, one
        pass); features are split back per task for the task's own head.
        """
        images = [self._images(batch[t]) for t in self.tasks]
        params = self.merged_params()
        feats = functional_call(self.encoder, params, (torch.cat(images),))
        loss = feats.new_zeros((), dtype=torch.float32)
        for task, f in zip(self.tasks, feats.split([len(x) for x in images])):
            loss = loss + mean_entropy(self.heads[task](f))
        return loss

    @staticmethod
    def _images(item: Any) -> Tensor:
        # Test sets yield (image, label); AdaMerging is unsupervised, so labels are dropped here.
        return item[0] if isinstance(item, (tuple, list)) else item

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """One AdaMerging step: the summed per-task mean entropy at the current λ."""
        loss = self.entropy_loss(batch)
        self.entropy_history.append(loss.detach())
        self.log("adamerging/entropy", loss, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on λ only (the paper's optimiser; lr and betas from the config)."""
        return torch.optim.Adam([self.coefficients], lr=self.lr, betas=self.betas)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class _Images(Dataset):
    """A test split with its labels stripped (AdaMerging adapts on unlabeled test data)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        item = self.data[i]
        return item[0] if isinstance(item, (tuple, list)) else item


class _TaskBatches(L.LightningDataModule):
    """One shuffled loader per task, zipped so that every step sees a batch of every task."""

    def __init__(
        self,
        test_sets: Mapping[str, Dataset],
        tasks: list[str],
        batch_size: int,
        num_workers: int,
        seed: int,
    ):
        super().__init__()
        self.test_sets, self.tasks = test_sets, tasks
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def train_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        loaders = {}
        for i, task in enumerate(self.tasks):
            data = _Images(self.test_sets[task])
            if len(data) == 0:
                raise ConfigError(f"task {task!r} has an empty test split; AdaMerging needs data")
            loaders[task] = DataLoader(
                data,
                batch_size=self.batch_size,
                shuffle=True,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(self.seed + i),
            )
        # max_size_cycle: small test splits are cycled so every step has every task.
        return CombinedLoader(loaders, mode="max_size_cycle")


# --------------------------------------------------------------------------------------------
# The merge method
# --------------------------------------------------------------------------------------------


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
        if granularity not in GRANULARITIES:
            raise ConfigError(
                f"merge.granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}"
            )
        if vectors not in VECTORS:
            raise ConfigError(f"merge.vectors must be one of {', '.join(VECTORS)}; got {vectors!r}")
        if not clamp_min <= clamp_max:
            raise ConfigError(
                f"merge.clamp_min ({clamp_min}) must be <= merge.clamp_max ({clamp_max})"
            )
        if not clamp_min <= init <= clamp_max:
            raise ConfigError(
                f"merge.init ({init}) must lie in [clamp_min, clamp_max] = [{clamp_min}, {clamp_max}]"
            )
        if lr <= 0:
            raise ConfigError(f"merge.lr must be > 0, got {lr}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"merge.betas must be two numbers in [0, 1), got {list(betas)}")
        if int(steps) < 1:
            raise ConfigError(f"merge.steps must be >= 1, got {steps}")
        if int(batch_size) < 1:
            raise ConfigError(f"merge.batch_size must be >= 1, got {batch_size}")
        if vectors == "ties" and not 0.0 < ties_k <= 1.0:
            raise ConfigError(f"merge.ties_k must be a fraction in (0, 1], got {ties_k}")
        self.granularity = granularity
        self.vectors = vectors
        self.init = float(init)
        self.clamp_min, self.clamp_max = float(clamp_min), float(clamp_max)
        self.lr, self.betas = float(lr), betas
        self.steps, self.batch_size = int(steps), int(batch_size)
        self.ties_k, self.ties_scope = float(ties_k), ties_scope
        self.seed = None if seed is None else int(seed)
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
        """Learn λ on the pool's unlabeled test splits with ``ctx.make_trainer``, save the
        coefficients (json + heatmap) to ``ctx.out_dir`` and return θ(λ*) as a CPU state dict
        with the pretrained checkpoint's keys and dtypes (integer buffers stay θ0)."""
        module = self.build_module(pool)
        seed = self.seed if self.seed is not None else ctx.seed
        data = _TaskBatches(pool.test_sets, module.tasks, self.batch_size, ctx.num_workers, seed)
        trainer = ctx.make_trainer(max_steps=self.steps)
        with warnings.catch_warnings():
            # The encoder and heads are kept in eval mode on purpose (see AdaMergingModule.train).
            warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING)
            trainer.fit(module, datamodule=data)

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

        if trainer.is_global_zero:
            out_dir = Path(ctx.out_dir)
            if self.save_coefficients:
                self._save_json(out_dir / COEFFICIENTS_JSON, lam, raw)
            if self.plot:
                self._save_heatmap(out_dir / COEFFICIENTS_PNG, lam)
        return out

    # -- outputs -----------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        return ["all tensors"] if self.granularity == "task" else list(self.keys_)

    def _save_json(self, path: Path, lam: Tensor, raw: Tensor) -> None:
        cols = self._columns()
        eff = lam[:, :1] if self.granularity == "task" else lam
        record = {
            "method": self.name,
            "granularity": self.granularity,
            "vectors": self.vectors,
            "init": self.init,
            "clamp": [self.clamp_min, self.clamp_max],
            "steps": len(self.entropy_history_),
            "lr": self.lr,
            "batch_size": self.batch_size,
            "tasks": self.tasks_,
            "columns": cols,
            # effective (clamped) coefficients, tasks × columns, as used in θ(λ)
            "coefficients": eff.tolist(),
            "raw_coefficients": raw.tolist(),
            "by_task": {t: dict(zip(cols, row)) for t, row in zip(self.tasks_, eff.tolist())},
            "entropy_history": self.entropy_history_,
        }
        _atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode()))

    def _save_heatmap(self, path: Path, lam: Tensor) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        eff = (lam[:, :1] if self.granularity == "task" else lam).numpy()
        cols = self._columns()
        n_rows, n_cols = eff.shape
        named = n_cols <= _MAX_NAMED_TICKS
        # room for the rotated tensor names under the heatmap when they are shown
        label_room = 0.06 * max(len(c) for c in cols) if named else 0.5
        fig, ax = plt.subplots(
            figsize=(min(max(7, 4 + 0.15 * n_cols), 24), 1.2 + 0.4 * n_rows + label_room)
        )
        im = ax.imshow(
            eff,
            aspect="auto",
            cmap="viridis",
            vmin=self.clamp_min,
            vmax=self.clamp_max,
            interpolation="nearest",
        )
        ax.set_yticks(range(n_rows), self.tasks_)
        if named:
            ax.set_xticks(range(n_cols), cols, rotation=90 if n_cols > 1 else 0, fontsize=6)
        else:
            ax.set_xlabel("parameter tensor index (names in " + COEFFICIENTS_JSON + ")")
        ax.set_title(f"AdaMerging coefficients λ ({self.granularity}-wise, {self.vectors})")
        fig.colorbar(im, ax=ax, label="λ (clamped)")
        fig.tight_layout()
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared/read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
