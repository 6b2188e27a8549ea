"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022, arXiv 2111.09832).

Each parameter is the average of the experts' values weighted by their diagonal Fisher
information (the paper's Fisher-weighted averaging, element-wise):

    θ* = Σt λt (Ft + ε) θt / Σt λt (Ft + ε),

    Ft = (1/N) Σx E_{y∼pθt(y|x)} [(∇θ log pθt(y|x))²]

over N unlabeled test images x of task t, with y drawn from expert t's own predictive
distribution (its head's softmax): no labels are used.

Estimator (``estimator``):
- ``"exact"`` (default): the expectation over y is computed exactly for every example,
  Σy p(y|x)·(∇θ log p(y|x))², as the authors' reference code does. Per-example gradients come
  from one forward pass per example and one vector-Jacobian product per class, batched with
  ``is_grads_batched``: C backward passes per example for a C-class head (cheap for the
  embedded heads; for SUN397's 397 classes use ``"sample"``).
- ``"sample"``: Monte Carlo, ``samples_per_example`` labels y ∼ p(y|x) per example (seeded),
  an unbiased estimate of the same Fisher at one backward pass per draw.

ε (1e-6) is added to every Fisher, as FusionBench's ``minimal_fisher_weight`` (it therefore
also appears in the denominator): where every Fisher vanishes the merge falls back to the
λ-weighted average instead of collapsing towards 0, and a single expert comes back unchanged.
``normalize`` rescales λt by 1/‖Ft‖ (global L2 norm), as the authors' code and FusionBench do
by default; it is off by default here, which is the paper's equation.

Every floating-point parameter is Fisher-weighted; floating-point buffers are averaged;
integer buffers must agree and are kept. The Fisher passes run expert by expert through a
Lightning Trainer (``trainer.predict`` with gradients enabled), so device, precision and DDP
come from the trainer config; per-rank sums are all-reduced.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from mergelab import validate
from mergelab.errors import ConfigError
from mergelab.merge.accumulate import ExpertAccumulator, predict_pass
from mergelab.merge.base import AdaptiveMerge, StateDict, check_experts
from mergelab.surgery.unlabeled import unlabeled_loader

log = logging.getLogger(__name__)

ESTIMATORS = ("exact", "sample")


# --------------------------------------------------------------------------------------------
# The diagonal Fisher, by a Lightning predict pass with gradients
# --------------------------------------------------------------------------------------------


class FisherCollector(L.LightningModule):
    """Accumulates Σx E_y[(∇θ log p(y|x))²] of ``head(encoder(x))`` over the predicted
    images (``trainer.predict`` with ``inference_mode=False``) for every encoder parameter.

    Each example runs forward alone; the gradients of its log p(y|x) for all the classes the
    estimator needs come from one batched VJP call (``is_grads_batched``, one-hot cotangents).
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        estimator: str = "exact",
        samples_per_example: int = 1,
        grad_memory_mb: float = 1024.0,
        seed: int = 0,
    ):
        super().__init__()
        validate.choice("merge.estimator", estimator, ESTIMATORS)
        self.encoder = encoder.eval()
        # a private copy: Lightning moves this module to the device, the pool's head stays put
        self.head = copy.deepcopy(head).eval().requires_grad_(False)
        self.names = [n for n, p in encoder.named_parameters() if p.is_floating_point()]
        params = dict(encoder.named_parameters())
        for n in self.names:
            params[n].requires_grad_(True)
        self.estimator = estimator
        self.samples_per_example = int(samples_per_example)
        # VJPs per backward call: the batched gradients hold chunk × (#parameters) floats.
        n_params = sum(params[n].numel() for n in self.names)
        self.chunk = max(1, int(grad_memory_mb * 2**20 // (4 * max(n_params, 1))))
        self.seed = int(seed)
        self.sums: list[Tensor] = []
        self.count = torch.zeros((), dtype=torch.float64)
        self._batched = True

    def on_predict_start(self) -> None:
        params = dict(self.encoder.named_parameters())
        # Allocated up front: every rank must all-reduce the same tensors.
        self.sums = [torch.zeros_like(params[n], dtype=torch.float32) for n in self.names]
        self.count = torch.zeros((), dtype=torch.float64, device=self.sums[0].device)
        self._gen = torch.Generator().manual_seed(self.seed + 7919 * self.global_rank)

    def _labels(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(class, weight) of every VJP the estimator needs for one example's p(y|x)."""
        if self.estimator == "exact":
            cols = torch.nonzero(p > 0).reshape(-1)  # classes with p = 0 contribute nothing
            return cols, p[cols]
        s = self.samples_per_example
        cols = torch.multinomial(p.float().cpu(), s, replacement=True, generator=self._gen)
        return cols.to(p.device), torch.full((s,), 1.0 / s, device=p.device)

    def _vjps(self, logp: Tensor, params: list[Tensor], cot: Tensor) -> Sequence[Tensor | None]:
        if self._batched:
            try:
                return torch.autograd.grad(
                    logp, params, cot, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # an op without a vmap rule for its backward
                log.warning("Fisher: batched VJPs unavailable (%s); one VJP at a time", e)
                self._batched = False
        rows = [
            torch.autograd.grad(logp, params, c, retain_graph=True, allow_unused=True) for c in cot
        ]
        return [None if r[0] is None else torch.stack(list(r)) for r in zip(*rows, strict=True)]

    def predict_step(self, batch: Tensor, batch_idx: int) -> None:
        params = [dict(self.encoder.named_parameters())[n] for n in self.names]
        # One example per forward: a per-example gradient taken through a shared batch graph
        # would cost a backward over the whole batch for every (example, class) pair.
        for x in batch.split(1):
            with torch.enable_grad():
                logp = torch.log_softmax(self.head(self.encoder(x)).float(), dim=-1)[0]
            cols, weights = self._labels(logp.detach().exp())
            for start in range(0, cols.numel(), self.chunk):
                c = cols[start : start + self.chunk]
                cot = torch.nn.functional.one_hot(c, logp.numel()).to(logp.dtype)
                w = weights[start : start + self.chunk]
                for acc, g in zip(self.sums, self._vjps(logp, params, cot)):
                    if g is not None:
                        acc += torch.tensordot(w, g.float().square(), dims=1)
        self.count += batch.shape[0]

    def on_predict_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        self.sums = [strategy.reduce(s, reduce_op="sum") for s in self.sums]
        self.count = strategy.reduce(self.count, reduce_op="sum")

    def fisher(self) -> dict[str, Tensor]:
        """Ft per parameter name: the mean over the examples (float32, CPU)."""
        n = float(self.count)
        if n == 0:
            raise ConfigError("Fisher merging: the Fisher pass saw no examples")
        return {name: (s / n).cpu() for name, s in zip(self.names, self.sums)}


def compute_fisher(
    encoder: nn.Module,
    head: nn.Module,
    loader,
    ctx,
    estimator: str = "exact",
    samples_per_example: int = 1,
    grad_memory_mb: float = 1024.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The diagonal Fisher of ``head(encoder(·))`` on ``loader``'s unlabeled images with the
    model's own predictive distribution (see the module docstring), computed by
    ``trainer.predict`` with the run context's Trainer."""
    return predict_pass(
        lambda: FisherCollector(
            encoder, head, estimator, samples_per_example, grad_memory_mb, seed
        ),
        loader,
        ctx,
        FisherCollector.fisher,
        inference_mode=False,
    )


# --------------------------------------------------------------------------------------------
# The weighted average
# --------------------------------------------------------------------------------------------


class FisherAverage:
    """Σt wt (Ft + ε) θt and Σt wt (Ft + ε) for one tensor, accumulated one expert at a time."""

    def __init__(self, eps: float):
        self.eps = eps
        self.num: Tensor | None = None
        self.den: Tensor | None = None

    def add(self, value: Tensor, fisher: Tensor, weight: float) -> None:
        f = (fisher.float() + self.eps) * weight
        if self.num is None:
            self.num, self.den = f * value.float(), f
        else:
            self.num += f * value.float()
            self.den += f

    def result(self) -> Tensor:
        return self.num / self.den


def fisher_average(
    values: Sequence[Tensor],
    fishers: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """θ* = Σ λt (Ft + ε) θt / Σ λt (Ft + ε) for one tensor (λ equal when ``weights`` is None)."""
    acc = FisherAverage(eps)
    for t, (v, f) in enumerate(zip(values, fishers, strict=True)):
        acc.add(v, f, 1.0 if weights is None else float(weights[t]))
    return acc.result()


# --------------------------------------------------------------------------------------------
# The merge method
# --------------------------------------------------------------------------------------------


class FisherMerging(AdaptiveMerge):
    """Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832):
    θ* = Σt λt (Ft + ε) θt / Σt λt (Ft + ε), Ft the diagonal Fisher of expert t with labels
    from its own predictive distribution on unlabeled test images of its task.

    Args:
        estimator: ``"exact"`` (E_y over all classes per example) or ``"sample"`` (Monte
            Carlo labels y ∼ p(y|x)); see the module docstring.
        samples_per_example: labels drawn per example by the ``"sample"`` estimator.
        num_samples: unlabeled test images per task (all of the split when ``None`` or
            larger than it; FusionBench uses 256).
        batch_size: images per loader batch (each image runs forward alone).
        weights: λt per task, in the order of ``tasks.names`` (``None``: equal).
        normalize: scale λt by 1/‖Ft‖ (the authors' code and FusionBench do).
        eps: added to every Fisher (FusionBench's ``minimal_fisher_weight``, 1e-6).
        grad_memory_mb: memory budget of one batched VJP call (sets how many
            (example, class) gradients are computed at once).
        seed: seed of the per-task sample and of the ``"sample"`` labels (``None``: the run
            context's seed).
    """

    name = "fisher"

    def __init__(
        self,
        estimator: str = "exact",
        samples_per_example: int = 1,
        num_samples: int | None = 256,
        batch_size: int = 32,
        weights: Sequence[float] | None = None,
        normalize: bool = False,
        eps: float = 1e-6,
        grad_memory_mb: float = 1024.0,
        seed: int | None = None,
    ):
        self.estimator = validate.choice("merge.estimator", estimator, ESTIMATORS)
        self.samples_per_example = validate.integer(
            "merge.samples_per_example", samples_per_example
        )
        # null: all of each task's data
        self.num_samples = validate.integer("merge.num_samples", num_samples, optional=True)
        self.batch_size = validate.integer("merge.batch_size", batch_size)
        if weights is not None:
            weights = [float(w) for w in weights]
            if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"merge.weights must be finite, non-negative and not all 0; got {weights}"
                )
        self.weights = weights
        self.normalize = bool(normalize)
        self.eps = validate.number("merge.eps", eps, gt=0)
        self.grad_memory_mb = validate.number("merge.grad_memory_mb", grad_memory_mb, gt=0)
        self.seed = validate.integer("merge.seed", seed, minimum=None, optional=True)
        # Filled by fit(): ‖Ft‖ per task (for reports and tests).
        self.fisher_norms_: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"FisherMerging(estimator={self.estimator!r}, num_samples={self.num_samples}, "
            f"batch_size={self.batch_size}, weights={self.weights}, "
            f"normalize={self.normalize}, eps={self.eps})"
        )

    def fit(self, pool, ctx) -> StateDict:
        """Compute each expert's Fisher on its task's unlabeled test images (one expert in
        memory at a time) and return the Fisher-weighted average as a CPU state dict with the
        pretrained checkpoint's keys and dtypes."""
        tasks = list(pool.tasks)
        missing = [
            t
            for t in tasks
            if t not in pool.experts or t not in pool.test_sets or t not in pool.heads
        ]
        if missing:
            raise ConfigError(
                f"Fisher merging needs an expert, a head and test data for task {missing[0]!r}"
            )
        if self.weights is not None and len(self.weights) != len(tasks):
            raise ConfigError(
                f"merge.weights has {len(self.weights)} entries; expected one per task "
                f"({len(tasks)}: {', '.join(tasks)})"
            )
        experts: Mapping[str, Mapping[str, Tensor]] = {t: pool.experts[t] for t in tasks}
        check_experts(pool.pretrained, experts)
        seed = self.seed if self.seed is not None else ctx.seed
        pretrained = pool.pretrained

        averages: dict[str, FisherAverage] = {}
        acc = ExpertAccumulator(pretrained, "Fisher merging")
        self.fisher_norms_ = {}
        for i, task in enumerate(tasks):
            if len(pool.test_sets[task]) == 0:
                raise ConfigError(
                    f"task {task!r} has an empty test split; Fisher merging needs data"
                )
            loader = unlabeled_loader(
                pool.test_sets[task], self.num_samples, self.batch_size, seed + i, ctx.num_workers
            )
            fisher = compute_fisher(
                pool.expert_encoder(task),
                pool.heads[task],
                loader,
                ctx,
                self.estimator,
                self.samples_per_example,
                self.grad_memory_mb,
                seed + i,
            )
            norm = math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
            self.fisher_norms_[task] = norm
            lam = 1.0 if self.weights is None else self.weights[i]
            if self.normalize:
                if norm == 0:
                    raise ConfigError(
                        f"Fisher merging: expert {task!r} has an all-zero Fisher; "
                        "merge.normalize=true cannot divide by its norm"
                    )
                lam /= norm

            def update(key: str, value: Tensor, f: Tensor, lam: float = lam) -> None:
                averages.setdefault(key, FisherAverage(self.eps)).add(value, f, lam)

            acc.add(task, experts[task], fisher, update)

        out = acc.result(lambda key: averages.pop(key).result())
        log.info(
            "Fisher merging: ‖Ft‖ = %s", {t: f"{n:.3g}" for t, n in self.fisher_norms_.items()}
        )
        return out
