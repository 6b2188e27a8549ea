"""The chunked streaming path of elementwise merges (task arithmetic, weight averaging):
bit-identical to the whole-tensor path on every kind of input, with the same checks."""

from __future__ import annotations

import os

import pytest
import torch

from mergelab.errors import CheckpointError
from mergelab.merge import base as merge_base
from mergelab.merge.base import MergeMethod, merge_elementwise
from mergelab.merge.dare import Dare
from mergelab.merge.task_arithmetic import TaskArithmetic
from mergelab.merge.weight_average import WeightAverage
from mergelab.pool.state import LazyStateDict, save_state_dict

SHAPES = {
    "w": (7, 13),  # 91 entries: not a multiple of the chunk sizes below
    "b": (13,),
    "scalar": (),
    "empty": (0, 3),
    "big": (1000,),
    "steps": None,  # an integer buffer
}


def pool(dtype: torch.dtype, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p, e = {}, {f"t{i}": {} for i in range(n)}
    for key, shape in SHAPES.items():
        if shape is None:
            p[key] = torch.tensor([3, 1, 4], dtype=torch.int64)
            for sd in e.values():
                sd[key] = p[key].clone()
            continue
        b = torch.randn(shape, generator=g)
        p[key] = b.to(dtype)
        for sd in e.values():
            sd[key] = (b + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    return p, e


def lazy(sd, path):
    save_state_dict(sd, path)
    return LazyStateDict(path)


def whole_path(method: MergeMethod, p, e, monkeypatch):
    """The merge as MergeMethod.merge computes it on whole tensors."""
    with monkeypatch.context() as m:
        m.setattr(type(method), "elementwise", False)
        out = method.merge(p, e)
    return out, list(method.merged_keys)


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


METHODS = [TaskArithmetic(0.3), TaskArithmetic(1.0 / 3), WeightAverage()]


def test_flagged_methods():
    assert TaskArithmetic.elementwise and WeightAverage.elementwise
    assert not MergeMethod.elementwise


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("where", ["memory", "lazy_experts", "lazy_all"])
@pytest.mark.parametrize("chunk", [16, merge_base.CHUNK])
def test_bit_identical_to_whole_tensors(method, dtype, where, chunk, tmp_path, monkeypatch):
    p, e = pool(dtype)
    in_memory, _ = whole_path(method, p, e, monkeypatch)
    if where != "memory":
        e = {t: lazy(sd, tmp_path / f"{t}.safetensors") for t, sd in e.items()}
    if where == "lazy_all":  # (a safetensors file orders its keys its own way)
        p = lazy(p, tmp_path / "p.safetensors")
    want, want_keys = whole_path(method, p, e, monkeypatch)
    assert_same(want, {key: in_memory[key] for key in p.keys()})
    assert sorted(want_keys) == ["b", "big", "empty", "scalar", "w"]
    for workers in (1, 3):
        got, keys = merge_elementwise(method.merge_key, p, e, chunk=chunk, workers=workers)
        assert_same(got, want)
        assert keys == want_keys
    assert_same(method.merge(p, e), want)
    assert method.merged_keys == want_keys


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_mixed_precisions(method, tmp_path, monkeypatch):
    """θ0 in bfloat16, experts in float32 / float16 / bfloat16: output in θ0's dtype."""
    p, e32 = pool(torch.float32)
    p = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in p.items()}
    e = {}
    for (t, sd), dt in zip(e32.items(), (torch.float32, torch.float16, torch.bfloat16)):
        e[t] = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
    want, _ = whole_path(method, p, e, monkeypatch)
    assert want["w"].dtype == torch.bfloat16
    lz = {t: lazy(sd, tmp_path / f"{t}.safetensors") for t, sd in e.items()}
    mixed = {"t0": e["t0"], "t1": lz["t1"], "t2": lz["t2"]}  # lazy and in-memory together
    for experts in (e, lz, mixed):
        got, _ = merge_elementwise(method.merge_key, p, experts, chunk=16, workers=2)
        assert_same(got, want)


def test_known_answer_chunked():
    """θ0 = 1, τa = [1, 0, ...], τb = [0, 2, ...] over 37 entries in chunks of 5."""
    p = {"w": torch.ones(37)}
    a, b = torch.ones(37), torch.ones(37)
    a[::2] += 1.0
    b[1::2] += 2.0
    got, _ = merge_elementwise(TaskArithmetic(0.5).merge_key, p, {"a": {"w": a}, "b": {"w": b}}, 5)
    want = torch.where(torch.arange(37) % 2 == 0, 1.5, 2.0)
    assert torch.equal(got["w"], want)


def test_merge_key_sees_chunks_and_views():
    """merge_key gets 1-D slices of at most ``chunk`` entries; float32 tensors in memory are
    handed over as views (no copy)."""
    seen = []

    class Spy(TaskArithmetic):
        def merge_key(self, key, base, experts):
            seen.append((key, base.numel(), [v.untyped_storage().data_ptr() for v in experts]))
            return super().merge_key(key, base, experts)

    p, e = pool(torch.float32)
    Spy(0.3).merge(p, {"a": e["t0"]})
    big = [s for s in seen if s[0] == "big"]
    assert sum(n for _, n, _ in big) == 1000 and max(n for _, n, _ in big) <= merge_base.CHUNK
    ptr = e["t0"]["big"].untyped_storage().data_ptr()
    assert all(ptrs == [ptr] for _, _, ptrs in big)
    seen.clear()
    merge_elementwise(Spy(0.3).merge_key, p, {"a": e["t0"]}, chunk=64)
    assert [n for k, n, _ in seen if k == "big"] == [64] * 15 + [40]


def test_non_finite_names_first_expert_and_key(tmp_path, monkeypatch):
    """The first key (in θ0's order) holding a non-finite expert entry, and in it the first
    expert (in order) — wherever in the tensor the entries are, as the whole-tensor path."""
    p, e = pool(torch.float32)
    e["t2"]["big"][3] = float("nan")  # first chunk, last expert
    e["t1"]["big"][990] = float("inf")  # last chunk, earlier expert
    for earlier in (False, True):
        if earlier:  # a key before "big" in θ0's order
            e["t2"]["scalar"] = torch.tensor(float("-inf"))
        lz = {t: lazy(sd, tmp_path / f"{t}{earlier}.safetensors") for t, sd in e.items()}
        for method in METHODS:
            with pytest.raises(CheckpointError) as whole:
                whole_path(method, p, e, monkeypatch)
            where = "'t2': key 'scalar'" if earlier else "'t1': key 'big'"
            assert str(whole.value) == f"expert {where} holds non-finite values"
            for experts in (e, lz):
                with pytest.raises(CheckpointError) as got:
                    merge_elementwise(method.merge_key, p, experts, chunk=16, workers=2)
                assert str(got.value) == str(whole.value)


def test_finite_values_whose_sum_overflows_are_not_an_error(monkeypatch):
    """Entries near float32's maximum: their chunk sum overflows but nothing is non-finite."""
    p = {"w": torch.zeros(40)}
    e = {t: {"w": torch.full((40,), 3e38)} for t in "ab"}
    for method in METHODS:
        want, _ = whole_path(method, p, e, monkeypatch)
        got, _ = merge_elementwise(method.merge_key, p, e, chunk=16)
        assert_same(got, want)


def test_integer_buffers_and_shapes_checked_as_before(monkeypatch):
    p, e = pool(torch.float32)
    e["t1"]["steps"] = torch.tensor([3, 1, 5])
    msg = "expert 't1': non-float key 'steps' differs from pretrained; it cannot be merged"
    for method in METHODS:
        with pytest.raises(CheckpointError, match=msg):
            method.merge(p, e)
    p, e = pool(torch.float32)
    e["t0"]["w"] = torch.zeros(13, 7)
    with pytest.raises(CheckpointError, match=r"expert 't0': key 'w' has shape \(13, 7\)"):
        TaskArithmetic().merge(p, e)
    p, e = pool(torch.float32)
    out = WeightAverage().merge(p, e)
    assert torch.equal(out["steps"], p["steps"]) and out["steps"] is not p["steps"]


def test_an_earlier_key_error_wins_over_a_later_integer_mismatch():
    p, e = pool(torch.float32)
    e["t2"]["w"][0, 0] = float("nan")
    e["t0"]["steps"] = torch.tensor([0, 0, 0])  # "steps" comes after "w"
    with pytest.raises(CheckpointError, match="expert 't2': key 'w' holds non-finite"):
        TaskArithmetic().merge(p, e)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_files_are_closed(tmp_path):
    p, e = pool(torch.float32)
    lz = {t: lazy(sd, tmp_path / f"{t}.safetensors") for t, sd in e.items()}
    lp = lazy(p, tmp_path / "p.safetensors")
    before = _open_fds()
    TaskArithmetic().merge(lp, lz)
    assert _open_fds() == before
    e["t1"]["w"][2, 2] = float("nan")
    lz["t1"] = lazy(e["t1"], tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="expert 't1'"):
        TaskArithmetic().merge(lp, lz)
    assert _open_fds() == before


def test_dare_over_task_arithmetic_unchanged(monkeypatch):
    """DARE hands TaskArithmetic its dropped experts (computed whole, float32): the streamed
    merge over them gives the whole-tensor result."""
    p, e = pool(torch.float32)
    dare = Dare(p=0.5, base="task_arithmetic", scaling=0.3, seed=1)
    got = dare.merge(p, e)
    with monkeypatch.context() as m:
        m.setattr(TaskArithmetic, "elementwise", False)
        want = dare.merge(p, e)
    assert_same(got, want)
