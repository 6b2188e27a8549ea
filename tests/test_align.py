"""Permutation alignment (Git Re-Basin weight / activation matching, arXiv 2209.04836).

Known answers: a model whose residual channels, attention heads (and channels inside them)
and MLP units were randomly permuted computes the same function and is aligned back to the
original exactly; a model aligned to itself gets the identity; an aligned model computes
what it computed before; unsupported architectures are refused; the CLI composes alignment
with a merge and a surgery kind.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergelab.align.activation_matching import (
    ActivationMatching,
    CrossMoments,
    activation_matching,
    correlations,
)
from mergelab.align.archs import spec_for
from mergelab.align.base import procrustes, rotate_head, weight_cosine
from mergelab.align.weight_matching import WeightMatching, embedding_rotation, weight_matching
from mergelab.context import RunContext
from mergelab.errors import ConfigError
from mergelab.pool.base import ModelPool
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.vit import build_openclip_vision
from mergelab.surgery.stats import unlabeled_loader
from mergelab.zoo.synthetic import synthetic_pool

VIT = dict(image_size=16, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0)


def vit(seed: int, **over) -> nn.Module:
    """A random tiny open_clip ViT; LayerNorms and biases are randomised too (a fresh one
    has LN = 1/0 and zero biases, which any permutation leaves equal)."""
    torch.manual_seed(seed)
    m = build_openclip_vision(16, **{**VIT, **over}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def loaded(state, **over) -> nn.Module:
    m = vit(0, **over)
    m.load_state_dict(state)
    return m


def images(n: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def permuted(seed: int = 1, within_head: bool = True):
    """(spec, original state, permutation, permuted state) of a random tiny open_clip ViT."""
    model = vit(0)
    spec = spec_for(model)
    sd = model.state_dict()
    P = spec.random(torch.Generator().manual_seed(seed), within_head)
    return spec, sd, P, spec.apply(sd, P)


def assert_same_state(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_spec_reads_depth_width_heads_from_the_model():
    spec = spec_for(vit(0, layers=3, width=48, head_width=12, mlp_ratio=3.0))
    assert spec.units == {"res": 48, "mlp.0": 144, "mlp.1": 144, "mlp.2": 144}
    assert [(h.n_heads, h.head_dim) for h in spec.heads.values()] == [(4, 12)] * 3
    assert set(spec.axes) == set(vit(0, layers=3, width=48, head_width=12).state_dict())


def test_a_permutation_never_changes_the_function():
    spec, sd, P, psd = permuted()
    x = images()
    moved = sum(not torch.equal(sd[k], psd[k]) for k in sd)
    assert moved == len(sd)  # every tensor of a ViT touches the residual stream
    assert P.moved()["units"] > 0.9 and P.moved()["heads"] > 0 and P.moved()["within_head"] > 0.5
    torch.testing.assert_close(loaded(psd)(x), vit(0)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("within_head", [True, False])
def test_weight_matching_recovers_a_permuted_model_exactly(within_head):
    spec, sd, P, psd = permuted(seed=3, within_head=within_head)
    Q, sweeps = weight_matching(spec, sd, psd, within_head=within_head, seed=7)
    back = spec.apply(psd, Q)
    assert_same_state(back, sd)
    x = images()
    assert torch.equal(loaded(back)(x), vit(0)(x))
    assert weight_cosine(spec, sd, psd, spec.identity()) < 0.5
    assert weight_cosine(spec, sd, psd, Q) == pytest.approx(1.0, abs=1e-9)
    assert 1 < sweeps < 100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_recovers_a_fresh_deep_tower_whose_blocks_dominate(seed):
    """A freshly initialised tower (LayerNorms 1, biases 0: no signal there) whose blocks
    hold most of the weights: the residual stream is identified only by the patch
    embedding, positions and projection. Solving the stream after the blocks gets stuck at
    the identity (5 of 6 seeds did before the hubs-first first sweep); this pins the fix."""
    cfg = dict(image_size=8, patch_size=4, width=32, layers=6, head_width=8, mlp_ratio=8.0)
    torch.manual_seed(seed)
    model = build_openclip_vision(8, **cfg)
    spec, sd = spec_for(model), model.state_dict()
    psd = spec.apply(sd, spec.random(torch.Generator().manual_seed(100 + seed)))
    Q, _ = weight_matching(spec, sd, psd, seed=seed)
    assert_same_state(spec.apply(psd, Q), sd)


def test_activation_matching_recovers_a_permuted_model_exactly(tmp_path):
    spec, sd, P, psd = permuted(seed=4)
    loader = unlabeled_loader(TensorDataset(images(32, 9)), None, 8, 0)
    corr = correlations(spec, vit(0), loaded(psd), [loader], RunContext(tmp_path), 1e-6)
    back = spec.apply(psd, activation_matching(spec, corr))
    assert_same_state(back, sd)


def test_aligning_a_model_to_itself_is_the_identity(tmp_path):
    spec, sd = spec_for(vit(2)), vit(2).state_dict()
    Q, sweeps = weight_matching(spec, sd, sd)
    assert Q.is_identity() and sweeps == 1
    loader = unlabeled_loader(TensorDataset(images(16)), None, 8, 0)
    corr = correlations(spec, vit(2), vit(2), [loader], RunContext(tmp_path), 1e-6)
    assert activation_matching(spec, corr).is_identity()


def test_aligning_an_independent_model_keeps_its_function_and_raises_the_objective():
    a, b = vit(10), vit(11)
    spec = spec_for(a)
    Q, _ = weight_matching(spec, a.state_dict(), b.state_dict())
    aligned = loaded(spec.apply(b.state_dict(), Q))
    x = images()
    torch.testing.assert_close(aligned(x), b(x), atol=1e-5, rtol=1e-5)
    before = weight_cosine(spec, a.state_dict(), b.state_dict(), spec.identity())
    after = weight_cosine(spec, a.state_dict(), b.state_dict(), Q)
    assert after > before + 0.01
    assert not Q.is_identity()


def test_cross_moments_merge_exactly_and_give_pearson_correlation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 3, generator=g) * 3 + 100  # large means must not cancel
    b = torch.cat([a[:, :1] * 2 + torch.randn(50, 1, generator=g), torch.randn(50, 2)], 1)
    whole, parts = CrossMoments(), CrossMoments()
    whole.update(a, b)
    for i in range(0, 50, 7):
        parts.update(a[i : i + 7], b[i : i + 7])
    want = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:3, 3:]
    np.testing.assert_allclose(whole.corr(0.0).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(parts.corr(0.0).numpy(), want, atol=1e-6)


# ------------------------------------------------------------------ unsupported / HF
def test_unsupported_architectures_are_refused():
    with pytest.raises(ConfigError, match="no permutation spec for Sequential"):
        spec_for(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(ConfigError, match="CustomResidualAttentionBlock"):
        spec_for(vit(0, qk_norm=True))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit, self.extra = vit(0), nn.Linear(16, 16)

    with pytest.raises(ConfigError, match="'extra.weight'"):
        spec_for(Wrapped())


def test_hf_clip_heads_and_mlp_units_are_recovered_exactly():
    transformers = pytest.importorskip("transformers")
    from mergelab.pool.hf import HFCLIPImageEncoder

    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    proj = torch.randn(16, 32)
    enc = HFCLIPImageEncoder(cfg, proj).eval()
    spec = spec_for(enc)
    assert "res" not in spec.units and len(spec.heads) == 2  # the stream stays fixed
    sd = enc.state_dict()
    psd = spec.apply(sd, spec.random(torch.Generator().manual_seed(1)))
    other = HFCLIPImageEncoder(cfg, proj).eval()
    other.load_state_dict(psd)
    x = images()
    torch.testing.assert_close(other(x), enc(x), atol=1e-5, rtol=1e-5)
    Q, _ = weight_matching(spec, sd, psd)
    assert_same_state(spec.apply(psd, Q), sd)


# ------------------------------------------------------------------ pools
def _nonlocal_pool(seed: int = 0) -> tuple[ModelPool, dict]:
    """Two foundations where the second IS the first, permuted; experts = own base + δt
    (foundation b's experts permuted like b). Aligned, every expert must come back as
    θ_a + δt exactly, and θ0 = θ_a."""
    spec, theta_a, P, theta_b = permuted(seed=seed + 11)
    g = torch.Generator().manual_seed(seed)
    deltas = {t: {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in theta_a.items()}
              for t in ("t0", "t1", "t2")}  # fmt: skip
    unperm = {t: {k: theta_a[k] + d[k] for k in d} for t, d in deltas.items()}
    where = {"t0": "a", "t1": "b", "t2": "b"}
    experts = {t: (spec.apply(unperm[t], P) if where[t] == "b" else unperm[t]) for t in unperm}
    data = {t: TensorDataset(images(16, i)) for i, t in enumerate(unperm)}
    pool = ModelPool(
        family="synthetic", backbone="vit", tasks=list(unperm),
        encoder_factory=lambda: build_openclip_vision(16, **VIT),
        pretrained={k: (theta_a[k] + theta_b[k]) / 2 for k in theta_a},
        experts=experts, heads={t: ClassificationHead(torch.randn(3, 16)) for t in unperm},
        test_sets=data, bases={"a": theta_a, "b": theta_b}, expert_base=where,
    )  # fmt: skip
    return pool, {"theta_a": theta_a, "unperm": unperm, "pretrained": dict(pool.pretrained)}


@pytest.mark.parametrize(
    "method",
    [
        WeightMatching(seed=3, embedding="none"),
        ActivationMatching(num_samples=16, batch_size=8, embedding="none"),
    ],
    ids=["weight_matching", "activation_matching"],
)
def test_nonlocal_pool_aligns_bases_then_averages_them(method, tmp_path):
    """Permutations only (bit-exact); the embedding rotation is tested below, to rounding."""
    pool, want = _nonlocal_pool()
    before = {t: {k: v.clone() for k, v in pool.experts[t].items()} for t in pool.experts}
    new = method.align(pool, RunContext(tmp_path))
    assert_same_state(dict(new.pretrained.items()), want["theta_a"])
    for t in pool.tasks:
        assert_same_state(dict(new.experts[t].items()), want["unperm"][t])
        assert_same_state(dict(new.base_of(t).items()), want["theta_a"])
        assert_same_state(dict(pool.experts[t].items()), before[t])  # input untouched
    assert_same_state(dict(pool.pretrained.items()), want["pretrained"])
    assert new.meta["align"]["method"] == method.name and new.meta["align"]["reference"] == "a"
    rep = method.report
    assert rep["aligned"] == "foundations" and set(rep["models"]) == {"b"}
    assert rep["mean_weight_cosine_after"] == pytest.approx(1.0, abs=1e-9)
    assert rep["mean_weight_cosine_before"] < 0.5 and rep["seconds_per_expert"] >= 0
    assert "align" not in pool.meta


def test_expert_without_a_known_foundation_is_a_config_error(tmp_path):
    pool, _ = _nonlocal_pool()
    pool.expert_base["t2"] = "zzz"
    with pytest.raises(ConfigError, match="'t2' has no foundation.*'zzz'"):
        WeightMatching().align(pool, RunContext(tmp_path))


def test_local_pool_experts_keep_their_function(tmp_path):
    pool = synthetic_pool(n_tasks=2, width=32, layers=2, heads=4, n_images=8, seed=1)
    new = WeightMatching().align(pool, RunContext(tmp_path))
    assert new.pretrained is pool.pretrained
    assert new.meta["align"]["method"] == "weight_matching" and "align" not in pool.meta
    x = images(8)
    for t in pool.tasks:
        torch.testing.assert_close(
            new.expert_encoder(t)(x), pool.expert_encoder(t)(x), atol=1e-5, rtol=1e-5
        )


def test_pool_with_an_unsupported_backbone_is_a_config_error(tmp_path):
    pool = synthetic_pool(n_tasks=1, n_images=4)
    pool = dataclasses.replace(pool, encoder_factory=lambda: nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="align=none"):
        WeightMatching().align(pool, RunContext(tmp_path))


# ------------------------------------------------------------------ end to end
def test_cli_weight_matching_with_ties_and_stats(run_cli, tmp_path):
    out = tmp_path / "run"
    r = run_cli(
        "align=weight_matching", "merge=ties", "surgery=stats", "analysis.bias=false", run_dir=out
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["label"].startswith("weight_matching + ties + surgery stats")
    assert res["align"]["method"] == "weight_matching" and res["align"]["aligned"] == "experts"
    assert res["pool_meta"]["align"]["method"] == "weight_matching"
    assert "align_s" in res["timings"]


def test_activation_matching_runs_in_the_pipeline(tiny_cache, tmp_path):
    from pathlib import Path

    from conftest import compose
    from omegaconf import open_dict

    import mergelab
    from mergelab.pipeline import run

    names = sorted(
        p.stem for p in (Path(mergelab.__file__).parent / "conf" / "align").glob("*.yaml")
    )
    assert names == ["activation_matching", "none", "weight_matching"]
    # none is every other pipeline test's default; weight_matching runs in the CLI test above
    cfg = compose(
        ["align=activation_matching", "merge=task_arithmetic", "analysis.bias=false"], tiny_cache
    )
    with open_dict(cfg):
        cfg.align.num_samples, cfg.align.batch_size = 16, 8
    res = run(cfg, tmp_path)
    assert set(res["accuracy"]) == set(cfg.tasks.names)
    rep = res["align"]
    assert rep["method"] == "activation_matching" and set(rep["models"]) == set(cfg.tasks.names)
    # experts sit next to θ0: matched activations correlate more than identity ones
    assert rep["mean_activation_corr_after"] >= rep["mean_activation_corr_before"] > 0.5


# ------------------------------------------------------------------ embedding rotation
def rotated_pool(seed: int = 0) -> tuple[ModelPool, dict]:
    """Foundation b IS foundation a with its residual channels, heads and MLP units permuted
    AND its output embedding rotated by a random orthogonal R; b's experts and b's tasks'
    (linear, cosine) heads are transformed the same way — every expert computes exactly what
    it computed before. Aligned with the embedding rotation, everything must come back."""
    pool, want = _nonlocal_pool(seed)
    spec = spec_for(vit(0))
    P = spec.random(torch.Generator().manual_seed(seed + 11), rotate=True)  # as _nonlocal_pool's
    R = P.embedding
    experts = {
        t: (spec.apply(want["unperm"][t], P) if pool.expert_base[t] == "b" else want["unperm"][t])
        for t in pool.tasks
    }
    heads = {
        t: ClassificationHead((h.weight.double() @ R).float()) if pool.expert_base[t] == "b" else h
        for t, h in pool.heads.items()
    }
    theta_b = spec.apply(want["theta_a"], P)
    original_heads = pool.heads
    pool = dataclasses.replace(
        pool, experts=experts, heads=heads, bases={"a": want["theta_a"], "b": theta_b}
    )
    return pool, {**want, "heads": original_heads}


def expert_logits(pool: ModelPool, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: pool.heads[t](pool.expert_encoder(t)(x)) for t in pool.tasks}


def test_rotating_the_embedding_with_the_head_never_changes_the_logits():
    spec, sd = spec_for(vit(0)), vit(0).state_dict()
    assert spec.embedding is not None and spec.embedding.dim == 16
    P = spec.random(torch.Generator().manual_seed(2), rotate=True)
    Q = P.embedding
    torch.testing.assert_close(Q.T @ Q, torch.eye(16, dtype=Q.dtype), atol=1e-12, rtol=0)
    assert P.moved()["embedding_rotation"] > 0.5  # a random rotation, far from I
    head = ClassificationHead(torch.randn(5, 16))
    x = images()
    with torch.no_grad():
        f, f_rot = vit(0)(x), loaded(spec.apply(sd, P))(x)
        assert (f - f_rot).abs().max() > 0.1  # the embedding itself did move
        torch.testing.assert_close(f_rot, f @ Q.float(), atol=1e-5, rtol=1e-4)
        rot_head = rotate_head(head, Q)
        torch.testing.assert_close(rot_head(f_rot), head(f), atol=1e-4, rtol=1e-4)
    assert torch.equal(head.weight, ClassificationHead(head.weight).weight)  # input untouched


def test_weight_matching_recovers_a_permuted_and_rotated_model():
    spec, sd = spec_for(vit(0)), vit(0).state_dict()
    P = spec.random(torch.Generator().manual_seed(3), rotate=True)
    psd = spec.apply(sd, P)
    Q, _ = weight_matching(spec, sd, psd, seed=1)
    Q.embedding = embedding_rotation(spec, sd, psd, Q)
    torch.testing.assert_close(Q.embedding, P.embedding.T, atol=1e-6, rtol=0)  # R⁻¹ = Rᵀ
    back = spec.apply(psd, Q)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], atol=1e-6, rtol=1e-6)
    assert weight_cosine(spec, sd, psd, Q) == pytest.approx(1.0, abs=1e-9)


def test_embedding_rotation_of_a_model_to_itself_is_the_identity():
    spec, sd = spec_for(vit(2)), vit(2).state_dict()
    Q = embedding_rotation(spec, sd, sd, spec.identity())
    torch.testing.assert_close(Q, torch.eye(16, dtype=Q.dtype), atol=1e-10, rtol=0)


def test_procrustes_matches_a_brute_force_check():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    R = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    Y = X @ R + 0.01 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    Q = procrustes(X, Y)
    torch.testing.assert_close(Q @ Q.T, torch.eye(5, dtype=Q.dtype))
    best = (X @ Q - Y).norm()
    for _ in range(50):  # no other orthogonal matrix (random, or a small step from Q) does better
        other = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
        A = torch.randn(5, 5, generator=g, dtype=torch.float64)
        step = torch.linalg.matrix_exp(0.01 * (A - A.T))  # a rotation close to I
        assert (X @ other - Y).norm() > best and (X @ Q @ step - Y).norm() >= best
    torch.testing.assert_close(Q, R, atol=0.01, rtol=0)


@pytest.mark.parametrize(
    "method",
    [WeightMatching(seed=3), ActivationMatching(num_samples=16, batch_size=8)],
    ids=["weight_matching", "activation_matching"],
)
def test_nonlocal_pool_with_a_rotated_foundation_comes_back(method, tmp_path):
    pool, want = rotated_pool()
    x = images(8, 3)
    before = expert_logits(pool, x)
    new = method.align(pool, RunContext(tmp_path))
    after = expert_logits(new, x)
    for t in pool.tasks:  # every expert keeps its function (with its rotated head)
        torch.testing.assert_close(after[t], before[t], atol=1e-4, rtol=1e-4)
        for k, v in want["unperm"][t].items():  # and is the unpermuted, unrotated expert
            torch.testing.assert_close(new.experts[t][k], v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new.heads[t].weight, want["heads"][t].weight, atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    for k, v in want["theta_a"].items():
        torch.testing.assert_close(new.pretrained[k], v, atol=1e-5, rtol=1e-5)
    assert new.heads["t0"] is pool.heads["t0"]  # the reference foundation's heads stay
    rot = method.report["models"]["b"]["moved"]["embedding_rotation"]
    assert rot > 0.5 and new.meta["align"]["embedding"] == "procrustes"


def test_embedding_none_leaves_the_rotation_and_the_heads(tmp_path):
    pool, want = rotated_pool()
    aligner = WeightMatching(seed=3, embedding="none")
    new = aligner.align(pool, RunContext(tmp_path))
    assert all(new.heads[t] is pool.heads[t] for t in pool.tasks)
    assert "embedding_rotation" not in aligner.report["models"]["b"]["moved"]
    e = spec_for(vit(0)).embedding.key
    got, unrotated = new.experts["t1"], want["unperm"]["t1"]
    # the permutations come back, the rotation (on proj's columns) stays
    torch.testing.assert_close(got["ln_post.weight"], unrotated["ln_post.weight"])
    assert (got[e] - unrotated[e]).abs().max() > 0.1


def test_embedding_rotation_needs_linear_heads_and_an_embedding_tensor(tmp_path):
    pool, _ = rotated_pool()
    bad = dataclasses.replace(pool, heads={**pool.heads, "t1": nn.Sequential(nn.Linear(16, 3))})
    with pytest.raises(ConfigError, match="heads? must be linear.*embedding=none"):
        WeightMatching().align(bad, RunContext(tmp_path))
    with pytest.raises(ConfigError, match="align.embedding must be one of procrustes, none"):
        WeightMatching(embedding="rotate")
