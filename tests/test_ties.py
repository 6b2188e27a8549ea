"""TIES-merging: hand-computed answers, and bit-for-bit agreement with an independent,
straightforward re-implementation of the authors' reference code (flatten everything,
``torch.kthvalue``, model-wide majority sign), on random pools built to hit the edge cases."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch

from mergelab.errors import ConfigError
from mergelab.merge import native, ops
from mergelab.merge import ties as ties_module
from mergelab.merge.task_arithmetic import TaskArithmetic
from mergelab.merge.ties import Ties, ties_task_vectors


@pytest.fixture(autouse=True, params=["fused", "torch"])
def kernels(request, monkeypatch):
    """Every test runs on both paths: the fused C kernels and the torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(native, "kernels", lambda: None)
    elif native.kernels() is None:
        if native.compiler() is not None:
            pytest.fail("a C compiler is here but the TIES kernels did not build (see the log)")
        pytest.skip("no C compiler: the fused TIES kernels cannot be built here")
    return request.param


def bits(x: torch.Tensor) -> torch.Tensor:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.contiguous().view(as_int[x.element_size()])


def assert_bitwise(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        diff = int((bits(got[key]) != bits(want[key])).sum())
        assert diff == 0, f"{key}: {diff} entries differ in their bits"


# --- the reference semantics, written out plainly --------------------------------------------


def reference_ties(p, experts, k, lam, reduce="sum", extra_zeros=0, scope="global"):
    """The authors' merge_utils.py semantics on the whole flattened model: returns the merged
    state dict and each task's selected entries. Keys are flattened in sorted order; the
    extra zeros stand for tensors the checkpoint holds but mergelab does not load."""
    keys = sorted(p)
    pad = torch.zeros(extra_zeros)
    flat_p = torch.cat([pad] + [p[key].reshape(-1) for key in keys])
    flat = torch.stack(
        [torch.cat([pad] + [sd[key].reshape(-1) for key in keys]) for sd in experts.values()]
    )
    tv = flat - flat_p
    if scope == "global":
        d = tv.shape[1]
        kth, _ = tv.abs().kthvalue(d - int(d * k), dim=1, keepdim=True)
        trimmed = tv * (tv.abs() >= kth)
    else:  # the same trim within each tensor
        trimmed = torch.empty_like(tv)
        at = extra_zeros
        for key in keys:
            n = p[key].numel()
            part = tv[:, at : at + n]
            kth, _ = part.abs().kthvalue(n - int(n * k), dim=1, keepdim=True)
            trimmed[:, at : at + n] = part * (part.abs() >= kth)
            at += n
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # "majority": a model-wide quantity
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    if reduce == "sum":
        merged_tv = selected.sum(dim=0)
    else:
        merged_tv = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    merged = flat_p + lam * merged_tv

    def unflatten(vec):
        out, at = {}, extra_zeros
        for key in keys:
            n = p[key].numel()
            out[key] = vec[at : at + n].reshape(p[key].shape)
            at += n
        return out

    return unflatten(merged), {t: unflatten(selected[i]) for i, t in enumerate(experts)}


def random_pool(n_tasks, seed, shapes=((37, 13), (301,), (5, 7, 3), (250, 4)), flip=False):
    """θ0 ≠ 0; task vectors on a coarse grid (many exact ties, also at the trim threshold);
    the first 24 entries of every tensor cancel exactly between experts 0 and 1 (γ = 0 with
    kept entries); ``flip`` mirrors every task vector (so the majority sign flips)."""
    g = torch.Generator().manual_seed(seed)
    names = [f"k{i}" for i in range(len(shapes))][::-1]  # dict order ≠ sorted order
    p = {name: torch.randn(s, generator=g) for name, s in zip(names, shapes)}
    taus = []
    for t in range(n_tasks):
        tau = {}
        for name, v in p.items():
            x = torch.randn(v.shape, generator=g) * torch.rand(v.shape, generator=g) ** 2
            x = torch.round(x * 8) / 8  # coarse grid → ties
            if t < 2:
                x.view(-1)[:24] = 3.0 if t == 0 else -3.0
            tau[name] = -x if flip else x
        taus.append(tau)
    experts = {f"t{t}": {k: p[k] + tau[k] for k in p} for t, tau in enumerate(taus)}
    return p, experts


# --- hand-computed answers -------------------------------------------------------------------


def hand_pool():
    """θ0 ≠ 0; three experts; d = 5 entries per task over two tensors."""
    p = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5, 3.0, 0.0])}
    taus = [
        {"a": [-0.5, -1.0], "b": [2.0, 0.25, -0.125]},
        {"a": [-0.75, -0.5], "b": [1.0, -4.0, 0.25]},
        {"a": [0.25, 1.0], "b": [-3.0, 0.5, 0.5]},
    ]
    experts = {
        f"e{i}": {k: p[k] + torch.tensor(v) for k, v in tau.items()} for i, tau in enumerate(taus)
    }
    return p, experts


def test_reference_mode_known_answer_theta0_nonzero_lambda_half():
    """k = 0.4, d = 5: n = ⌊2.0⌋ = 2, threshold = the 3rd smallest |τ|, keep |τ| ≥ it.
    e0: |.5 1 2 .25 .125| → s = .5 → keeps a = [-.5, -1], b = [2, 0, 0]
    e1: |.75 .5 1 4 .25|  → s = .75 → keeps a = [-.75, 0], b = [1, -4, 0]
    e2: |.25 1 3 .5 .5|   → s = .5 → keeps a = [0, 1], b = [-3, .5, .5] (a tie: 4 kept)
    Σ: a = [-1.25, 0], b = [0, -3.5, .5] → γ = [-1, 0], [0, -1, +1]; Σγ = -1 → the two
    zeros become -1 (keep the negative entries there):
    sum:  a = [-.5-.75, -1], b = [-3, -4, .5];   mean: a = [-.625, -1], b likewise.
    θ = θ0 + 0.5·merged."""
    p, e = hand_pool()
    got = Ties(k=0.4, scaling=0.5, reduce="sum").merge(p, e)
    assert torch.equal(got["a"], torch.tensor([0.375, -2.5]))
    assert torch.equal(got["b"], torch.tensor([-1.0, 1.0, 0.25]))
    got = Ties(k=0.4, scaling=0.5, reduce="mean").merge(p, e)
    assert torch.equal(got["a"], torch.tensor([0.6875, -2.5]))
    assert torch.equal(got["b"], torch.tensor([-1.0, 1.0, 0.25]))
    vec = ties_task_vectors(p, e, k=0.4)
    assert torch.equal(vec["e0"]["a"], torch.tensor([-0.5, -1.0]))
    assert torch.equal(vec["e0"]["b"], torch.tensor([0.0, 0.0, 0.0]))  # +2 lost to γ = -1
    assert torch.equal(vec["e2"]["b"], torch.tensor([-3.0, 0.0, 0.5]))


def test_reference_majority_follows_the_whole_model():
    """Mirroring every task vector mirrors the merge: the zero-sum coordinates now take +1."""
    p, e = hand_pool()
    mirrored = {t: {k: 2 * p[k] - v[k] for k in p} for t, v in e.items()}
    got = Ties(k=0.4, scaling=0.5).merge(p, mirrored)
    assert torch.equal(got["a"], torch.tensor([1.625, -1.5]))
    assert torch.equal(got["b"], torch.tensor([2.0, 5.0, -0.25]))


def test_mergelab_mode_known_answer():
    """round(0.4·5) = 2 kept per task (thresholds 1, 1, 1); zero sums elect +1:
    Σ: a = [0, 0], b = [0, -4, 0] → a1 keeps +1, b0 keeps 2 + 1 → merged a = [0, 1],
    b = [3, -4, 0]; θ = θ0 + 0.5·merged."""
    p, e = hand_pool()
    got = Ties(k=0.4, scaling=0.5, mode="mergelab").merge(p, e)
    assert torch.equal(got["a"], torch.tensor([1.0, -1.5]))
    assert torch.equal(got["b"], torch.tensor([2.0, 1.0, 0.0]))


def test_extra_zeros_raise_the_density_on_the_loaded_entries():
    """e0's |τ| = .5, 1, 2, .25, .125 (d = 5, k = 0.4). With 3 extra zeros d = 8, n = 3 and the
    threshold is the 5th smallest of all = the 2nd smallest loaded |τ| = .25 (4 of 5 kept,
    not 3); with 5 (d = 10, rank 6) it is the smallest loaded |τ|: everything loaded is kept;
    with 10 (d = 15, rank 9) among the zeros. (The effect of the text-side tensors of task_vectors
    checkpoints.)"""
    p, e = hand_pool()
    tau = [(e["e0"][k] - p[k]).abs() for k in p]
    assert ops.trim_threshold(tau, 0.4) == 0.5
    assert ops.trim_threshold(tau, 0.4, extra_zeros=3) == 0.25
    assert ops.trim_threshold(tau, 0.4, extra_zeros=5) == 0.125
    assert ops.trim_threshold(tau, 0.4, extra_zeros=10) == 0.0


def test_k_edges():
    """k = 1 keeps everything (the reference code crashes there); without sign conflicts
    TIES-sum is then task arithmetic. k = 0 in reference mode keeps each task's largest."""
    p = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    e = {
        "a": {"w": p["w"] + torch.tensor([1.0, 2.0, 0.0, 3.0])},
        "b": {"w": p["w"] + torch.tensor([2.0, 0.5, 1.0, 0.0])},
    }
    for mode in ("reference", "mergelab"):
        torch.testing.assert_close(
            Ties(k=1.0, scaling=0.3, mode=mode).merge(p, e)["w"],
            TaskArithmetic(0.3).merge(p, e)["w"],
        )
    vec = ties_task_vectors(p, e, k=0.0)
    assert torch.equal(vec["a"]["w"], torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(vec["b"]["w"], torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert torch.count_nonzero(ties_task_vectors(p, e, k=0.0, mode="mergelab")["a"]["w"]) == 0


# --- bit for bit against the reference semantics ---------------------------------------------


@pytest.mark.parametrize("n_tasks", [2, 3, 8, 18])
@pytest.mark.parametrize("flip", [False, True])
def test_reference_mode_is_bitwise_the_reference(n_tasks, flip):
    p, e = random_pool(n_tasks, seed=n_tasks, flip=flip)
    for k, reduce, extra in [
        (0.2, "sum", 0),
        (0.5, "mean", 0),
        (0.1, "sum", 1000),
        (0.9, "mean", 7),
    ]:
        want, want_vec = reference_ties(p, e, k, 0.3, reduce, extra)
        assert_bitwise(Ties(k=k, scaling=0.3, reduce=reduce, extra_zeros=extra).merge(p, e), want)
        got_vec = ties_task_vectors(p, e, k=k, extra_zeros=extra)
        for t in e:
            assert_bitwise(got_vec[t], want_vec[t])
    # the pool hits the edge cases: ties at the threshold, γ = 0 where entries were kept,
    # and a non-zero majority sign
    tau = torch.stack([torch.cat([(e[t][k] - p[k]).reshape(-1) for k in sorted(p)]) for t in e])
    d = tau.shape[1]
    kth = tau.abs().kthvalue(d - int(d * 0.2), dim=1, keepdim=True).values
    assert ((tau.abs() == kth).sum(1) > 1).any()
    trimmed = tau * (tau.abs() >= kth)
    gamma = torch.sign(trimmed.sum(0))
    assert ((gamma == 0) & (trimmed != 0).any(0)).any()
    assert gamma.sum() != 0  # and flip=True mirrors it: both majority signs are exercised


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_reference_mode_is_bitwise_at_signed_zeros_and_subnormal_thresholds(reduce):
    """θ0 holds −0.0 and +0.0 where every expert agrees with it (merged Σ = +0, so the
    reference writes +0 over θ0's −0); task vectors of subnormal size put the trim threshold
    on a subnormal (and on 0 with k = 0.9), with ties at it; negative entries trimmed away
    are −0 in the reference's task vectors."""
    g = torch.Generator().manual_seed(7)
    tiny = torch.finfo(torch.float32).smallest_normal
    p = {"w": torch.randn(600, generator=g), "z": torch.zeros(40)}
    p["w"][:50] = -0.0
    p["z"][::2] = -0.0
    experts = {}
    for t in range(5):
        tau = torch.randint(-4, 5, (600,), generator=g).float() * tiny / 8  # subnormal grid
        tau[:50] = 0.0
        tau[50:80] = torch.randn(30, generator=g)  # a few normal-sized entries
        experts[f"t{t}"] = {"w": p["w"] + tau, "z": p["z"].clone()}
    for k in (0.1, 0.5, 0.9):
        want, want_vec = reference_ties(p, experts, k, 0.3, reduce)
        got = Ties(k=k, scaling=0.3, reduce=reduce).merge(p, experts)
        assert_bitwise(got, want)
        assert torch.signbit(got["w"][:50]).logical_not().all()  # +0, not θ0's −0
        got_vec = ties_task_vectors(p, experts, k=k)
        for t in experts:
            assert_bitwise(got_vec[t], want_vec[t])
    tau = torch.stack([e["w"] - p["w"] for e in experts.values()])
    assert ops.trim_threshold(tau[0].abs(), 0.5) < tiny  # the threshold is subnormal


def test_reference_mode_is_bitwise_in_chunks_threads_and_sampled_selection(monkeypatch):
    """Many chunks per tensor, two worker threads, and the sampled-bracket selection (plus its
    exact recount when a bracket misses) change nothing."""
    p, e = random_pool(5, seed=11, shapes=((400, 41), (1000,), (3, 3)))
    n = sum(v.numel() for v in p.values())
    want, want_vec = reference_ties(p, e, 0.2, 0.7, "sum")
    monkeypatch.setattr(ties_module, "_CHUNK", 5 * 333)
    monkeypatch.setattr(ties_module, "_FILL_CHUNK", 777)
    monkeypatch.setattr(ops, "_PARTITION_BELOW", 100)
    monkeypatch.setattr(ops, "_RUN_SAMPLE", 1000)
    monkeypatch.setattr(ops, "_RUN", 10)
    bracket, count, brackets, counted = ops.bracket, ops.count_bracket, [], []
    sampled = []  # per bracket, the tasks whose |τ| it was given (appended: thread-safe)

    def spy_bracket(sample, r, size):
        assert sample.shape == (100, 10) and size == n
        # the sample is |τ| at the sampled runs, one run per row (the tasks in any order)
        keys = sorted(p)  # the reference's flattening order
        at = ops.run_positions(ops.sample_runs([p[k].numel() for k in keys]))
        matches = []
        for task in e:
            tau = [(e[task][k] - p[k]).abs().reshape(-1) for k in keys]
            want = torch.cat([v[torch.from_numpy(i)] for v, i in zip(tau, at)])
            if torch.equal(torch.from_numpy(sample).reshape(-1), want):
                matches.append(task)
        sampled.append(matches)
        brackets.append(bracket(sample, r, size))
        return brackets[-1]

    def spy_count(x, lo, hi, lt, inside):
        below, found = count(x, lo, hi, lt, inside)
        counted.append((lo, hi, found.size))
        return below, found

    def spy_native(lib, src, m, lows, highs, cand, buf):
        got = native_count(lib, src, m, lows, highs, cand, buf)
        counted.extend(
            (float(lo), float(hi), found.size) for lo, hi, (_, found) in zip(lows, highs, got)
        )
        return got

    native_count = native.count
    monkeypatch.setattr(ops, "bracket", spy_bracket)
    monkeypatch.setattr(ops, "count_bracket", spy_count)
    monkeypatch.setattr(native, "count", spy_native)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_bitwise(Ties(k=0.2, scaling=0.7).merge(p, e), want)
        assert len(brackets) == 5 and all(lo < hi for lo, hi in brackets)
        assert sorted(t for m in sampled for t in m) == sorted(e)  # each task's sample, once
        assert 0 < sum(c for *_, c in counted) < 5 * n / 4  # only the entries in the brackets
        monkeypatch.setattr(ops, "_BRACKET_SIGMAS", -10.0)  # an empty bracket: always misses
        counted.clear()
        assert_bitwise(Ties(k=0.2, scaling=0.7).merge(p, e), want)
        recount = [c for lo, hi, c in counted if (lo, hi) == (-math.inf, math.inf)]
        assert sum(recount) == 5 * n  # each task recounted with everything as a candidate
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the merge restores the thread setting


def test_fused_kernels_do_the_work_and_hand_back_what_they_cannot(tmp_path, monkeypatch, kernels):
    """With the kernels built, both passes run in them (files read by the kernels themselves,
    in blocks of an odd size, next to an expert in memory); chunks with exactly cancelling
    columns (γ undecided until the model-wide sign is known) go back to the torch path; the
    result is the reference's, bit for bit, with and without the majority sign flipped.
    Without the kernels nothing calls them."""
    from mergelab.pool.state import LazyStateDict, save_state_dict

    calls = {"count": 0, "merge": 0, "undecided": 0}
    count, merge = native.count, native.merge
    lock = threading.Lock()  # the spies run on the worker threads: += is not atomic

    def spy_count(*args):
        with lock:
            calls["count"] += 1
        return count(*args)

    def spy_merge(*args):
        got = merge(*args)
        with lock:
            calls["merge"] += 1
            calls["undecided"] += bool(got and got[1])
        return got

    monkeypatch.setattr(native, "count", spy_count)
    monkeypatch.setattr(native, "merge", spy_merge)
    monkeypatch.setattr(native, "BLOCK", 37)  # many blocks, each with a partial vector
    monkeypatch.setattr(ties_module, "_CHUNK", 3 * 1000)
    for flip in (False, True):
        p, e = random_pool(3, seed=5, shapes=((300, 7), (333,), (5,)), flip=flip)
        for reduce in ("sum", "mean"):
            want, _ = reference_ties(p, e, 0.2, 0.3, reduce)
            lazy = {}
            for i, (t, sd) in enumerate(e.items()):
                save_state_dict(sd, tmp_path / f"{t}.safetensors")
                lazy[t] = sd if i == 1 else LazyStateDict(tmp_path / f"{t}.safetensors")
            assert_bitwise(Ties(k=0.2, scaling=0.3, reduce=reduce).merge(p, lazy), want)
    if kernels == "fused":
        assert calls["count"] and calls["merge"] and calls["undecided"]
    else:
        assert calls == {"count": 0, "merge": 0, "undecided": 0}


def test_truncated_expert_file_is_named(tmp_path):
    """A file cut short inside a tensor: the kernels' read fails, the torch path names it."""
    from mergelab.errors import CheckpointError
    from mergelab.pool.state import LazyStateDict, save_state_dict

    p, e = random_pool(2, seed=3, shapes=((64, 9),))
    for t, sd in e.items():
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
    path = tmp_path / "t1.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    lazy = {t: LazyStateDict(tmp_path / f"{t}.safetensors") for t in e}
    with pytest.raises(CheckpointError, match=r"t1\.safetensors is truncated at tensor 'k0'"):
        Ties().merge(p, lazy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lazy_theta0", [False, True])
def test_reference_mode_is_bitwise_on_files_read_in_slices(
    tmp_path, monkeypatch, kernels, dtype, lazy_theta0
):
    """Experts (and θ0) as lazy safetensors files, read slice by slice into each chunk's
    memory (a float16 file through its own buffer), next to one expert in memory; many
    chunks in both passes, two threads, an empty tensor: bit for bit the reference on the
    same weights. The bracket's sample, runs across tensor boundaries included, is |τ| at
    the sampled runs whichever way it was read (float32 files by the kernels, a pread per
    run; float16 files mapped; the expert in memory indexed)."""
    from mergelab.pool.state import LazyStateDict, save_state_dict

    p, e = random_pool(4, seed=13, shapes=((300, 17), (2000,), (4, 5, 6), (1,), (0, 3)))
    p["step"] = torch.tensor(3)  # a non-float buffer: equal everywhere, passed through
    e = {
        t: {k: v.to(dtype) if v.is_floating_point() else p[k] for k, v in sd.items()}
        for t, sd in e.items()
    }
    for sd in e.values():
        sd["step"] = torch.tensor(3)
    if lazy_theta0:
        p = {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}
    as32 = {t: {k: v.float() for k, v in sd.items() if k != "step"} for t, sd in e.items()}
    want, want_vec = reference_ties(
        {k: v.float() for k, v in p.items() if k != "step"}, as32, 0.3, 0.4, "mean", 50
    )
    want = {k: v.to(p[k].dtype) for k, v in want.items()} | {"step": p["step"]}
    mixed = {}
    for i, (t, sd) in enumerate(e.items()):
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
        mixed[t] = sd if i == 2 else LazyStateDict(tmp_path / f"{t}.safetensors")
    if lazy_theta0:
        save_state_dict(p, tmp_path / "p.safetensors")
        p = LazyStateDict(tmp_path / "p.safetensors")
    monkeypatch.setattr(ties_module, "_CHUNK", 4 * 171)
    monkeypatch.setattr(ties_module, "_FILL_CHUNK", 333)
    monkeypatch.setattr(ops, "_PARTITION_BELOW", 100)  # sampled brackets
    monkeypatch.setattr(ops, "_RUN_SAMPLE", 3500)
    monkeypatch.setattr(ops, "_RUN", 35)  # 100 runs of 35: some cross a tensor boundary
    samples, gathered = [], []
    bracket, gather = ops.bracket, native.gather
    monkeypatch.setattr(ops, "bracket", lambda x, r, m: samples.append(x) or bracket(x, r, m))
    monkeypatch.setattr(native, "gather", lambda *a: gathered.append(a) or gather(*a))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = Ties(k=0.3, scaling=0.4, reduce="mean", extra_zeros=50).merge(p, mixed)
        got_vec = ties_task_vectors(p, mixed, k=0.3, extra_zeros=50)
    finally:
        torch.set_num_threads(n)
    assert_bitwise(got, want)
    for t in e:
        assert_bitwise(got_vec[t], want_vec[t])

    keys = sorted(as32["t0"])  # the float keys, in the order the reference flattens them
    runs = ops.sample_runs([as32["t0"][k].numel() for k in keys])
    at = ops.run_positions(runs)
    assert sum(c.sum() for _, c in runs) == 3500 and sum(len(st) for st, _ in runs) > 100
    p32 = {k: p[k].float() for k in keys}
    want = {  # per task, |τ| at the runs, one run per row
        t: torch.cat(
            [(as32[t][k] - p32[k]).abs().reshape(-1)[torch.from_numpy(j)] for k, j in zip(keys, at)]
        ).view(100, 35)
        for t in e
    }
    # merge, then task vectors: a sample per task each (the brackets run on worker threads,
    # so in any order)
    assert len(samples) == 2 * len(e)
    matched = [[t for t in e if torch.equal(torch.from_numpy(x), want[t])] for x in samples]
    assert sorted(t for m in matched for t in m) == sorted(list(e) * 2)
    # float32 files are read by the kernels: the 3 lazy experts and a lazy θ0, twice
    n_files = 3 + lazy_theta0 if dtype == torch.float32 and kernels == "fused" else 0
    assert len(gathered) == 2 * n_files


def test_lazy_read_into_reads_a_slice(tmp_path):
    from mergelab.pool.state import LazyStateDict, save_state_dict

    x = torch.arange(60, dtype=torch.float32).view(3, 4, 5)
    save_state_dict({"x": x, "h": x.half()}, tmp_path / "m.safetensors")
    sd = LazyStateDict(tmp_path / "m.safetensors")
    out = torch.empty(7)
    assert torch.equal(sd.read_into("x", out, 11), torch.arange(11.0, 18.0))
    fd = os.open(sd.path, os.O_RDONLY)
    try:
        assert torch.equal(sd.read_into("x", torch.empty(60), 0, fd), x.view(-1))
        assert torch.equal(
            sd.read_into("h", torch.empty(2, dtype=torch.half), 58, fd).float(),
            torch.tensor([58.0, 59.0]),
        )
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="float32"):
        sd.read_into("x", torch.empty(3, dtype=torch.half))
    with pytest.raises(ValueError, match="at most 2 elements"):
        sd.read_into("x", torch.empty(3), 58)
    other = {"b": x.bfloat16(), "m": x > 30, "i": x.long()}  # numpy has no bfloat16
    save_state_dict(other, tmp_path / "o.safetensors")
    sd = LazyStateDict(tmp_path / "o.safetensors")
    for key, v in other.items():
        got = sd.read_into(key, torch.empty(5, dtype=v.dtype), 29)
        assert torch.equal(got, v.view(-1)[29:34]), key


def test_lazy_values_at_gathers_positions_from_the_file(tmp_path):
    import mmap

    from mergelab.pool.state import LazyStateDict, save_state_dict

    x = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    # tensors at offsets that are not page-aligned, in several dtypes
    state = {"f": x, "h": x.half(), "b": x.bfloat16(), "i": (x * 100).long(), "z": torch.zeros(0)}
    save_state_dict(state, tmp_path / "m.safetensors")
    sd = LazyStateDict(tmp_path / "m.safetensors")
    at = np.array([599, 0, 7, 7, 123], dtype=np.int64)
    with open(sd.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for key, v in state.items():
            pos = at if v.numel() else at[:0]
            got = sd.values_at(key, pos, mm)
            assert got.dtype == v.dtype and torch.equal(got, v.reshape(-1)[torch.from_numpy(pos)])
    # closing the mapping raised nothing: no array still exported it


def test_per_tensor_scope_is_bitwise_the_reference_trim_per_tensor():
    p, e = random_pool(4, seed=3)
    for k in (0.2, 0.6):
        want, want_vec = reference_ties(p, e, k, 0.3, "sum", scope="per_tensor")
        assert_bitwise(Ties(k=k, scaling=0.3, scope="per_tensor").merge(p, e), want)
        got = ties_task_vectors(p, e, k=k, scope="per_tensor")
        for t in e:
            assert_bitwise(got[t], want_vec[t])


def test_mergelab_mode_is_the_previous_behaviour():
    """mode=mergelab: round(k·d) kept and zero sums elect +1, as mergelab did before."""
    p, e = random_pool(4, seed=5)
    for k in (0.2, 0.5):
        thr = ops.global_thresholds(p, e, k)  # mergelab's count (the default for callers)
        want = {}
        for key in p:
            trimmed = torch.stack([ops.trim(e[t][key] - p[key], thr[t]) for t in e])
            merged = ops.disjoint_merge(trimmed, ops.elect_sign(trimmed), "sum")
            want[key] = p[key] + 0.3 * merged
        got = Ties(k=k, scaling=0.3, mode="mergelab").merge(p, e)
        for key in p:
            assert torch.equal(got[key], want[key]), key


# --- the building blocks ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 5000, 40_000])
def test_kth_smallest_is_kthvalue(n, monkeypatch):
    monkeypatch.setattr(ops, "_PARTITION_BELOW", 64)
    monkeypatch.setattr(ops, "_SAMPLE", 512)
    monkeypatch.setattr(ops, "_COUNT_CHUNK", 1000)
    g = torch.Generator().manual_seed(n)
    x = torch.round(torch.randn(n, generator=g).abs() * 16) / 16  # many ties
    for r in sorted({1, n, (n + 1) // 2, max(1, n - n // 5)}):
        want = float(torch.kthvalue(x, r).values)
        assert ops.kth_smallest(x, r) == want
        assert ops.kth_smallest(list(x.split(max(1, n // 3))), r) == want  # as segments
        assert ops.kth_smallest(list(x.split(max(1, n // 7))), r, threads=3) == want
        # a sample handed in: the caller's own, or a useless one (the bracket misses)
        parts = list(x.split(max(1, n // 3)))
        at = ops.sample_positions([v.numel() for v in parts], seed=5)
        own = torch.cat([v[torch.from_numpy(i)] for v, i in zip(parts, at)])
        assert ops.kth_smallest(parts, r, sample=own) == want
        assert ops.kth_smallest(parts, r, sample=torch.full((512,), -1.0)) == want
    if n > 64:  # sampled: positions sorted within their segment, as many as _SAMPLE
        at = ops.sample_positions([n // 2, 0, n - n // 2])
        assert sum(i.size for i in at) == 512 and at[1].size == 0
        assert all((i[:-1] <= i[1:]).all() and ((0 <= i) & (i < n - n // 2)).all() for i in at)
    with pytest.raises(ValueError):
        ops.kth_smallest(x, n + 1)


def test_sample_runs_are_one_run_per_stratum_split_at_segment_ends(monkeypatch):
    """A streamed pass 1 reads its sample as runs: C = total // length runs of ``length``
    consecutive positions, run c inside stratum c of [0, n); per segment the pieces that
    fall in it (a run across a segment end split in two), in order."""
    monkeypatch.setattr(ops, "_PARTITION_BELOW", 10_000)
    sizes = [5, 0, 300_000, 64, 0, 1, 200_000, 7, 130]
    n, ends, crossing = sum(sizes), np.cumsum([0, *sizes]), 0
    for seed in range(3):
        runs = ops.sample_runs(sizes, seed, length=40, total=40 * 2000)
        at = ops.run_positions(runs)
        assert [st.size for st, _ in runs] == [c.size for _, c in runs]
        for (st, c), pos, size in zip(runs, at, sizes):
            assert ((0 <= st) & (st + c <= size)).all() and (c > 0).all()
            assert (np.diff(pos) > 0).all() and pos.size == c.sum()
        flat = np.concatenate([pos + ends[j] for j, pos in enumerate(at)]).reshape(2000, 40)
        assert (np.diff(flat, axis=1) == 1).all()  # whole runs, in order
        strata = np.arange(2001) * n // 2000
        assert ((strata[:-1] <= flat[:, 0]) & (flat[:, -1] < strata[1:])).all()
        crossing += sum(st.size for st, _ in runs) - 2000  # the extra pieces of split runs
    assert crossing > 0
    a, b = (ops.run_positions(ops.sample_runs(sizes, seed, 40, 80_000)) for seed in (0, 1))
    assert not np.array_equal(a[2], b[2])  # the seed draws the runs
    assert all(st.size == 0 for st, _ in ops.sample_runs([1000, 24], 0, 8, 512))  # small: none


def test_bracket_of_runs_is_as_wide_as_their_likeness_needs(monkeypatch):
    """Values in a run are alike (neighbours in a row, a tensor), so runs say less than as
    many independent values. Here every block of 32 neighbours is equal: bracketing the
    sample as independent values misses the order statistic often; the runs' own standard
    error (neighbouring strata paired) widens the bracket so that it never does here. On
    unrelated values the bracket stays near the binomial one."""
    monkeypatch.setattr(ops, "_PARTITION_BELOW", 10_000)
    rng = np.random.default_rng(0)
    n = 1 << 18
    clumped = np.repeat(rng.random(n // 32, dtype=np.float32), 32)
    loose = rng.random(n, dtype=np.float32)
    r = int(0.8 * n)
    for x, like in ((clumped, True), (loose, False)):
        want = float(np.partition(x, r - 1)[r - 1])
        missed, naive_missed, widths = 0, 0, []
        for seed in range(100):
            pos = ops.run_positions(ops.sample_runs([n], seed, length=32, total=1 << 13))[0]
            runs = x[pos].reshape(-1, 32)
            lo, hi = ops.bracket(runs, r, n)
            missed += not lo <= want <= hi
            widths.append(((x >= lo) & (x <= hi)).mean())
            lo, hi = ops.bracket(runs.reshape(-1), r, n)  # as if independent
            naive_missed += not lo <= want <= hi
            binomial = ((x >= lo) & (x <= hi)).mean()
            assert widths[-1] >= binomial * 0.9  # never (much) narrower than the binomial
        assert missed == 0
        if like:
            assert naive_missed > 10
        else:
            assert naive_missed == 0 and np.mean(widths) < 1.5 * binomial


def test_column_sum_follows_torch_sum_order():
    assert ops.sum_tail_width() > 0  # the probe recognised torch's kernel on this CPU
    for rows in (1, 2, 5, 8, 17, 18, 33):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, 1000, generator=g) * torch.rand(rows, 1000, generator=g) ** 6
        want = x.sum(0)
        got = ops.column_sum(x, torch.empty(1000), 1000, 0, emulate=True)
        assert torch.equal(bits(got), bits(want)), rows
        # a block of columns taken from the middle / the end of the wide matrix
        for lo, hi in ((96, 480), (640, 1000)):
            part = ops.column_sum(x[:, lo:hi].contiguous(), torch.empty(hi - lo), 1000, lo)
            assert torch.equal(bits(part), bits(want[lo:hi])), (rows, lo)
        cols = torch.tensor([3, 500, 990, 999])
        assert torch.equal(ops.column_sum_at(x[:, cols], cols, 1000), want[cols])


def test_bad_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="mode"):
        Ties(mode="fast")
    with pytest.raises(ConfigError, match="extra_zeros.*scope=global"):
        Ties(scope="per_tensor", extra_zeros=5)
    with pytest.raises(ConfigError, match="extra_zeros"):
        Ties(extra_zeros=-1)
    with pytest.raises(ConfigError, match="k must be a fraction"):
        ties_task_vectors({}, {}, k=2.0)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_non_finite_or_misshapen_expert_is_named(scope):
    from mergelab.errors import CheckpointError

    p, e = hand_pool()
    e["e1"]["b"][2] = float("nan")
    with pytest.raises(CheckpointError, match=r"expert 'e1'.*'b'.*non-finite"):
        Ties(scope=scope).merge(p, e)
    p, e = hand_pool()
    e["e2"]["a"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"expert 'e2'.*'a'.*shape"):
        Ties(scope=scope).merge(p, e)
