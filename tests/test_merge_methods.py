"""Known-answer tests for TSV-M, Iso-C, Iso-CTS, DARE and Consensus merging (+ TALL masks).

Single-expert identities (which hold, and why):
- TSV-M (α = 1): T = 1 → k = r, every triplet kept, U and Vᵀ already orthonormal → θ1.
- Iso-C / Iso-CTS: NOT the identity in general (the spectrum is flattened); they are exactly
  when τ1's nonzero singular values are all equal (τ1 = c·orthogonal).
- DARE: only with p = 0 (and base scaling 1); p > 0 drops entries at random.
- Consensus (α = 1): k ≤ 1 → θ1 (its TALL mask keeps every τ ≠ 0); k = 2 → θ0 (no weight is
  used by two tasks).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge import masks as M
from mergelab.merge.consensus import Consensus
from mergelab.merge.dare import Dare, drop_seed
from mergelab.merge.iso import IsoC, IsoCTS, iso_c_matrix, iso_cts_sizes
from mergelab.merge.task_arithmetic import TaskArithmetic
from mergelab.merge.ties import Ties
from mergelab.merge.tsv_m import TSVM, polar_factor, tsv_merge_matrix
from mergelab.pool.state import LazyStateDict, save_state_dict


def rand_pool(n_tasks=3, shape=(8, 6), seed=0, scale=1.0):
    """θ0 with a matrix, a bias, a 4-D conv and an integer buffer; experts = θ0 + noise."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "w": torch.randn(*shape, generator=g),
        "b": torch.randn(shape[0], generator=g),
        "conv": torch.randn(2, 3, 2, 2, generator=g),
        "step": torch.tensor(5),
    }
    e = {
        f"t{i}": {
            k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in p.items()
        }
        for i in range(n_tasks)
    }
    return p, e


def taus_of(p, e, key):
    return [sd[key] - p[key] for sd in e.values()]


def orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    return q


ALL = [
    TSVM(),
    IsoC(),
    IsoCTS(common_fraction=0.5),
    Dare(p=0.3),
    Dare(p=0.3, base="ties", ties_k=0.5),
    Consensus(),
    Consensus(base="ties", ties_k=0.5),
]


# ---------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("rotated", [False, True])
def test_tsv_m_rank1_orthogonal_tasks_sum_exactly(rotated):
    """Rank-1 τt = st ut vtᵀ with mutually orthogonal ut and vt, T = r = 4 (so k = 1: each
    task's single triplet fills its slot, Û is already orthonormal): TSV-M(α=1) = θ0 + Σt τt.
    Unrotated: standard basis vectors, so Σt τt is the hand-written matrix below."""
    m, n = 4, 5
    if rotated:
        u, v = orthonormal(m, 4, 1), orthonormal(n, 4, 2)
    else:
        u, v = torch.eye(m)[:, [2, 0, 3, 1]], torch.eye(n)[:, [4, 1, 0, 2]]
    s = [3.0, 2.0, -1.5, 0.5]  # a negative s flips one singular vector: still rank 1
    p = {"w": torch.full((m, n), 0.25)}
    e = {f"t{i}": {"w": p["w"] + s[i] * torch.outer(u[:, i], v[:, i])} for i in range(4)}
    out = TSVM(scaling=1.0).merge(p, e)["w"]
    want = p["w"] + sum(s[i] * torch.outer(u[:, i], v[:, i]) for i in range(4))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if not rotated:
        hand = torch.full((m, n), 0.25)
        hand[2, 4] += 3.0
        hand[0, 1] += 2.0
        hand[3, 0] -= 1.5
        hand[1, 2] += 0.5
        torch.testing.assert_close(out, hand, atol=1e-5, rtol=1e-5)
    # α scales the update linearly
    half = TSVM(scaling=0.5).merge(p, e)["w"]
    torch.testing.assert_close(half - p["w"], 0.5 * (want - p["w"]), atol=1e-5, rtol=1e-5)


def test_tsv_m_orthogonal_rank2_tasks_sum_exactly():
    """k = ⌊6/3⌋ = 2 per task; each task a rank-2 update in its own orthogonal block."""
    u, v = orthonormal(7, 6, 3), orthonormal(6, 6, 4)
    sv = torch.tensor([5.0, 4.0, 3.0, 2.5, 2.0, 1.0])
    p = {"w": torch.zeros(7, 6)}
    e = {
        f"t{t}": {
            "w": (u[:, 2 * t : 2 * t + 2] * sv[2 * t : 2 * t + 2]) @ v[:, 2 * t : 2 * t + 2].T
        }
        for t in range(3)
    }
    out = TSVM().merge(p, e)["w"]
    torch.testing.assert_close(out, sum(sd["w"] for sd in e.values()), atol=1e-5, rtol=1e-5)


def zero_padded_tsv(taus):
    """Independent transcription of the reference: Û (m×r) and V̂ᵀ (r×n) zero-initialised,
    task i's top-k in block i, polar factors of the padded matrices."""
    m, n = taus[0].shape
    r, t = min(m, n), len(taus)
    k = r // t
    uh, sh, vh = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
    for i, tau in enumerate(taus):
        u, s, v = torch.linalg.svd(tau, full_matrices=False)
        uh[:, i * k : (i + 1) * k], sh[i * k : (i + 1) * k] = u[:, :k], s[:k]
        vh[i * k : (i + 1) * k] = v[:k]
    pu, _, qu = torch.linalg.svd(uh, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh, full_matrices=False)
    return pu @ qu @ torch.diag(sh) @ pv @ qv


def test_tsv_m_matches_zero_padded_reference_and_is_task_order_invariant():
    """r = 5, T = 2 → k = 2 and one all-zero column in the reference's padded Û."""
    p, e = rand_pool(n_tasks=2, shape=(9, 5), seed=5)
    taus = taus_of(p, e, "w")
    torch.testing.assert_close(tsv_merge_matrix(taus), zero_padded_tsv(taus), atol=1e-5, rtol=1e-4)
    p3, e3 = rand_pool(n_tasks=3, shape=(6, 9), seed=6)
    fwd = TSVM().merge(p3, e3)
    rev = TSVM().merge(p3, dict(reversed(list(e3.items()))))
    for k in p3:
        torch.testing.assert_close(fwd[k], rev[k], atol=1e-5, rtol=1e-5)


def test_polar_factor_is_orthonormal_and_closest():
    a = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    q = polar_factor(a)
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)
    # independent formula: a (aᵀa)^(-1/2)
    w, vecs = torch.linalg.eigh(a.T @ a)
    torch.testing.assert_close(q, a @ vecs @ torch.diag(w.rsqrt()) @ vecs.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(polar_factor(a.T), q.T, atol=1e-5, rtol=1e-5)  # wide input


def test_tsv_m_non_matrix_tensors_are_the_scaled_mean_and_buffers_pass():
    p, e = rand_pool(n_tasks=3)
    out = TSVM(scaling=0.7).merge(p, e)
    for k in ("b", "conv"):
        mean = sum(taus_of(p, e, k)) / 3
        torch.testing.assert_close(out[k], p[k] + 0.7 * mean)
    assert torch.equal(out["step"], p["step"])


def test_tsv_m_matrix_with_fewer_singular_values_than_tasks_is_averaged():
    p, e = rand_pool(n_tasks=3, shape=(2, 5))  # r = 2 < T = 3: no slot per task
    out = TSVM().merge(p, e)["w"]
    torch.testing.assert_close(out, p["w"] + sum(taus_of(p, e, "w")) / 3)


# ---------------------------------------------------------------- Iso-C / Iso-CTS


def test_iso_c_hand_computed_2x2():
    """Σ τ = [[0, 3], [-1, 0]]: singular values 3, 1 → σ̄ = 2; U Vᵀ = [[0, 1], [-1, 0]]."""
    p = {"w": torch.ones(2, 2)}
    e = {
        "a": {"w": torch.ones(2, 2) + torch.tensor([[0.0, 2.0], [-1.0, 0.0]])},
        "b": {"w": torch.ones(2, 2) + torch.tensor([[0.0, 1.0], [0.0, 0.0]])},
    }
    out = IsoC(scaling=1.0).merge(p, e)["w"]
    torch.testing.assert_close(out, torch.tensor([[1.0, 3.0], [-1.0, 1.0]]), atol=1e-6, rtol=0)
    out = IsoC(scaling=0.5).merge(p, e)["w"]
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [0.0, 1.0]]), atol=1e-6, rtol=0)


def test_iso_c_flat_spectrum_same_singular_vectors_as_sum():
    p, e = rand_pool(n_tasks=4, shape=(9, 6), seed=2)
    taus = taus_of(p, e, "w")
    total = sum(taus)
    delta = IsoC().merge(p, e)["w"] - p["w"]
    sv = torch.linalg.svdvals(delta)
    sigma_bar = torch.linalg.svdvals(total).mean()
    torch.testing.assert_close(sv, torch.full_like(sv, sigma_bar.item()), atol=1e-4, rtol=1e-4)
    # same singular vectors as Σ τt: Δ = σ̄ · polar(Σ τt), polar by the eigh formula
    w, vecs = torch.linalg.eigh(total.T @ total)
    polar = total @ vecs @ torch.diag(w.rsqrt()) @ vecs.T
    torch.testing.assert_close(delta, sigma_bar * polar, atol=1e-4, rtol=1e-4)
    for k in ("b", "conv"):
        out = IsoC(scaling=1.5).merge(p, e)[k]
        torch.testing.assert_close(out, p[k] + 1.5 * sum(taus_of(p, e, k)) / 4)


@pytest.mark.parametrize(
    "r,t,beta,want",
    [
        (768, 8, 0.8, (616, 19)),  # the paper's ViT sizes
        (1024, 8, 0.8, (816, 26)),  # ViT-L: k0 = 819, 205/8 = 25.625 → 26, 26·8 = 208
        (10, 3, 0.8, (7, 1)),  # k0 = 8, 2/3 → 1
        (15, 2, 0.8, (11, 2)),  # k0 = 12, 3/2 = 1.5 → 2 (half to even)
        (25, 2, 0.8, (21, 2)),  # k0 = 20, 5/2 = 2.5 → 2 (half to even)
        (10, 4, 0.8, (10, 0)),  # k0 = 8, 2/4 = 0.5 → 0: no task-specific space
        (3, 2, 0.0, (1, 1)),  # round(1.5)·2 = 4 > 3: capped at ⌊3/2⌋·2
        (6, 3, 1.0, (6, 0)),  # β = 1: all common (Iso-C)
    ],
)
def test_iso_cts_sizes(r, t, beta, want):
    kc, s = iso_cts_sizes(r, t, beta)
    assert (kc, s) == want and kc + t * s == r


def test_iso_cts_flat_spectrum_and_keeps_the_common_space():
    """r = 6, T = 3, β = 0.5 → kc = 3 common + 1 per task."""
    p, e = rand_pool(n_tasks=3, shape=(10, 6), seed=3)
    taus = taus_of(p, e, "w")
    assert iso_cts_sizes(6, 3, 0.5) == (3, 1)
    delta = IsoCTS(common_fraction=0.5).merge(p, e)["w"] - p["w"]
    # σ̄ computed independently: mean of the top-3 singular values of Σ τ and each projected
    # τt's top singular value
    u, s, _ = torch.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :3]
    proj = torch.eye(10) - uc @ uc.T
    parts = [s[:3]] + [torch.linalg.svdvals(proj @ tau)[:1] for tau in taus]
    sigma_bar = torch.cat(parts).sum() / 6
    sv = torch.linalg.svdvals(delta)
    torch.testing.assert_close(sv, torch.full_like(sv, sigma_bar.item()), atol=1e-4, rtol=1e-4)
    # the common left subspace lies inside Δ's column space
    ud, _, _ = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(ud @ (ud.T @ uc), uc, atol=1e-4, rtol=1e-4)


def test_iso_cts_all_common_equals_iso_c():
    p, e = rand_pool(n_tasks=3, shape=(8, 6), seed=4)
    a, b = IsoCTS(common_fraction=1.0).merge(p, e), IsoC().merge(p, e)
    for k in p:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [IsoC(), IsoCTS(common_fraction=0.5)])
def test_iso_single_expert_identity_only_for_a_flat_spectrum(method):
    p = {"w": torch.randn(6, 4, generator=torch.Generator().manual_seed(0))}
    flat = {"only": {"w": p["w"] + 0.3 * orthonormal(6, 4, 7)}}  # all σ = 0.3
    torch.testing.assert_close(method.merge(p, flat)["w"], flat["only"]["w"], atol=1e-5, rtol=0)
    spread = {"only": {"w": p["w"] + orthonormal(6, 4, 7) * torch.tensor([3.0, 1.0, 0.5, 0.1])}}
    assert not torch.allclose(method.merge(p, spread)["w"], spread["only"]["w"], atol=1e-2)


def test_iso_c_matrix_is_rank_preserving_for_rank_deficient_sum():
    """A rank-1 sum: Iso-C keeps its single direction with σ̄ = σ1 / r of the full spectrum."""
    u, v = orthonormal(5, 1, 8), orthonormal(4, 1, 9)
    tau = 4.0 * u @ v.T
    delta = iso_c_matrix([tau])
    torch.testing.assert_close(delta @ v, (4.0 / 4) * u, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- DARE


@pytest.mark.parametrize(
    "base,method",
    [("task_arithmetic", TaskArithmetic(0.4)), ("ties", Ties(k=0.5, scaling=0.4))],
)
def test_dare_p0_is_its_base_method_exactly(base, method):
    p, e = rand_pool(n_tasks=3, seed=7)
    a = Dare(p=0.0, base=base, scaling=0.4, ties_k=0.5).merge(p, e)
    b = method.merge(p, e)
    for k in p:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra_zeros", [0, 37])
@pytest.mark.parametrize("mode,other", [("reference", "mergelab"), ("mergelab", "reference")])
def test_dare_p0_and_consensus_k0_over_ties_follow_ties_mode(mode, other, extra_zeros):
    """DARE (p = 0) and Consensus (k = 0) over TIES are TIES with the same ``mode`` and
    ``extra_zeros``; the other mode merges differently on this pool (d = 80 floats, k = 0.5:
    the reference keeps ⌊k·d⌋ + 1 = 41 entries per task, mergelab round(k·d) = 40), so the
    settings must reach TIES for the equalities to hold."""
    p, e = rand_pool(n_tasks=3, seed=7)
    want = Ties(k=0.5, scaling=0.4, mode=mode, extra_zeros=extra_zeros).merge(p, e)
    diff = Ties(k=0.5, scaling=0.4, mode=other, extra_zeros=extra_zeros).merge(p, e)
    assert any(not torch.equal(want[k], diff[k]) for k in p)
    kw = dict(ties_k=0.5, ties_mode=mode, ties_extra_zeros=extra_zeros)
    dare = Dare(p=0.0, base="ties", scaling=0.4, **kw).merge(p, e)
    cons = Consensus(k=0, scaling=0.4, base="ties", **kw).merge(p, e)
    for k in p:
        assert torch.equal(dare[k], want[k]), k
        torch.testing.assert_close(cons[k], want[k])


def test_dare_and_consensus_reject_bad_ties_trim_settings():
    with pytest.raises(ConfigError, match="trim mode|mode"):
        Dare(base="ties", ties_mode="fast")
    with pytest.raises(ConfigError, match="extra_zeros"):
        Dare(base="ties", ties_extra_zeros=-1)
    with pytest.raises(ConfigError, match="mode"):
        Consensus(base="ties", ties_mode="fast")
    with pytest.raises(ConfigError, match="scope=global"):
        Consensus(base="ties", ties_scope="per_tensor", ties_extra_zeros=5)


@pytest.mark.parametrize("name", ["dare", "consensus"])
def test_ties_trim_settings_are_in_the_yaml(name, tiny_cache):
    from conftest import compose
    from hydra.utils import instantiate

    cfg = compose(
        [
            f"merge={name}",
            "merge.base=ties",
            "merge.ties_mode=mergelab",
            "merge.ties_extra_zeros=3",
        ],
        tiny_cache,
    )
    method = instantiate(cfg.merge)
    assert (method.ties_mode, method.ties_extra_zeros) == ("mergelab", 3)
    default = instantiate(compose([f"merge={name}"], tiny_cache).merge)
    assert (default.ties_mode, default.ties_extra_zeros) == ("reference", 0)


def test_dare_keeps_1_minus_p_rescaled_and_is_unbiased():
    p = {"w": torch.zeros(200, 100)}
    g = torch.Generator().manual_seed(0)
    e = {t: {"w": torch.randn(200, 100, generator=g)} for t in ("a", "b")}
    dare = Dare(p=0.3)
    tau = e["a"]["w"]
    got = dare.dropped(p, e)["a"]["w"]
    kept = got != 0
    frac = kept.float().mean().item()
    assert abs(frac - 0.7) < 5 * (0.3 * 0.7 / tau.numel()) ** 0.5  # binomial 5σ
    torch.testing.assert_close(got[kept], tau[kept] / 0.7)
    # unbiased: the mean over seeds of DARE-TA's update projects onto TA's with ratio 1
    ta = TaskArithmetic(1.0).merge(p, e)["w"]

    def ratio(rescale):
        runs = [
            Dare(p=0.5, scaling=1.0, seed=s, rescale=rescale).merge(p, e)["w"] for s in range(8)
        ]
        avg = torch.stack(runs).mean(0)
        return ((avg * ta).sum() / (ta * ta).sum()).item()

    assert abs(ratio(True) - 1.0) < 0.01  # std ≈ 1/sqrt(8 · 20000) ≈ 0.0025
    assert abs(ratio(False) - 0.5) < 0.01  # without the rescale the expectation is (1 − p) τ


def test_dare_seeding():
    p, e = rand_pool(n_tasks=2, shape=(30, 20), seed=8)
    a, b, c = (Dare(p=0.5, seed=s).merge(p, e)["w"] for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a task's mask depends on (seed, task, key) only: not on the other tasks or key order
    alone = Dare(p=0.5, seed=0).dropped(p, {"t0": e["t0"]})["t0"]["w"]
    assert torch.equal(alone, Dare(p=0.5, seed=0).dropped(p, e)["t0"]["w"])
    assert drop_seed(0, "t0", "w") != drop_seed(0, "t1", "w") != drop_seed(1, "t0", "w")
    same = {"x": e["t0"], "y": e["t0"]}  # identical experts under two names: different drops
    d = Dare(p=0.5).dropped(p, same)
    assert not torch.equal(d["x"]["w"], d["y"]["w"])


def test_dare_single_expert_p0_is_the_expert_and_bad_config():
    p, e = rand_pool(n_tasks=1, seed=9)
    out = Dare(p=0.0, scaling=1.0).merge(p, e)
    for k in p:
        torch.testing.assert_close(out[k], e["t0"][k])
    with pytest.raises(ConfigError, match=r"p \(drop rate\)"):
        Dare(p=1.0)
    with pytest.raises(ConfigError, match="dare base"):
        Dare(base="weight_average")
    with pytest.raises(ConfigError, match="reduce"):
        Dare(base="ties", ties_reduce="max")


# ---------------------------------------------------------------- TALL masks / Consensus


def hand_masks_case():
    """τMTL = [2, 4, 2, 0, -1]. With λ = 0.6 (|τt| > 0.6·|τMTL − τt|):
    a: |τa| = [1, 0, 2, 1, .5] vs [.6, 2.4, 0, .6, .9]   → [1, 0, 1, 1, 0]
    b: |τb| = [1, 3, 1, 0, .5] vs [.6, .6, 1.8, 0, .9]   → [1, 1, 0, 0, 0] (0 > 0 is false)
    c: |τc| = [0, 1, 1, 1, 2]  vs [1.2, 1.8, .6, .6, .6] → [0, 0, 1, 1, 1]
    votes = [2, 1, 2, 2, 1]."""
    p = {"w": torch.ones(5), "step": torch.tensor(3)}
    taus = {
        "a": [1.0, 0.0, 2.0, -1.0, 0.5],
        "b": [1.0, 3.0, -1.0, 0.0, 0.5],
        "c": [0.0, 1.0, 1.0, 1.0, -2.0],
    }
    e = {t: {"w": 1.0 + torch.tensor(v), "step": torch.tensor(3)} for t, v in taus.items()}
    return p, e


def test_tall_masks_hand_computed():
    p, e = hand_masks_case()
    (wp, stepp) = list(M.iter_tall_masks(p, e, lambdas=0.6))
    torch.testing.assert_close(wp.tau_mtl, torch.tensor([2.0, 4.0, 2.0, 0.0, -1.0]))
    want = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(wp.masks, want)
    assert stepp.key == "step" and stepp.masks is None and stepp.tau_mtl is None
    # per-task λ: b with λ = 0.2 → |τb| vs [.2, .2, .6, 0, .3] → [1, 1, 1, 0, 1]
    (wp2, _) = list(M.iter_tall_masks(p, e, lambdas={"a": 0.6, "b": 0.2, "c": 0.6}))
    assert wp2.masks[1].tolist() == [True, True, True, False, True]
    assert torch.equal(wp2.masks[[0, 2]], want[[0, 2]])
    assert M.consensus_mask(want, 2).tolist() == [True, False, True, True, False]
    with pytest.raises(ConfigError, match="lambda missing for task 'c'"):
        list(M.iter_tall_masks(p, e, lambdas={"a": 0.6, "b": 0.2}))


def test_multitask_vector_per_tensor():
    """TA: Σ τ. TIES, per tensor, top round(2/3·3) = 2 entries each:
    a = [3, -1, 0.5] keeps [3, -1, 0]; b = [-2, 2, 0.1] keeps [-2, 2, 0];
    signs of the sums [1, 1, 0] → +, +, + (a zero sum elects +); agreeing sum → [3, 2, 0]."""
    taus = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 2.0, 0.1]])
    torch.testing.assert_close(M.multitask_vector(taus), torch.tensor([1.0, 1.0, 0.6]))
    got = M.multitask_vector(taus, "ties", ties_k=2 / 3)
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 0.0]))
    got = M.multitask_vector(taus, "ties", thresholds=[0.4, 0.05], ties_reduce="mean")
    # a keeps [3, -1, 0.5], b keeps all; sums [1, 1, 0.6] → + + +; mean of agreeing entries
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 0.3]))


@pytest.mark.parametrize(
    "k,want",
    [
        (2, [2.0, 1.0, 2.0, 1.0, 1.0]),  # 1 + 0.5·[2, 0, 2, 0, 0]
        (1, [2.0, 3.0, 2.0, 1.0, 0.5]),  # every coordinate has a vote: 1 + 0.5·τMTL
        (3, [1.0, 1.0, 1.0, 1.0, 1.0]),  # no coordinate has 3 votes: θ0
    ],
)
def test_consensus_hand_computed(k, want):
    p, e = hand_masks_case()
    out = Consensus(k=k, tall_lambda=0.6, scaling=0.5).merge(p, e)
    torch.testing.assert_close(out["w"], torch.tensor(want))
    assert out["step"].item() == 3


def test_consensus_k0_is_plain_task_arithmetic_or_ties():
    p, e = rand_pool(n_tasks=4, seed=10)
    a, b = Consensus(k=0, scaling=0.35).merge(p, e), TaskArithmetic(0.35).merge(p, e)
    c = Consensus(k=0, scaling=0.35, base="ties", ties_k=0.4, ties_reduce="mean").merge(p, e)
    d = Ties(k=0.4, scaling=0.35, reduce="mean").merge(p, e)
    for key in p:
        torch.testing.assert_close(a[key], b[key])
        torch.testing.assert_close(c[key], d[key])


def test_consensus_single_expert():
    """k ≤ 1, α = 1 → the expert; k = 2 → θ0 exactly."""
    p, e = rand_pool(n_tasks=1, seed=11)
    one = Consensus(k=1, scaling=1.0).merge(p, e)
    two = Consensus(k=2, scaling=1.0).merge(p, e)
    for key in p:
        torch.testing.assert_close(one[key], e["t0"][key])
        assert torch.equal(two[key], p[key])


def test_consensus_bad_config():
    with pytest.raises(ConfigError, match="consensus k"):
        Consensus(k=1.5)
    with pytest.raises(ConfigError, match="multi-task vector"):
        Consensus(base="emr")
    with pytest.raises(ConfigError, match="tall_lambda"):
        Consensus(tall_lambda=-1)


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", ALL, ids=repr)
def test_contract_no_mutation_buffers_dtype_keys(method):
    p, e = rand_pool(n_tasks=3, seed=12)
    p0, e0 = copy.deepcopy(p), copy.deepcopy(e)
    out = method.merge(p, e)
    assert method.merged_keys == ["w", "b", "conv"]
    assert torch.equal(out["step"], p["step"])
    for k in p:
        assert torch.equal(p[k], p0[k])
        for t in e:
            assert torch.equal(e[t][k], e0[t][k])
    half = {k: v.half() if v.is_floating_point() else v for k, v in p.items()}
    eh = {
        t: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        for t, sd in e.items()
    }
    oh = method.merge(half, eh)
    assert oh["w"].dtype == torch.float16 and torch.isfinite(oh["w"]).all()
    e["t1"] = {**e["t1"], "w": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"expert 't1'.*'w'.*shape"):
        method.merge(p, e)


@pytest.mark.parametrize("method", ALL, ids=repr)
def test_every_expert_contributes(method):
    p, e = rand_pool(n_tasks=3, seed=13)
    ref = method.merge(p, e)["w"]
    for t in e:
        e2 = copy.deepcopy(e)
        e2[t]["w"] = e2[t]["w"] + 5.0 * torch.randn(e2[t]["w"].shape)
        assert not torch.allclose(method.merge(p, e2)["w"], ref), f"expert {t} ignored"


def test_single_expert_identity_tsv_m():
    p, e = rand_pool(n_tasks=1, seed=14)
    out = TSVM(scaling=1.0).merge(p, e)
    for k in p:
        torch.testing.assert_close(out[k], e["t0"][k], atol=1e-5, rtol=1e-5)


def test_streaming_on_lazy_experts_matches_eager(tmp_path):
    from mergelab.zoo.synthetic import synthetic_pool

    pool = synthetic_pool(n_tasks=3)
    lazy = {}
    for t, sd in pool.experts.items():
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
        lazy[t] = LazyStateDict(tmp_path / f"{t}.safetensors")
    save_state_dict(pool.pretrained, tmp_path / "p.safetensors")
    lazy_p = LazyStateDict(tmp_path / "p.safetensors")
    for m in ALL:
        a, b = m.merge(pool.pretrained, pool.experts), m.merge(lazy_p, lazy)
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=f"{m!r} {k}")
