"""AdaMerging step cost (Yang et al., ICLR 2024) next to a plain forward+backward.

One AdaMerging step = build θ(λ) = θ0 + Σt clamp(λ)t τt functionally, run every task's batch
through it, entropy loss, backward to λ, Adam step. The reference is what any gradient step
on the merged model costs anyway: the same batch through a plain nn.Module holding the merged
weights, same heads and loss, backward with gradients on its weights. The gap is the price of
building θ(λ) and of reducing the weight gradients onto λ (aim: ≤ 1.5×).

Both are timed on the same machine and batch, interleaved (A, B, A, B, ...) after warm-up so
that drifting load hits both alike; the median of ``repeats`` is reported.

    python -m bench.adamerging_bench                          # embedded, then ViT-B/32 size
    python -m bench.adamerging_bench --size embedded --batch-size 16 --repeats 10
    python -m bench.adamerging_bench --size vit-b-32 --batch-size 2 --repeats 3 --threads 1

Then the same step through the run's Lightning engine (``AdaMerging.fit``) at ViT-B/32 size
on 1 and 2 CPU processes (DDP, gloo), as a ratio to the merged model's forward + backward:
see :mod:`bench.scaling` (``--skip-scaling``, ``--processes``, ``--scaling-*``;
``--size none`` runs only this part).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from bench.scaling import SIZES, add_scaling_arguments, quiet, run_scaling

DEFAULT_BATCH = {"embedded": 16, "vit-b-32": 2}
DEFAULT_REPEATS = {"embedded": 10, "vit-b-32": 3}


def _times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_bench(
    pool,
    batch_size: int,
    repeats: int,
    warmup: int = 2,
    granularity: str = "layer",
    vectors: str = "task_arithmetic",
) -> dict:
    """Time one AdaMerging step against one forward+backward of the merged model.

    Returns medians in seconds, their ratio, and the sizes involved.
    """
    from mergelab.merge.adamerging import AdaMerging, mean_entropy

    method = AdaMerging(granularity=granularity, vectors=vectors, batch_size=batch_size)
    module = method.build_module(pool)
    tasks = module.tasks
    images = {}
    for t in tasks:
        data = pool.test_sets[t]
        images[t] = torch.stack([data[i][0] for i in range(min(batch_size, len(data)))])
    batch = {t: images[t] for t in tasks}
    opt = module.configure_optimizers()

    def ada_step() -> None:
        opt.zero_grad(set_to_none=True)
        module.entropy_loss(batch).backward()
        opt.step()

    # Reference: a plain encoder carrying θ(λ=init) as ordinary trainable weights.
    with torch.no_grad():
        merged = module.merged_params()
    state = {k: (merged[k] if k in merged else pool.pretrained[k]) for k in pool.pretrained}
    ref = pool.encoder(state).requires_grad_(True)
    heads = {t: pool.heads[t] for t in tasks}
    x = torch.cat([images[t] for t in tasks])
    sizes = [len(images[t]) for t in tasks]

    def ref_step() -> None:
        ref.zero_grad(set_to_none=True)
        feats = ref(x)
        loss = sum(mean_entropy(heads[t](f)) for t, f in zip(tasks, feats.split(sizes)))
        loss.backward()

    def build_only() -> None:
        with torch.no_grad():
            module.merged_params()

    for _ in range(warmup):
        ada_step()
        ref_step()
    ada, base = [], []
    for _ in range(repeats):  # interleaved so that load changes hit both
        ada += _times(ada_step, 1)
        base += _times(ref_step, 1)
    build = _times(build_only, repeats)

    n_merged = module._vectors.flat.shape[1]
    ada_s, ref_s = statistics.median(ada), statistics.median(base)
    return {
        "granularity": granularity,
        "vectors": vectors,
        "tasks": len(tasks),
        "coefficients": int(module.coefficients.numel()),
        "merged_params": int(n_merged),
        "images_per_step": int(sum(sizes)),
        "batch_per_task": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "adamerging_step_s": ada_s,
        "forward_backward_s": ref_s,
        "ratio": ada_s / ref_s,
        # best-of-N is the steadier estimate when other jobs share the CPU
        "ratio_of_minimums": min(ada) / min(base),
        "build_theta_s": statistics.median(build),
        "adamerging_step_all_s": ada,
        "forward_backward_all_s": base,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _report(name: str, res: dict) -> None:
    print(
        f"[{name}] {res['tasks']} tasks x {res['batch_per_task']} images, "
        f"{res['merged_params'] / 1e6:.2f}M merged params, {res['coefficients']} coefficients "
        f"({res['granularity']}-wise, {res['vectors']}), {res['threads']} threads, "
        f"median of {res['repeats']}:\n"
        f"    AdaMerging step      {res['adamerging_step_s'] * 1e3:9.1f} ms\n"
        f"    forward+backward     {res['forward_backward_s'] * 1e3:9.1f} ms\n"
        f"    ratio                {res['ratio']:9.2f} x   (target <= 1.5)\n"
        f"    ratio of minimums    {res['ratio_of_minimums']:9.2f} x\n"
        f"    build θ(λ) alone     {res['build_theta_s'] * 1e3:9.1f} ms\n"
        f"    peak RSS so far      {res['peak_rss_mb']:9.0f} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=[*SIZES, "both", "none"], default="both")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="images per task per step")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--granularity", choices=["task", "layer"], default="layer")
    ap.add_argument("--vectors", choices=["task_arithmetic", "ties"], default="task_arithmetic")
    for field in ("width", "layers", "heads", "embed_dim", "image_size", "patch_size"):
        ap.add_argument(
            f"--{field.replace('_', '-')}",
            type=int,
            default=None,
            help=f"override the preset's {field}",
        )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). On a shared, "
        "oversubscribed machine 1 thread avoids OpenMP spin-wait stalls",
    )
    ap.add_argument("--json", default=None, help="also write the results to this json file")
    add_scaling_arguments(ap)
    a = ap.parse_args()
    quiet()
    if a.threads:
        torch.set_num_threads(a.threads)

    from mergelab.zoo.synthetic import synthetic_pool

    results = {}
    for name in {"both": list(SIZES), "none": []}.get(a.size, [a.size]):
        arch = dict(SIZES[name])
        for field in arch:
            if getattr(a, field) is not None:
                arch[field] = getattr(a, field)
        bs = a.batch_size or DEFAULT_BATCH[name]
        pool = synthetic_pool(n_tasks=a.tasks, n_images=bs, n_classes=10, **arch)
        res = run_bench(
            pool, bs, a.repeats or DEFAULT_REPEATS[name], a.warmup, a.granularity, a.vectors
        )
        res["arch"] = arch
        results[name] = res
        _report(name, res)
        del pool
    results["scaling"] = run_scaling(["adamerging"], a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
