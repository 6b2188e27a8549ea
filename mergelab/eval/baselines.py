"""Baseline rows (pretrained model, individual experts), computed once per pool and cached.

The cache is keyed by everything that changes these numbers: the pool's identity (family,
backbone, meta, a fingerprint of θ0), the evaluation's precision and device type, and per
task a fingerprint of its expert, head and preprocessed test data — so a row computed for
another zoo, data version, preprocessing or precision is never reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.context import RunContext
from mergelab.eval.evaluator import evaluate
from mergelab.eval.provenance import key_hash, normalized, pool_identity, task_fingerprint
from mergelab.files import atomic_write
from mergelab.pool.base import ModelPool, MultiTaskModel


def baseline_key(pool: ModelPool, ctx: RunContext | None = None) -> dict[str, Any]:
    """The pool's identity plus how it is evaluated (precision, device type)."""
    trainer = ctx.trainer if ctx is not None else {}
    return {
        **pool_identity(pool),
        "precision": str(trainer.get("precision", "32-true")),
        "device_type": ctx.device.type if ctx is not None else "cpu",
    }


def cache_dir_of(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "baselines"


def baseline_cache_path(
    pool: ModelPool, cache_dir: str | Path, ctx: RunContext | None = None
) -> Path:
    return cache_dir_of(cache_dir) / f"{pool.family}-{key_hash(baseline_key(pool, ctx))}.json"


def baselines(
    pool: ModelPool, ctx: RunContext, cache_dir: str | Path
) -> dict[str, dict[str, float]]:
    """``{"pretrained": {task: acc}, "experts": {task: acc of θt on task t}}``, cached per task;
    a task's cached row is reused only while its fingerprint is unchanged. Under DDP rank 0
    reads and writes the cache; every process evaluates the missing rows together."""
    key = normalized(baseline_key(pool, ctx))
    path = baseline_cache_path(pool, cache_dir, ctx)
    cached: dict[str, Any] = {"key": key, "tasks": {}}
    if ctx.is_global_zero and path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key:  # else a hash collision or an old format: start over
            cached = old
    # Rank 0's reading decides what every process evaluates (evaluation is collective).
    cached = ctx.engine.broadcast(cached)
    prints = {t: normalized(task_fingerprint(pool, t)) for t in pool.tasks}
    todo = [t for t in pool.tasks if cached["tasks"].get(t, {}).get("fingerprint") != prints[t]]
    if todo:
        # Zero-shot row: each task with the foundation its expert was fine-tuned from (in a
        # non-local pool, `pretrained` is only the merges' averaged reference).
        pretrained: dict[str, float] = {}
        for base in dict.fromkeys(pool.expert_base.get(t) for t in todo):
            group = [t for t in todo if pool.expert_base.get(t) == base]
            pre = MultiTaskModel(pool.encoder(pool.base_of(group[0]), "pretrained"), pool.heads)
            pretrained.update(evaluate(pre, pool.test_sets, pool.heads, ctx, group))
        for t in todo:
            exp = MultiTaskModel(pool.expert_encoder(t), pool.heads)
            expert = evaluate(exp, pool.test_sets, pool.heads, ctx, [t])[t]
            cached["tasks"][t] = {
                "fingerprint": prints[t],
                "pretrained": pretrained[t],
                "expert": expert,
            }
        if ctx.is_global_zero:
            atomic_write(path, json.dumps(cached, indent=2))
    rows = cached["tasks"]
    return {
        "pretrained": {t: rows[t]["pretrained"] for t in pool.tasks},
        "experts": {t: rows[t]["expert"] for t in pool.tasks},
    }
