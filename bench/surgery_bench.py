"""Surgery benchmark: cached training (DESIGN §6) vs the reference loop, for v1 and v2.

The reference loop (``cache: false``) re-runs each task's expert — and, for v1, the merged
model — on every step's batch, as the authors' code does. The cached path computes the fixed
targets once per drawn test image. Both use the same seed, schedule and number of steps, so
they train the same modules; this prints both wall times and CPU times (end to end, caching
included; CPU time is the steadier number on a shared machine), their ratios, and both final
accuracies (against labels, and agreement with each task's expert, which is the meaningful
number on a random synthetic pool).

Where the speed-up comes from, and its ceiling: v1 runs the two frozen encoders once per
distinct drawn image instead of once per draw, so on a compute-bound CPU its speed-up is at
most about steps × batch_size / test images per task (8× for 500 × 16 on 1,000 images), more
on a GPU where large extraction batches are cheaper per image. v2 only drops the expert's
forward pass; the merged backbone's forward + backward stays, so its ceiling is ≈1.5×.

    python -m bench.surgery_bench [--steps 500] [--rank 16] [--tasks 8] [--images 1000]

Then the step cost of v1 and v2 through the run's Lightning engine on a ViT-B/32-sized random
model, as a ratio to one forward (v1) / forward + backward (v2) of the merged model, on 1 and
2 CPU processes (DDP, gloo): see :mod:`bench.scaling` (``--skip-scaling``, ``--processes``,
``--scaling-*``; ``--skip-compare`` runs only this part).

``run_bench(pool, steps, rank, seed)`` runs the same on any ModelPool (e.g. the embedded
8-task benchmark) and returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bench.scaling import add_scaling_arguments, quiet, run_scaling
from mergelab.context import RunContext
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.v1 import SurgeryV1
from mergelab.surgery.v2 import SurgeryV2

KINDS = {"v1": SurgeryV1, "v2": SurgeryV2}


def weight_average(pool: ModelPool) -> MultiTaskModel:
    """The merged model the surgery repairs: the mean of the experts, key by key."""
    merged = {}
    for k, base in pool.pretrained.items():
        vals = [pool.experts[t][k] for t in pool.tasks]
        merged[k] = (
            torch.stack(vals).mean(0).to(base.dtype) if base.is_floating_point() else base.clone()
        )
    return MultiTaskModel(pool.encoder(merged), pool.heads)


@torch.no_grad()
def evaluate(
    model: MultiTaskModel, pool: ModelPool, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Per-task accuracy against the labels and agreement with the task's expert."""
    model.eval()
    out = {}
    for t in pool.tasks:
        expert = MultiTaskModel(pool.expert_encoder(t), {t: pool.heads[t]}).eval()
        hit = agree = n = 0
        for x, y in DataLoader(pool.test_sets[t], batch_size=batch_size):
            pred = model(x, t).argmax(-1)
            hit += int((pred == y).sum())
            agree += int((pred == expert(x, t).argmax(-1)).sum())
            n += len(y)
        out[t] = {"acc": hit / n, "agree": agree / n}
    return out


def _mean(per_task: dict[str, dict[str, float]], key: str) -> float:
    return sum(v[key] for v in per_task.values()) / len(per_task)


def run_bench(
    pool: ModelPool, steps: int = 500, rank: int = 16, seed: int = 0, batch_size: int = 16
) -> dict:
    """Train v1 and v2 cached and with the reference loop on ``pool``; time and score both."""
    results: dict = {
        "steps": steps,
        "rank": rank,
        "seed": seed,
        "batch_size": batch_size,
        "backbone": pool.backbone,
    }
    results["merged"] = evaluate(weight_average(pool), pool)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(out_dir=Path(tmp))
        for kind in KINDS.values():  # warm-up: first-call costs (Lightning, kernels) untimed
            for cache in (True, False):
                kind(rank=rank, steps=1, batch_size=2, cache=cache, save=False).apply(
                    weight_average(pool), pool, ctx
                )
        for name, kind in KINDS.items():
            row = {}
            for mode, cache in (("cached", True), ("reference", False)):
                surgery = kind(
                    rank=rank,
                    steps=steps,
                    batch_size=batch_size,
                    seed=seed,
                    cache=cache,
                    save=False,
                )
                model = weight_average(pool)
                t0, c0 = time.perf_counter(), time.process_time()
                model = surgery.apply(model, pool, ctx)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                per_task = evaluate(model, pool)
                row[mode] = {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "acc": _mean(per_task, "acc"),
                    "agree": _mean(per_task, "agree"),
                    "final_loss": model.loss_history[-1],
                    "per_task": per_task,
                }
            row["speedup"] = row["reference"]["wall_s"] / row["cached"]["wall_s"]
            row["speedup_cpu"] = row["reference"]["cpu_s"] / row["cached"]["cpu_s"]
            results[name] = row
    return results


def print_results(r: dict) -> None:
    print(f"backbone {r['backbone']}, {r['steps']} steps, rank {r['rank']}, "
          f"batch {r['batch_size']}, seed {r['seed']}")  # fmt: skip
    print(f"merged (no surgery): acc {100 * _mean(r['merged'], 'acc'):.1f}  "
          f"expert agreement {100 * _mean(r['merged'], 'agree'):.1f}")  # fmt: skip
    print(f"{'kind':4} {'wall ref/cached s':>18} {'speedup':>8} {'cpu ref/cached s':>17} "
          f"{'speedup':>8} {'acc ref/cached':>15} {'agree ref/cached':>17} "
          f"{'final loss ref/cached':>22}")  # fmt: skip
    for name in KINDS:
        ref, c = r[name]["reference"], r[name]["cached"]
        print(
            f"{name:4} {ref['wall_s']:9.2f}/{c['wall_s']:<8.2f} {r[name]['speedup']:7.1f}x "
            f"{ref['cpu_s']:8.2f}/{c['cpu_s']:<8.2f} {r[name]['speedup_cpu']:7.1f}x "
            f"{100 * ref['acc']:7.1f}/{100 * c['acc']:<7.1f} "
            f"{100 * ref['agree']:8.1f}/{100 * c['agree']:<8.1f} "
            f"{ref['final_loss']:11.4f}/{c['final_loss']:<10.4f}"
        )


def embedded_benchmark_pool(overrides: list[str] | None = None) -> ModelPool:
    """The default run's pool (``model=embedded tasks=embedded8``), built/cached as the CLI does."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="mergelab.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides or [])
    return instantiate(
        cfg.model, tasks=list(cfg.tasks.names), cache_dir=cfg.paths.cache_dir, _convert_="all"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--images", type=int, default=1000, help="test images per task")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--embedded", action="store_true",
        help="use the embedded benchmark's real zoo (model=embedded tasks=embedded8) instead of a synthetic pool",
    )  # fmt: skip
    p.add_argument("--skip-compare", action="store_true", help="only the step-cost table")
    add_scaling_arguments(p)
    a = p.parse_args()
    quiet()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    out: dict = {}
    if not a.skip_compare:
        out["compare"] = compare(a)
        print()
    out["scaling"] = run_scaling(["v1", "v2"], a)
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2))


def compare(a: argparse.Namespace) -> dict:
    """Cached vs reference loop on the embedded shape (or the embedded zoo)."""
    from mergelab.zoo.synthetic import synthetic_pool

    if a.embedded:
        pool = embedded_benchmark_pool()
    else:
        # The embedded benchmark's shape (28 px, patch 7, width 128, 4 blocks), random weights.
        pool = synthetic_pool(
        n_tasks=a.tasks, width=a.width, layers=a.layers, heads=max(1, a.width // 64), embed_dim=a.width // 2,
            image_size=28, patch_size=7, n_classes=10, n_images=a.images, expert_noise=0.02, seed=a.seed,
        )  # fmt: skip
    r = run_bench(pool, a.steps, a.rank, a.seed, a.batch_size)
    print_results(r)
    return r


if __name__ == "__main__":
    main()
