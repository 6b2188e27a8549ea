"""mergelab.files: the one atomic writer (results, caches, weights, plots)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from mergelab.files import atomic_path, atomic_write
from mergelab.pool.state import LazyStateDict, save_state_dict


def test_text_bytes_and_callable_land_whole_and_readable(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert atomic_write(p, "λ=0.3\n") == p
    assert p.read_text(encoding="utf-8") == "λ=0.3\n"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda f: f.write(b"xyz"))
    assert p.read_bytes() == b"xyz"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert os.listdir(p.parent) == ["a.txt"]  # no temp file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "results.json"
    atomic_write(p, "old")

    def half(f):
        f.write(b"new but incomp")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(p, half)
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("also incomplete")
        raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_state_dicts_are_saved_through_it(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([3])}
    save_state_dict(state, tmp_path / "m.safetensors")
    back = LazyStateDict(tmp_path / "m.safetensors")
    assert set(back) == {"w", "n"}
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["n"], state["n"])
    assert os.listdir(tmp_path) == ["m.safetensors"]
