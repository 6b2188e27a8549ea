"""Baseline rows (pretrained model, individual experts), computed once per pool and cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergelab.context import RunContext
from mergelab.eval.evaluator import evaluate
from mergelab.eval.report import atomic_write
from mergelab.pool.base import ModelPool, MultiTaskModel


def baseline_cache_path(pool: ModelPool, cache_dir: str | Path) -> Path:
    ident = json.dumps(
        {"family": pool.family, "backbone": pool.backbone, "meta": pool.meta},
        sort_keys=True,
        default=str,
    )
    h = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "baselines" / f"{pool.family}-{h}.json"


def baselines(
    pool: ModelPool, ctx: RunContext, cache_dir: str | Path
) -> dict[str, dict[str, float]]:
    """``{"pretrained": {task: acc}, "experts": {task: acc of θt on task t}}``, cached per task."""
    path = baseline_cache_path(pool, cache_dir)
    cached = json.loads(path.read_text()) if path.exists() else {"pretrained": {}, "experts": {}}
    todo = [t for t in pool.tasks if t not in cached["pretrained"] or t not in cached["experts"]]
    if todo:
        pre = MultiTaskModel(pool.pretrained_encoder(), pool.heads)
        cached["pretrained"].update(evaluate(pre, pool.test_sets, pool.heads, ctx, todo))
        for t in todo:
            exp = MultiTaskModel(pool.expert_encoder(t), pool.heads)
            cached["experts"].update(evaluate(exp, pool.test_sets, pool.heads, ctx, [t]))
        atomic_write(path, json.dumps(cached, indent=2))
    return {k: {t: v[t] for t in pool.tasks} for k, v in cached.items()}
