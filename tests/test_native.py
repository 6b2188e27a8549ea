"""Building the fused TIES kernels (mergelab.merge.native): compiled once per source, compiler
and CPU into the cache, with fallbacks that keep TIES working — a compiler that rejects
-march=native, no compiler or a broken one, MERGELAB_NATIVE=0 — and the same bits either way."""

from __future__ import annotations

import logging

import pytest
import torch

from mergelab.merge import native
from mergelab.merge.ties import Ties


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded kernels (restored after)."""
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    yield tmp_path / "native"
    native.kernels.cache_clear()


def pool(n_tasks=3, size=(150, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {"w": torch.randn(size, generator=g), "b": torch.randn(40, generator=g)}
    e = {
        f"t{i}": {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in p.items()}
        for i in range(n_tasks)
    }
    return p, e


def same_bits(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a
    )


def on_torch(monkeypatch) -> None:
    """From here on, TIES runs its torch ops."""
    monkeypatch.setenv("MERGELAB_NATIVE", "0")
    native.kernels.cache_clear()


def needs_compiler():
    if native.compiler() is None:
        pytest.skip("no C compiler here: nothing to build")


def test_builds_once_into_the_cache_and_merges_like_torch(fresh, monkeypatch):
    needs_compiler()
    lib = native.kernels()
    assert lib is not None
    built = sorted(fresh.glob("ties_kernels-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.tmp"))
    p, e = pool()
    fused = Ties(k=0.3, scaling=0.4, reduce="mean").merge(p, e)
    native.kernels.cache_clear()
    assert native.kernels() is not None  # loaded again from the cache, not rebuilt
    assert sorted(fresh.glob("ties_kernels-*.so")) == built
    on_torch(monkeypatch)
    assert same_bits(fused, Ties(k=0.3, scaling=0.4, reduce="mean").merge(p, e))


def test_each_cpu_gets_its_own_build(fresh, monkeypatch):
    """A cache shared by machines with different CPUs (a cluster's home directory) must never
    hand one CPU's -march=native build to another."""
    needs_compiler()
    monkeypatch.setattr(native, "_cpu", lambda: "flags: sse2")
    native.kernels()
    native.kernels.cache_clear()
    monkeypatch.setattr(native, "_cpu", lambda: "flags: sse2 avx2")
    native.kernels()
    assert len(list(fresh.glob("ties_kernels-*.so"))) == 2


def test_a_compiler_without_march_native_builds_for_its_default_target(fresh, monkeypatch):
    needs_compiler()
    monkeypatch.setattr(native, "NATIVE", ["-march=no-such-cpu"])
    assert native.kernels() is not None
    p, e = pool(seed=1)
    fused = Ties().merge(p, e)
    on_torch(monkeypatch)
    assert same_bits(fused, Ties().merge(p, e))


@pytest.mark.parametrize("cc", ["no-such-compiler-here", "false"])
def test_no_or_broken_compiler_falls_back_to_torch(fresh, monkeypatch, caplog, cc):
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.WARNING, logger="mergelab.merge.native"):
        assert native.kernels() is None
    assert "TIES runs on torch ops" in caplog.text
    assert not (fresh.exists() and any(fresh.iterdir()))  # nothing half-written left
    p, e = pool(seed=2)
    assert torch.isfinite(Ties().merge(p, e)["w"]).all()


def test_native_off_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("MERGELAB_NATIVE", "0")
    assert native.kernels() is None
    assert not fresh.exists()  # nothing was built


def test_kernel_blocks_of_all_sources_stay_within_the_cache_budget():
    """θ0 and T experts are read block by block; however many experts, the blocks of all
    sources together stay at 9 × BLOCK floats (what 8 experts use), so they stay in L2."""
    assert native.block(9) == native.BLOCK
    for n_sources in (2, 9, 10, 19, 100, 1000):
        assert 1 <= native.block(n_sources) <= native.BLOCK
        assert native.buffer_size(n_sources) <= 9 * native.BLOCK
    assert native.block(19) < native.BLOCK  # 18 experts: smaller blocks
