"""Provenance in results.json (surgery rank as used, git commit, versions, device, precision,
world size) and the baseline cache key (a stale pretrained/experts row is never reused)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import compose
from torch.utils.data import TensorDataset

import mergelab
from mergelab.context import RunContext
from mergelab.eval import baselines as baselines_module
from mergelab.eval.baselines import baseline_cache_path, baseline_key, baselines
from mergelab.eval.provenance import code_version, library_versions, pool_identity, task_fingerprint
from mergelab.pipeline import run
from mergelab.pool.heads import ClassificationHead
from mergelab.zoo.synthetic import synthetic_pool

FAST = ["analysis.bias=false", "analysis.task_vectors=false"]


def test_results_record_the_surgery_rank_actually_used(tiny_cache, tmp_path):
    cfg = compose(["surgery=v1", "surgery.rank=8", "surgery.steps=2", *FAST], tiny_cache)
    res = run(cfg, tmp_path / "v1")
    assert res["rank"] == 8 and cfg.rank == 16  # the top-level default was overridden
    assert "(rank 8)" in res["label"]
    saved = json.loads((tmp_path / "v1" / "results.json").read_text())
    assert saved["rank"] == 8
    res = run(compose(FAST, tiny_cache), tmp_path / "none")
    assert res["rank"] is None  # no surgery: no rank


def test_results_record_code_versions_device_precision_world_size(tiny_cache, tmp_path):
    res = run(compose(FAST, tiny_cache), tmp_path / "r")
    prov = json.loads((tmp_path / "r" / "results.json").read_text())["provenance"]
    assert prov == json.loads(json.dumps(res["provenance"]))
    repo = Path(mergelab.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:  # running from a checkout (as in CI)
        assert prov["git_commit"] == head.stdout.strip() and isinstance(prov["git_dirty"], bool)
    assert torch.__version__.startswith(prov["versions"]["torch"])
    assert set(prov["versions"]) == {"torch", "open_clip", "lightning", "mergelab"}
    assert prov["versions"]["mergelab"] is not None and prov["versions"]["lightning"] is not None
    assert prov["device"] == "cpu" and prov["accelerator"] == "cpu"
    assert prov["precision"] == "32-true" and prov["world_size"] == 1


def test_code_version_outside_a_checkout_is_null(monkeypatch):
    def no_git(*a, **k):
        raise subprocess.CalledProcessError(128, "git")

    code_version.cache_clear()
    monkeypatch.setattr(subprocess, "run", no_git)
    try:
        assert code_version() == {"git_commit": None, "git_dirty": None}
    finally:
        code_version.cache_clear()
    assert library_versions()["open_clip"] is not None


# --- the baseline cache key ------------------------------------------------------------------


def ctx(tmp_path, **trainer) -> RunContext:
    return RunContext(out_dir=tmp_path, trainer={"accelerator": "cpu", "devices": 1, **trainer})


def test_baseline_key_changes_with_everything_that_changes_the_numbers(tmp_path):
    pool = synthetic_pool(n_tasks=2)
    key = baseline_key(pool, ctx(tmp_path))
    assert baseline_key(synthetic_pool(n_tasks=2), ctx(tmp_path)) == key  # deterministic
    assert baseline_key(pool, ctx(tmp_path, precision="bf16-mixed")) != key
    other_meta = dataclasses.replace(pool, meta={**pool.meta, "zoo_config": {"data": 2}})
    assert baseline_key(other_meta, ctx(tmp_path)) != key
    theta0 = {k: v.clone() for k, v in pool.pretrained.items()}
    first = sorted(theta0)[0]
    theta0[first] = theta0[first] + 1e-3
    assert baseline_key(dataclasses.replace(pool, pretrained=theta0), ctx(tmp_path)) != key

    prints = task_fingerprint(pool, "task0")
    x, y = pool.test_sets["task0"].tensors
    resized = dataclasses.replace(
        pool, test_sets={**pool.test_sets, "task0": TensorDataset(x * 0.5 + 0.1, y)}
    )  # another preprocessing of the same images
    assert task_fingerprint(resized, "task0")["data"] != prints["data"]
    head = ClassificationHead(pool.heads["task0"].weight.detach() * 2)
    reheaded = dataclasses.replace(pool, heads={**pool.heads, "task0": head})
    assert task_fingerprint(reheaded, "task0")["head"] != prints["head"]
    expert = {k: v.clone() for k, v in pool.experts["task0"].items()}
    last = sorted(expert)[-1]
    expert[last] = expert[last] * 1.01
    retrained = dataclasses.replace(pool, experts={**pool.experts, "task0": expert})
    assert task_fingerprint(retrained, "task0")["expert"] != prints["expert"]
    assert task_fingerprint(retrained, "task1") == task_fingerprint(pool, "task1")
    assert pool_identity(retrained) == pool_identity(pool)


def test_stale_rows_are_recomputed_and_fresh_ones_reused(tmp_path, monkeypatch):
    calls: list[tuple[str, ...]] = []
    real = baselines_module.evaluate

    def counting(model, datasets, heads, c, tasks=None):
        calls.append(tuple(tasks))
        return real(model, datasets, heads, c, tasks)

    monkeypatch.setattr(baselines_module, "evaluate", counting)
    pool, c, cache = synthetic_pool(n_tasks=2), ctx(tmp_path), tmp_path / "cache"
    first = baselines(pool, c, cache)
    assert calls == [("task0", "task1"), ("task0",), ("task1",)]
    calls.clear()
    assert baselines(pool, c, cache) == first and calls == []  # cached
    # task1's data is preprocessed differently now: only task1 is evaluated again
    x, y = pool.test_sets["task1"].tensors
    changed = dataclasses.replace(
        pool, test_sets={**pool.test_sets, "task1": TensorDataset(x.flip(-1), y)}
    )
    baselines(changed, c, cache)
    assert calls == [("task1",), ("task1",)]
    calls.clear()
    # another precision is another cache file
    assert baseline_cache_path(pool, cache, ctx(tmp_path, precision="bf16-mixed")) != (
        baseline_cache_path(pool, cache, c)
    )
    stored = json.loads(baseline_cache_path(changed, cache, c).read_text())
    assert set(stored["tasks"]) == {"task0", "task1"} and "key" in stored


@pytest.mark.parametrize("garbage", ['{"pretrained": {}, "experts": {}}', '{"key": 1}'])
def test_an_old_or_foreign_cache_file_is_not_trusted(tmp_path, garbage):
    pool, c, cache = synthetic_pool(n_tasks=1), ctx(tmp_path), tmp_path / "cache"
    path = baseline_cache_path(pool, cache, c)
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    out = baselines(pool, c, cache)
    assert set(out["pretrained"]) == {"task0"}


def test_a_non_local_task_fingerprint_follows_its_foundation():
    pool = synthetic_pool(n_tasks=2)
    other = {k: v + 0.1 for k, v in pool.pretrained.items()}
    nonlocal_pool = dataclasses.replace(
        pool, bases={"a": pool.pretrained, "b": other}, expert_base={"task0": "a", "task1": "b"}
    )
    moved = dataclasses.replace(
        nonlocal_pool, bases={"a": pool.pretrained, "b": {k: v * 2 for k, v in other.items()}}
    )
    assert task_fingerprint(moved, "task0") == task_fingerprint(nonlocal_pool, "task0")
    assert task_fingerprint(moved, "task1") != task_fingerprint(nonlocal_pool, "task1")
    assert "base" not in task_fingerprint(pool, "task0")  # local: θ0 is in the pool identity
