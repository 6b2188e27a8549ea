"""A zoo's regime: the measurable properties that say which merging regime it is in.

Merging behaves differently when experts sit close to their base (the CLIP benchmark: small
task vectors, nearly orthogonal to each other) than when they drift far from it or share no
base at all. The properties below define the regime; how methods then rank on the zoo is a
measurement, never a thing the zoo is tuned for:

- ``experts``: mean accuracy of each expert on its own task;
- ``pretrained``: mean zero-shot accuracy (each task with its expert's own foundation);
- ``weight_averaging``: mean accuracy of the plain average of the experts;
- ``tau_ratio``: ‖τt‖ / ‖θ0‖ per task with τt = θt − (the θ0 merges use); median reported;
- ``cosine_mean``: mean pairwise cosine similarity of the task vectors;
- non-local zoos also report ``finetune_ratio``: ‖θt − θ0(t)‖ / ‖θ0(t)‖ from the expert's own
  foundation (how far fine-tuning itself moved).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from mergelab.context import RunContext
from mergelab.engine import Engine
from mergelab.eval.baselines import baselines
from mergelab.eval.evaluator import evaluate
from mergelab.pool.base import ModelPool, MultiTaskModel

# target name → (property, comparison, how it reads)
CHECKS = {
    "experts_min": lambda r, v: r["experts"] >= v,
    "pretrained_range": lambda r, v: v[0] <= r["pretrained"] <= v[1],
    "wa_above_pretrained": lambda r, v: r["weight_averaging"] >= r["pretrained"] + v,
    "wa_below_experts": lambda r, v: r["weight_averaging"] <= r["experts"] - v,
    "tau_ratio_median_max": lambda r, v: r["tau_ratio_median"] <= v,
    "cosine_mean_max": lambda r, v: r["cosine_mean"] <= v,
}


def _mean(row: dict[str, float]) -> float:
    return sum(row.values()) / len(row)


def measure_regime(
    pool: ModelPool,
    cache_dir: str | Path,
    targets: dict | None = None,
    engine: Engine | None = None,
) -> dict:
    """Measure the regime properties of ``pool`` (all of its tasks) and check ``targets``;
    the evaluations run through ``engine``'s config (the CPU in fp32 without one)."""
    from mergelab.analysis.geometry import task_vector_geometry
    from mergelab.merge.weight_average import WeightAverage

    tasks = pool.tasks
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(out_dir=Path(tmp), trainer=(engine or Engine()).config)
        # the zero-shot and expert rows are the run's baseline rows: computed once, cached
        base = baselines(pool, ctx, cache_dir)
        zero_shot, experts = base["pretrained"], base["experts"]
        averaged = WeightAverage().merge(pool.pretrained, pool.experts)
        wa = evaluate(
            MultiTaskModel(pool.encoder(averaged, "weight average"), pool.heads),
            pool.test_sets,
            pool.heads,
            ctx,
            tasks,
        )
    geo = task_vector_geometry(pool.pretrained, pool.experts)
    out = {
        "tasks": list(tasks),
        "experts": round(_mean(experts), 2),
        "pretrained": round(_mean(zero_shot), 2),
        "weight_averaging": round(_mean(wa), 2),
        "tau_ratio_median": round(geo["median_ratio"], 4),
        "cosine_mean": round(geo["mean_cosine"] or 0.0, 4),
        "per_task": {
            t: {
                "expert": round(experts[t], 2),
                "pretrained": round(zero_shot[t], 2),
                "weight_averaging": round(wa[t], 2),
                "tau_ratio": round(geo["ratios"][t], 4),
            }
            for t in tasks
        },
    }
    if pool.bases:
        own = {}
        for t in tasks:
            g = task_vector_geometry(pool.base_of(t), {t: pool.experts[t]})
            own[t] = g["ratios"][t]
        out["finetune_ratio_median"] = round(statistics.median(own.values()), 4)
        for t in tasks:
            out["per_task"][t]["finetune_ratio"] = round(own[t], 4)
    if targets:
        out["targets"] = dict(targets)
        out["checks"] = {k: bool(CHECKS[k](out, v)) for k, v in targets.items()}
    return out


def print_regime(name: str, r: dict) -> None:
    checks = r.get("checks", {})

    def mark(*keys: str) -> str:
        got = [checks[k] for k in keys if k in checks]
        return "" if not got else (" ✓" if all(got) else " ✗")

    lines = [
        f"experts {r['experts']:.1f}{mark('experts_min')}",
        f"pretrained (zero-shot) {r['pretrained']:.1f}{mark('pretrained_range')}",
        f"weight averaging {r['weight_averaging']:.1f}"
        f"{mark('wa_above_pretrained', 'wa_below_experts')}",
        f"median ‖τ‖/‖θ0‖ {r['tau_ratio_median']:.3f}{mark('tau_ratio_median_max')}",
        f"mean task-vector cosine {r['cosine_mean']:.3f}{mark('cosine_mean_max')}",
    ]
    if "finetune_ratio_median" in r:
        lines.append(f"median fine-tuning ‖θt − θ0(t)‖/‖θ0(t)‖ {r['finetune_ratio_median']:.3f}")
    print(f"[mergelab zoo] regime of {name}: " + " · ".join(lines), flush=True)
