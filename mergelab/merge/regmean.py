"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023, arXiv 2212.09849), for image encoders.

Every linear map y = x·Wᵀ of the encoder is merged by the closed-form solution of the
regression that asks the merged layer to reproduce each expert's outputs on that expert's
own inputs,

    W* = argmin_W Σt ‖Xt Wᵀ − Xt Wtᵀ‖²   ⇒   W*ᵀ = (Σt G̃t)⁻¹ Σt G̃t Wtᵀ,

with Xt the layer's inputs inside expert t on unlabeled test images of task t, Gt = XtᵀXt
and the paper's off-diagonal shrinkage G̃t = α·Gt + (1 − α)·diag(Gt) (α = 0.95). Every other
parameter (biases, LayerNorms, embeddings, the patch convolution) is the mean of the experts.

What counts as a linear layer is discovered from the model, never listed by name:
- every ``nn.Linear`` whose forward runs (HF CLIP q/k/v/out_proj, fc1, fc2; open_clip c_fc,
  c_proj), seen through a forward pre-hook on its input;
- every ``nn.MultiheadAttention`` (open_clip's attention): its fused ``in_proj_weight`` gets
  ONE Gram (q, k and v read the same input in self-attention); its ``out_proj`` is applied
  inside ``F.multi_head_attention_forward`` without calling the module, so its input (the
  heads' concatenated outputs) is recomputed by the same attention with an identity output
  projection;
- open_clip's final ``proj`` (a raw 2-D Parameter used as ``pooled @ proj``, so y = x·W with
  no transpose): merged by RegMean on the pooled features (``output_projection="regmean"``)
  or averaged (``"average"``).

Gt is the mean of xᵀx over the layer's input rows (tokens × images), as FusionBench does; with
the same number of images per task this is the paper's sum up to one common factor, which the
solve ignores, and a task with a smaller test split is not down-weighted. Gram collection runs
expert by expert through a Lightning Trainer (``trainer.predict``), so device, precision and
DDP come from the trainer config; per-rank sums are all-reduced. The solve is float32.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab import validate
from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge.accumulate import ExpertAccumulator, predict_pass
from mergelab.merge.base import AdaptiveMerge, StateDict, check_experts
from mergelab.surgery.unlabeled import unlabeled_loader

log = logging.getLogger(__name__)

OUTPUT_PROJECTIONS = ("regmean", "average")


# --------------------------------------------------------------------------------------------
# Linear layers of an encoder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSite:
    """One linear map of the encoder: the state-dict key of its weight, the width of its
    input, and the convention (``transposed``: y = x·Wᵀ as torch stores it; else y = x·W)."""

    key: str
    in_dim: int
    transposed: bool = True


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def linear_sites(encoder: nn.Module, output_projection: str = "regmean") -> list[LinearSite]:
    """The linear maps RegMean merges, discovered from ``encoder`` (see the module docstring).

    Raises ConfigError for an attention module RegMean cannot read (separate q/k/v weights).
    """
    if output_projection not in OUTPUT_PROJECTIONS:
        raise ConfigError(
            f"merge.output_projection must be one of {', '.join(OUTPUT_PROJECTIONS)}; "
            f"got {output_projection!r}"
        )
    keys = set(encoder.state_dict().keys())
    sites: list[LinearSite] = []
    inside_attention: set[int] = set()
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            if not mod._qkv_same_embed_dim:
                raise ConfigError(
                    f"RegMean: attention {name!r} has separate q/k/v weights (kdim/vdim != "
                    "embed_dim); only the fused self-attention in_proj is supported"
                )
            sites.append(LinearSite(_qualified(name, "in_proj_weight"), mod.embed_dim))
            sites.append(LinearSite(_qualified(name, "out_proj.weight"), mod.embed_dim))
            inside_attention.add(id(mod.out_proj))
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in inside_attention:
            sites.append(LinearSite(_qualified(name, "weight"), mod.in_features))
    proj = getattr(encoder, "proj", None)
    if output_projection == "regmean" and isinstance(proj, nn.Parameter) and proj.ndim == 2:
        sites.append(LinearSite("proj", int(proj.shape[0]), transposed=False))
    missing = [s.key for s in sites if s.key not in keys]
    if missing:
        raise ConfigError(
            f"RegMean: linear weight {missing[0]!r} is not a key of the encoder's state dict"
        )
    return sites


# --------------------------------------------------------------------------------------------
# Gram matrices, collected by a Lightning predict pass
# --------------------------------------------------------------------------------------------


class GramCollector(L.LightningModule):
    """Runs ``encoder`` over unlabeled images (``trainer.predict``) and accumulates, for every
    :class:`LinearSite`, Σ xᵀx over the layer's input rows and the number of rows.

    Hooks only read activations; the forward itself is unchanged, except that open_clip's
    ``proj`` is detached for the pass (when it is a site) so that the encoder's output is
    ``proj``'s input.
    """

    def __init__(self, encoder: nn.Module, sites: list[LinearSite]):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.sites = list(sites)
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, Tensor] = {}
        self._handles: list = []

    # -- accumulation ------------------------------------------------------------------------

    def _add(self, key: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        # float32 with autocast off: under bf16-mixed the activations are bf16, and a Gram
        # summed over thousands of rows must not be accumulated in bf16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            self.sums[key].addmm_(x.t(), x)
        self.rows[key] += x.shape[0]

    def _linear_hook(self, key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._add(key, args[0])

        return hook

    def _attention_hook(self, name: str):
        in_key = _qualified(name, "in_proj_weight")
        out_key = _qualified(name, "out_proj.weight")

        def hook(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> None:
            bound = inspect.signature(mha.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            query, key, value = a["query"], a["key"], a["value"]
            same = (key is query or torch.equal(key, query)) and (
                value is query or torch.equal(value, query)
            )
            if not same:
                raise ConfigError(
                    f"RegMean: attention {name!r} was called with distinct query/key/value "
                    "(cross-attention); one Gram per fused in_proj needs self-attention"
                )
            self._add(in_key, query)
            self._add(out_key, _attention_values(mha, query, a))

        return hook

    def _output_hook(self, module: nn.Module, args: tuple, output) -> None:
        self._add("proj", output[0] if isinstance(output, (tuple, list)) else output)

    # -- Lightning ---------------------------------------------------------------------------

    def on_predict_start(self) -> None:
        dev = next(self.encoder.parameters()).device
        # Allocated for every site up front: every rank must all-reduce the same tensors,
        # even a rank that received no batch.
        self.sums = {s.key: torch.zeros(s.in_dim, s.in_dim, device=dev) for s in self.sites}
        self.rows = {s.key: torch.zeros((), dtype=torch.float64, device=dev) for s in self.sites}
        modules = dict(self.encoder.named_modules())
        keys = {s.key for s in self.sites}
        for name, mod in modules.items():
            if isinstance(mod, nn.MultiheadAttention):
                self._handles.append(
                    mod.register_forward_hook(self._attention_hook(name), with_kwargs=True)
                )
            elif isinstance(mod, nn.Linear) and _qualified(name, "weight") in keys:
                key = _qualified(name, "weight")
                self._handles.append(mod.register_forward_pre_hook(self._linear_hook(key)))
        if "proj" in keys:
            self._proj = self.encoder.proj
            self.encoder.proj = None  # open_clip: `if self.proj is not None: pooled @ proj`
            self._handles.append(self.encoder.register_forward_hook(self._output_hook))

    def predict_step(self, batch: Tensor, batch_idx: int) -> None:
        self.encoder(batch)

    def on_predict_epoch_end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if "proj" in self.sums:
            self.encoder.proj = self._proj
        strategy = self.trainer.strategy
        for key in self.sums:
            self.sums[key] = strategy.reduce(self.sums[key], reduce_op="sum")
            self.rows[key] = strategy.reduce(self.rows[key], reduce_op="sum")

    def grams(self) -> dict[str, Tensor]:
        """Gt per site key: the mean of xᵀx over the input rows (float32, CPU)."""
        out = {}
        for key, s in self.sums.items():
            n = float(self.rows[key])
            if n == 0:
                raise ConfigError(
                    f"RegMean: linear layer {key!r} received no input during the Gram pass; "
                    "its forward never ran on this encoder"
                )
            out[key] = (s / n).cpu()
        return out


def _attention_values(mha: nn.MultiheadAttention, query: Tensor, a: Mapping) -> Tensor:
    """The input of ``mha.out_proj`` for self-attention on ``query``: the same attention with
    an identity output projection (nn.MultiheadAttention never calls out_proj's forward)."""
    x = query
    if mha.batch_first and x.dim() == 3:
        x = x.transpose(0, 1)
    eye = torch.eye(mha.embed_dim, dtype=x.dtype, device=x.device)
    out, _ = F.multi_head_attention_forward(
        x,
        x,
        x,
        mha.embed_dim,
        mha.num_heads,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        0.0,
        eye,
        None,
        training=False,
        key_padding_mask=a.get("key_padding_mask"),
        need_weights=False,
        attn_mask=a.get("attn_mask"),
        is_causal=bool(a.get("is_causal", False)),
    )
    return out


def collect_grams(
    encoder: nn.Module,
    sites: list[LinearSite],
    loader,
    ctx,
) -> dict[str, Tensor]:
    """Gram matrix Gt (mean of xᵀx over input rows) of every site's input on ``loader``'s
    images, computed by ``trainer.predict`` with the run context's Trainer."""
    return predict_pass(lambda: GramCollector(encoder, sites), loader, ctx, GramCollector.grams)


# --------------------------------------------------------------------------------------------
# The closed form
# --------------------------------------------------------------------------------------------


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α·G + (1 − α)·diag(G): RegMean's scaling of the off-diagonal entries."""
    out = gram.float() * alpha
    out.diagonal().add_(gram.float().diagonal(), alpha=1.0 - alpha)
    return out


class NormalEquations:
    """Σt G̃t and Σt G̃t·Wtᵀ for one linear map, accumulated one expert at a time, so that the
    Grams of all tasks are never held at once."""

    def __init__(self, site: LinearSite):
        self.site = site
        self.lhs: Tensor | None = None
        self.rhs: Tensor | None = None
        self.weight_sum: Tensor | None = None
        self.count = 0

    def add(self, gram: Tensor, weight: Tensor, alpha: float) -> None:
        g = shrink_gram(gram, alpha)
        w = weight.float()
        w_in_out = w.t() if self.site.transposed else w  # (in, out): y = x · w_in_out
        if w_in_out.shape[0] != g.shape[0]:
            raise CheckpointError(
                f"RegMean: weight {self.site.key!r} has input width {w_in_out.shape[0]}, "
                f"its Gram matrix {g.shape[0]}"
            )
        rhs = g @ w_in_out
        if self.lhs is None:
            self.lhs, self.rhs, self.weight_sum = g, rhs, w.clone()
        else:
            self.lhs += g
            self.rhs += rhs
            self.weight_sum += w
        self.count += 1

    def solve(self) -> Tensor:
        """W* in the weight's own layout. Input dimensions that are zero in every task's data
        (zero diagonal) do not enter any expert's outputs; their weights are the experts'
        mean, and the system is solved on the others."""
        lhs, rhs = self.lhs, self.rhs
        mean = self.weight_sum / self.count
        live = lhs.diagonal() > 0
        if bool(live.all()):
            sol, info = torch.linalg.solve_ex(lhs, rhs)
        else:
            sol = (mean.t() if self.site.transposed else mean).clone()
            part, info = torch.linalg.solve_ex(lhs[live][:, live], rhs[live])
            sol[live] = part
        if int(info) != 0 or not bool(torch.isfinite(sol).all()):
            raise ConfigError(
                f"RegMean: the summed Gram matrix of {self.site.key!r} is singular; use "
                "merge.alpha < 1 (its diagonal regularises the solve) or more num_samples"
            )
        return sol.t() if self.site.transposed else sol


def regmean_weight(
    weights: list[Tensor], grams: list[Tensor], alpha: float = 0.95, transposed: bool = True
) -> Tensor:
    """The RegMean merge of one linear map from the experts' weights and Gram matrices
    (W*ᵀ = (Σ G̃t)⁻¹ Σ G̃t Wtᵀ for ``transposed`` torch weights; W* = (Σ G̃t)⁻¹ Σ G̃t Wt else)."""
    eq = NormalEquations(LinearSite("weight", grams[0].shape[0], transposed))
    for w, g in zip(weights, grams):
        eq.add(g, w, alpha)
    return eq.solve()


# --------------------------------------------------------------------------------------------
# The merge method
# --------------------------------------------------------------------------------------------


class RegMean(AdaptiveMerge):
    """RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): per linear layer
    W*ᵀ = (Σt G̃t)⁻¹ Σt G̃t Wtᵀ with G̃t = α·Gt + (1 − α)·diag(Gt) from each expert's inputs
    on unlabeled test images of its task; every other parameter is the experts' mean.

    Args:
        alpha: off-diagonal scaling α of the Gram matrices (0.95 in the paper; 1 = plain
            least squares, 0 = diagonal Grams).
        num_samples: unlabeled test images per task (all of the split when ``None`` or larger
            than it; FusionBench uses 256).
        batch_size: images per forward pass of the Gram collection.
        output_projection: open_clip's final ``proj`` parameter: ``"regmean"`` (merged as a
            linear map on the pooled features) or ``"average"``.
        seed: seed of the per-task sample (``None``: the run context's seed).
    """

    name = "regmean"

    def __init__(
        self,
        alpha: float = 0.95,
        num_samples: int | None = 256,
        batch_size: int = 32,
        output_projection: str = "regmean",
        seed: int | None = None,
    ):
        self.alpha = validate.fraction("merge.alpha", alpha)
        # null: all of each task's data
        self.num_samples = validate.integer("merge.num_samples", num_samples, optional=True)
        self.batch_size = validate.integer("merge.batch_size", batch_size)
        self.output_projection = validate.choice(
            "merge.output_projection", output_projection, OUTPUT_PROJECTIONS
        )
        self.seed = validate.integer("merge.seed", seed, minimum=None, optional=True)
        # Filled by fit(): which keys were solved, which averaged.
        self.regmean_keys_: list[str] = []
        self.averaged_keys_: list[str] = []

    def __repr__(self) -> str:
        return (
            f"RegMean(alpha={self.alpha}, num_samples={self.num_samples}, "
            f"batch_size={self.batch_size}, output_projection={self.output_projection!r})"
        )

    def fit(self, pool, ctx) -> StateDict:
        """Collect each expert's Gram matrices on its task's unlabeled test images (one
        expert in memory at a time), then solve every linear map and average the rest.
        Returns a CPU state dict with the pretrained checkpoint's keys and dtypes."""
        tasks = list(pool.tasks)
        missing = [t for t in tasks if t not in pool.experts or t not in pool.test_sets]
        if missing:
            raise ConfigError(f"RegMean needs an expert and test data for task {missing[0]!r}")
        experts = {t: pool.experts[t] for t in tasks}
        check_experts(pool.pretrained, experts)
        seed = self.seed if self.seed is not None else ctx.seed
        pretrained = pool.pretrained

        sites: list[LinearSite] | None = None
        equations: dict[str, NormalEquations] = {}
        acc = ExpertAccumulator(pretrained, "RegMean")

        def update(key: str, value: Tensor, gram: Tensor) -> None:
            equations[key].add(gram, value, self.alpha)

        for i, task in enumerate(tasks):
            if len(pool.test_sets[task]) == 0:
                raise ConfigError(f"task {task!r} has an empty test split; RegMean needs data")
            encoder = pool.expert_encoder(task)
            if sites is None:
                sites = linear_sites(encoder, self.output_projection)
                equations = {s.key: NormalEquations(s) for s in sites}
            loader = unlabeled_loader(
                pool.test_sets[task], self.num_samples, self.batch_size, seed + i, ctx.num_workers
            )
            grams = collect_grams(encoder, sites, loader, ctx)
            del encoder  # one expert in memory at a time
            acc.add(task, experts[task], grams, update)

        out = acc.result(lambda key: equations[key].solve())
        self.regmean_keys_ = [k for k in pretrained if k in equations]
        self.averaged_keys_ = [
            k for k in pretrained if k not in equations and pretrained[k].is_floating_point()
        ]
        log.info(
            "RegMean: %d linear maps solved, %d tensors averaged",
            len(self.regmean_keys_),
            len(self.averaged_keys_),
        )
        return out
