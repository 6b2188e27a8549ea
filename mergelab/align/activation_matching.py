"""Activation matching (Git Re-Basin, Ainsworth et al., ICLR 2023, arXiv 2209.04836, §3.1).

Run both models on the same unlabeled images; at every permuted site take the Pearson
correlation between each reference unit i and each unit j of the model being aligned, over
all tokens of all images:

    corr[i, j] = cov(a_i, b_j) / (σ(a_i) σ(b_j))

and assign each permutation by Hungarian matching on its correlation (summed over its sites:
the residual stream is read after ln_pre and after every block). Each permutation is solved
once, from the two unpermuted models — activations at a site do not depend on how other
layers are permuted. Heads use the same nested assignment as weight matching: per head
pair the best within-head channel matching of q and k (shared) and of v, then the heads.

Embedding rotation (``embedding: procrustes``, non-local pools; why: :mod:`mergelab.align.base`):
in the same forward pass both models' output embeddings are read, normalised to unit length
(what a cosine head sees), and Q is the orthogonal Procrustes solution of ``F_B Q ≈ F_A`` —
from the uncentred cross-product ``F_Bᵀ F_A`` (a rotation about the origin is the symmetry,
so the features are not centred). Permutations never change the output, so Q can be measured
on the unpermuted models.

The forward passes run through the run's Lightning Trainer (``trainer.predict``), so the
user's device, precision and strategy apply; under DDP each process sees a shard and the
moments are combined exactly across processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from mergelab import validate
from mergelab.align.assign import assign_heads, assign_units
from mergelab.align.base import Alignment, procrustes_cross, weight_cosine
from mergelab.align.spec import WITHIN, Perms, PermutationSpec, Site
from mergelab.context import RunContext
from mergelab.errors import ConfigError
from mergelab.pool.base import ModelPool
from mergelab.surgery.stats import unlabeled_loader


class CrossMoments:
    """Running moments of paired features a (n channels) and b (m channels): means, the
    variances and the n × m cross-covariance, merged batch by batch with Chan et al.'s
    pairwise update (each batch centred on its own mean, so large channel means — CLIP's
    residual stream has some — do not cancel catastrophically)."""

    def __init__(self) -> None:
        self.n = 0
        self.ma = self.mb = self.va = self.vb = self.cab = None

    def update(self, a: Tensor, b: Tensor) -> None:
        nb = a.shape[0]
        ma_b, mb_b = a.mean(0), b.mean(0)
        ac, bc = a - ma_b, b - mb_b
        self.merge(nb, ma_b.double(), mb_b.double(), (ac * ac).sum(0).double(),
                   (bc * bc).sum(0).double(), ac.T @ bc)  # fmt: skip

    def merge(self, n, ma, mb, va, vb, cab) -> None:
        """Fold in the moments of another sample (sums of squares / cross-products about
        its own means)."""
        if self.n == 0:
            self.n, self.ma, self.mb, self.va, self.vb, self.cab = n, ma, mb, va, vb, cab.clone()
            return
        tot = self.n + n
        da, db = ma - self.ma, mb - self.mb
        w = self.n * n / tot
        self.va = self.va + va + w * da * da
        self.vb = self.vb + vb + w * db * db
        self.cab += cab + (w * da[:, None] * db[None, :]).to(cab.dtype)
        self.ma = self.ma + da * (n / tot)
        self.mb = self.mb + db * (n / tot)
        self.n = tot

    def state(self) -> list[Tensor]:
        return [torch.tensor(float(self.n), dtype=torch.float64, device=self.ma.device),
                self.ma, self.mb, self.va, self.vb, self.cab]  # fmt: skip

    def corr(self, eps: float) -> Tensor:
        """Pearson correlation, n × m (``eps`` added to the variances: dead units → 0)."""
        sa = (self.va / self.n + eps).sqrt()
        sb = (self.vb / self.n + eps).sqrt()
        return (self.cab.double() / self.n) / (sa[:, None] * sb[None, :])


class _Collect(L.LightningModule):
    """Holds the reference and the other encoder; each predict step runs both on the batch
    and updates the cross-moments of every site."""

    def __init__(self, ref: nn.Module, other: nn.Module, sites: list[Site]):
        super().__init__()
        self.ref, self.other = ref.requires_grad_(False), other.requires_grad_(False)
        self.sites = sites
        self.moments = [CrossMoments() for _ in sites]
        self._seen: dict[tuple[str, str], Tensor] = {}
        self._hooks: list = []

    def on_predict_start(self) -> None:
        for tag, model in (("ref", self.ref), ("other", self.other)):
            mods = dict(model.named_modules())
            for name, io in {(s.module, s.io) for s in self.sites}:
                if name not in mods:
                    raise ConfigError(
                        f"align: activation site {name!r} is not a module of the model"
                    )
                self._hooks.append(_hook(mods[name], io, self._seen, (tag, name, io)))

    def on_predict_end(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        feats = {}
        for tag, model in (("ref", self.ref), ("other", self.other)):
            self._seen.clear()
            model(x)
            params = dict(model.named_parameters())
            feats[tag] = [self._features(s, tag, params) for s in self.sites]
        for m, a, b in zip(self.moments, feats["ref"], feats["other"]):
            m.update(a, b)

    def _features(self, site: Site, tag: str, params: Mapping[str, Tensor]) -> Tensor:
        t = self._seen[(tag, site.module, site.io)]
        t = t.reshape(-1, t.shape[-1]).float()  # every token of every image
        if site.weight is not None:
            lo, hi = site.rows
            t = t @ params[site.weight][lo:hi].float().T
            if site.bias is not None:
                t = t + params[site.bias][lo:hi].float()
        if site.normalize:
            t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return t


def _hook(module: nn.Module, io: str, store: dict, key: tuple) -> Any:
    if io == "in":

        def pre(_m, args):
            store[key] = args[0]

        return module.register_forward_pre_hook(pre)

    def post(_m, _args, out):
        store[key] = out[0] if isinstance(out, (tuple, list)) else out

    return module.register_forward_hook(post)


def correlations(
    spec: PermutationSpec,
    ref: nn.Module,
    other: nn.Module,
    loaders: list,
    ctx: RunContext,
    eps: float,
) -> dict[str, dict[str, list[Tensor]]]:
    """coordinate → part → one correlation matrix per site (reference × other, on CPU)."""
    return _measure(spec, ref, other, loaders, ctx, eps, embedding=False)[0]


EMBEDDING_SITE = Site("", "out", normalize=True)


def _measure(
    spec: PermutationSpec,
    ref: nn.Module,
    other: nn.Module,
    loaders: list,
    ctx: RunContext,
    eps: float,
    embedding: bool,
) -> tuple[dict[str, dict[str, list[Tensor]]], Tensor | None, int]:
    """:func:`correlations`, (``embedding``) the uncentred cross-product F_otherᵀ F_ref of
    both models' unit-normalised output embeddings (d × d, float64, on CPU), and the number
    of images seen — from one pass over the data."""
    flat = [
        (c, part, s) for c, parts in spec.sites.items() for part, ss in parts.items() for s in ss
    ]
    sites = [s for _, _, s in flat] + ([EMBEDDING_SITE] if embedding else [])
    module = _Collect(ref, other, sites)
    trainer = ctx.make_trainer(logger=False)
    trainer.predict(module, dataloaders=loaders, return_predictions=False)
    if trainer.world_size > 1:
        _combine_across_processes(module)
    if module.moments and module.moments[0].n == 0:
        raise ConfigError("align: activation matching saw no images (empty unlabeled data)")
    out: dict[str, dict[str, list[Tensor]]] = {}
    for (c, part, _), m in zip(flat, module.moments):
        out.setdefault(c, {}).setdefault(part, []).append(m.corr(eps).cpu())
    cross, n = None, module.moments[-1].n if module.moments else 0
    if embedding:
        m = module.moments[-1]  # Σ a bᵀ = Σ (a − ā)(b − b̄)ᵀ + n ā b̄ᵀ
        cross = (m.cab.double() + m.n * m.ma[:, None] * m.mb[None, :]).T.cpu()
    return out, cross, n


def _combine_across_processes(module: _Collect) -> None:
    """Every process holds the moments of its shard; gather them all and merge in rank
    order, so every process ends with identical statistics (and identical permutations)."""
    for m in module.moments:
        gathered = [module.all_gather(t) for t in m.state()]  # each (world, ...)
        merged = CrossMoments()
        for r in range(gathered[0].shape[0]):
            n, ma, mb, va, vb, cab = (g[r] for g in gathered)
            if int(n) > 0:
                merged.merge(int(n), ma, mb, va, vb, cab)
        m.__dict__.update(merged.__dict__)


def activation_matching(
    spec: PermutationSpec, corr: Mapping[str, Mapping[str, list[Tensor]]], within_head: bool = True
) -> Perms:
    """Permutations from per-site correlations: each unit permutation by one assignment on
    its summed correlation, each head group by the nested head assignment."""
    perms = spec.identity()
    for c, parts in corr.items():
        if c in spec.units:
            perms.units[c] = assign_units(sum(parts[""]))
        else:
            H, hd = spec.heads[c].n_heads, spec.heads[c].head_dim
            blocks = {
                w: sum(parts[w]).reshape(H, hd, H, hd).permute(0, 2, 1, 3)
                for w in WITHIN
                if w in parts
            }
            perms.heads[c] = assign_heads(blocks, within_head)
    return perms


def mean_matched_corr(
    spec: PermutationSpec, corr: Mapping[str, Mapping[str, list[Tensor]]], perms: Perms
) -> float:
    """Mean over sites of the mean correlation between each unit and the unit it is matched
    with (identity perms: before alignment)."""
    vals = []
    for c, parts in corr.items():
        for part, mats in parts.items():
            if c in spec.units:
                idx = perms.units[c]
            else:
                hp, hd = perms.heads[c], spec.heads[c].head_dim
                idx = (hp.order[:, None] * hd + hp.within(part)).reshape(-1)
            for m in mats:
                vals.append(float(m[torch.arange(len(idx)), idx].mean()))
    return sum(vals) / len(vals) if vals else float("nan")


class ActivationMatching(Alignment):
    """``align=activation_matching``: Git Re-Basin activation matching (arXiv 2209.04836).

    ``num_samples`` unlabeled images per task (drawn with ``seed``; the test split, as the
    merging papers use it for adaptation) are run through both models in batches of
    ``batch_size``; ``eps`` is added to the variances of the correlations; ``within_head``
    also matches channels inside each attention head. ``embedding``: ``procrustes`` also
    rotates each foundation's output embedding onto the reference's, by Procrustes on the
    unit-normalised embeddings of the same images (non-local pools; see the module
    docstring), ``none`` does not.

    What is aligned: in a non-local pool, each foundation to the reference foundation on the
    images of every task (the foundations are generic models; each expert then takes its
    foundation's permutation, keeping θt − θ0 in one coordinate system); in a local pool,
    each expert to ``pretrained`` on its own task's images.
    """

    name = "activation_matching"

    def __init__(
        self,
        num_samples: int = 256,
        batch_size: int = 64,
        within_head: bool = True,
        eps: float = 1e-6,
        seed: int = 0,
        embedding: str = "procrustes",
    ):
        super().__init__(embedding)
        self.num_samples = validate.integer("align.num_samples", num_samples, minimum=2)
        self.batch_size = validate.integer("align.batch_size", batch_size)
        self.within_head = bool(within_head)
        self.eps = validate.number("align.eps", eps, gt=0)
        self.seed = validate.integer("align.seed", seed, minimum=None)

    def find(
        self,
        spec: PermutationSpec,
        ref: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        pool: ModelPool,
        ctx: RunContext,
        tasks: list[str],
        rotate: bool = False,
    ) -> tuple[Perms, dict[str, Any]]:
        if not tasks:
            raise ConfigError("align: activation matching needs unlabeled data, the pool has none")
        ref, other = dict(ref.items()), dict(other.items())
        loaders = [
            unlabeled_loader(
                pool.test_sets[t], self.num_samples, self.batch_size, self.seed, ctx.num_workers
            )  # fmt: skip
            for t in tasks
        ]
        corr, cross, n = _measure(
            spec, pool.encoder(ref, "align reference"), pool.encoder(other, "align model"),
            loaders, ctx, self.eps, embedding=rotate,
        )  # fmt: skip
        perms = activation_matching(spec, corr, self.within_head)
        info: dict[str, Any] = {}
        if rotate:
            perms.embedding = procrustes_cross(cross)
            # mean cosine between the two models' embeddings of an image: tr(Qᵀ F_Bᵀ F_A) / n
            info["embedding_cos_before"] = float(cross.trace()) / n
            info["embedding_cos_after"] = float((perms.embedding * cross).sum()) / n
        return perms, {
            **info,
            "activation_corr_before": mean_matched_corr(spec, corr, spec.identity()),
            "activation_corr_after": mean_matched_corr(spec, corr, perms),
            "weight_cosine_before": weight_cosine(spec, ref, other, spec.identity()),
            "weight_cosine_after": weight_cosine(spec, ref, other, perms),
        }
