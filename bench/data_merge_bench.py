"""Merge bench for the task-conditional merges (TALL masks, EMR) and the data-driven ones
(RegMean, Fisher) at ViT-B/32 size: the same 8 synthetic experts (≈88M parameters each,
random weights, nothing downloaded) and lazy safetensors files as ``bench.merge_bench`` and
``bench.merge_methods_bench`` (same directory, same files), the same measurement: a fresh
subprocess per method, peak RSS the merge itself added (/proc/self/clear_refs + VmHWM), wall
and CPU time, next to the plain read of every expert.

TALL masks (arXiv 2405.07813) and EMR (arXiv 2405.17461) return a task-conditional result:
θ0 and one shared model in full, one bit-packed mask and one scalar per task. Its storage is
reported next to the T expert models it stands for.

RegMean (arXiv 2212.09849) and Fisher merging (arXiv 2111.09832) run forward (Fisher: and
backward) passes of a ViT-B/32-sized open_clip tower over unlabeled images of each task
(random 224-px images here), through the same Lightning ``trainer.predict`` path as a real
run. A full run reads 256 images per task; on a small CPU that takes too long for a bench, so
each runs on ``--samples`` images per task and the time is split into

- the data pass: the summed time of every ``predict_step`` (forward, Gram/Fisher
  accumulation; proportional to the number of images, for ``fisher_exact`` to the number
  of vector-Jacobian products = images × classes), and
- the fixed part: everything else (building and loading the 8 expert encoders, Trainer set-up,
  reading the experts for the accumulation, the solve / the weighted average),

and extrapolated to ``--full-samples`` images per task as fixed + per-image × images — an
extrapolation, printed as one. Peak memory does not grow with the number of images (the
statistics have the size of the weights; one batch of ≤ ``batch_size`` images is live).

Fisher runs twice: ``fisher_sample`` (one sampled label per image: one forward + one
backward) and ``fisher_exact`` (the yaml default: one VJP per class with p(y|x) > 0, batched
``grad_memory_mb`` at a time). ``fisher_exact`` runs on heads of ``--exact-classes`` classes
and is extrapolated per VJP to the real class counts of the 8 ViT-B/32 tasks (SUN397 397,
Cars 196, ..., 758 in all); its per-VJP time includes the forward, so the extrapolation is an
upper bound.

    python -m bench.data_merge_bench [--experts 8] [--samples 2] [--only emr,regmean] [--json f]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.merge_bench import VIT_B32, make_checkpoints, measure, measured

CONDITIONAL = ("tall_masks", "emr")
DATA = ("regmean", "fisher_sample", "fisher_exact")
MODES = CONDITIONAL + DATA
EMBED_DIM = 512  # CLIP ViT-B/32's joint embedding width (the heads' input)


def task_names_and_classes(n_experts: int) -> list[tuple[str, int]]:
    """The 8 ViT-B/32 tasks with their real class counts (cycled when there are more
    experts): what the Fisher heads and the ``fisher_exact`` extrapolation use."""
    from mergelab.tasks.vit8 import TASKS, VIT8

    out = []
    for i in range(n_experts):
        spec = TASKS[VIT8[i % len(VIT8)]]
        name = spec.name if i < len(VIT8) else f"{spec.name}_{i}"
        out.append((name, len(spec.classnames)))
    return out


# -- task-conditional merges --------------------------------------------------------------------


def _child_conditional(mode: str, root: str, n_experts: int) -> dict:
    """TALL masks / EMR at their yaml defaults, measured like bench.merge_methods_bench."""
    import torch

    from mergelab.merge.emr import EMR
    from mergelab.merge.tall_masks import TallMasks
    from mergelab.pool.state import LazyStateDict

    torch.set_num_threads(2)
    method = {
        "tall_masks": lambda: TallMasks(tall_lambda=0.6, scaling=1.0, base="task_arithmetic"),
        "emr": EMR,
    }[mode]()
    p = LazyStateDict(Path(root) / "pretrained.safetensors")
    experts = {
        f"t{i}": LazyStateDict(Path(root) / f"expert_{i}.safetensors") for i in range(n_experts)
    }
    merged, wall, cpu, extra_kb = measured(lambda: method.merge(p, experts))
    return {
        "mode": mode,
        "wall_s": wall,
        "cpu_s": cpu,
        "extra_kb": extra_kb,
        "storage": merged.storage(),
    }


# -- data-driven merges ---------------------------------------------------------------------


def _child_data(
    mode: str, root: str, n_experts: int, samples: int, exact_classes: int, seed: int = 0
) -> dict:
    """RegMean / Fisher at their yaml defaults on ``samples`` random images per task; the
    time of every ``predict_step`` (the data pass) is summed apart from the rest."""
    import torch
    from torch.utils.data import TensorDataset

    from mergelab.context import RunContext
    from mergelab.merge.fisher import FisherCollector, FisherMerging
    from mergelab.merge.regmean import GramCollector, RegMean
    from mergelab.pool.base import ModelPool
    from mergelab.pool.heads import ClassificationHead
    from mergelab.pool.state import LazyStateDict
    from mergelab.pool.vit import build_openclip_vision

    torch.set_num_threads(2)
    if mode == "regmean":
        method = RegMean(alpha=0.95, num_samples=samples, batch_size=32, seed=seed)
        collector = GramCollector
    else:
        method = FisherMerging(
            estimator="sample" if mode == "fisher_sample" else "exact",
            samples_per_example=1,
            num_samples=samples,
            batch_size=32,
            grad_memory_mb=1024,
            seed=seed,
        )
        collector = FisherCollector

    # The data pass, timed step by step (the bench's own wrapper; the method is unchanged).
    stats = {"wall_s": 0.0, "cpu_s": 0.0, "images": 0, "vjps": 0}
    step = collector.predict_step

    def timed_step(self, batch, batch_idx):
        t, c = time.perf_counter(), time.process_time()
        step(self, batch, batch_idx)
        stats["wall_s"] += time.perf_counter() - t
        stats["cpu_s"] += time.process_time() - c
        stats["images"] += int(batch.shape[0])

    collector.predict_step = timed_step
    if collector is FisherCollector:
        vjps = FisherCollector._vjps

        def counted_vjps(self, logp, params, cot):
            stats["vjps"] += int(cot.shape[0])
            return vjps(self, logp, params, cot)

        FisherCollector._vjps = counted_vjps

    tasks = task_names_and_classes(n_experts)
    g = torch.Generator().manual_seed(seed)
    px = VIT_B32["image_size"]
    heads = {
        name: ClassificationHead(
            torch.randn(exact_classes if mode == "fisher_exact" else c, EMBED_DIM, generator=g)
        )
        for name, c in tasks
    }
    test_sets = {
        name: TensorDataset(torch.randn(samples, 3, px, px, generator=g)) for name, _ in tasks
    }
    pool = ModelPool(
        family="bench",
        backbone="vit-b-32-synthetic",
        tasks=[name for name, _ in tasks],
        encoder_factory=lambda: build_openclip_vision(EMBED_DIM, **VIT_B32),
        pretrained=LazyStateDict(Path(root) / "pretrained.safetensors"),
        experts={
            name: LazyStateDict(Path(root) / f"expert_{i}.safetensors")
            for i, (name, _) in enumerate(tasks)
        },
        heads=heads,
        test_sets=test_sets,
    )
    ctx = RunContext(
        out_dir=Path(root) / "data_merge_tmp",
        trainer={"accelerator": "cpu", "devices": 1},
        seed=seed,
    )
    ctx.make_trainer(logger=False)  # Lightning's one-time imports are not the merge's
    _merged, wall, cpu, extra_kb = measured(lambda: method.fit(pool, ctx))
    return {
        "mode": mode,
        "wall_s": wall,
        "cpu_s": cpu,
        "extra_kb": extra_kb,
        "samples_per_task": samples,
        "classes": [exact_classes if mode == "fisher_exact" else c for _, c in tasks],
        "pass": stats,
    }


# -- the parent -------------------------------------------------------------------------------


def measure_method(mode: str, root: Path, n_experts: int, samples: int, exact_classes: int):
    args = ["--child", mode, "--dir", str(root), "--experts", str(n_experts)]
    args += ["--samples", str(samples), "--exact-classes", str(exact_classes)]
    r = subprocess.run(
        [sys.executable, "-m", "bench.data_merge_bench", *args],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"bench child {mode!r} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _extrapolate(m: dict, n_experts: int, full: int) -> dict:
    """Fixed part, per-image (per-VJP) cost and the cost at ``full`` images per task."""
    p = m["pass"]
    row = {"samples_per_task": m["samples_per_task"], "images": p["images"]}
    for clock in ("wall_s", "cpu_s"):
        fixed = m[clock] - p[clock]
        if m["mode"] == "fisher_exact":
            # per VJP (forward amortised in: an upper bound), scaled to the real class counts
            unit = p[clock] / max(p["vjps"], 1)
            units = full * sum(c for _, c in task_names_and_classes(n_experts))
            row["vjps"] = p["vjps"]
        else:
            unit = p[clock] / max(p["images"], 1)
            units = full * n_experts
        row[f"fixed_{clock}"] = round(fixed, 2)
        row[f"per_unit_{clock}"] = round(unit, 4)
        row[f"full_{clock}"] = round(fixed + unit * units, 1)
    row["unit"] = "VJP" if m["mode"] == "fisher_exact" else "image"
    row["full_units"] = units
    return row


def run_bench(
    root: Path,
    n_experts: int = 8,
    modes: tuple[str, ...] = MODES,
    samples: int = 2,
    exact_samples: int = 1,
    exact_classes: int = 3,
    full: int = 256,
) -> dict:
    meta = make_checkpoints(root, n_experts)
    measure("plain_read", root, n_experts)  # warms the page cache
    rows = [("plain_read", measure("plain_read", root, n_experts))]
    for mode in modes:
        print(f"[data_merge_bench] {mode} …", file=sys.stderr, flush=True)
        n = exact_samples if mode == "fisher_exact" else samples
        rows.append((mode, measure_method(mode, root, n_experts, n, exact_classes)))
    return summarise(meta, rows, n_experts, full)


def summarise(meta: dict, rows: list[tuple[str, dict]], n_experts: int, full: int) -> dict:
    """The report's figures from the children's json lines (``plain_read`` first)."""
    model_mb = meta["bytes"] / 2**20
    res = {
        "n_experts": n_experts,
        "n_params": meta["n_params"],
        "model_mb": round(model_mb, 1),
        "full_samples_per_task": full,
        "rows": {},
    }
    plain = rows[0][1]
    for mode, m in rows:
        extra_mb = m["extra_kb"] / 1024
        row = {
            "wall_s": round(m["wall_s"], 2),
            "cpu_s": round(m["cpu_s"], 2),
            "extra_mb": round(extra_mb, 1),
            "extra_model_copies": round(extra_mb / model_mb, 2),
            "time_ratio": round(m["wall_s"] / plain["wall_s"], 2),
            "cpu_ratio": round(m["cpu_s"] / plain["cpu_s"], 2),
        }
        if "storage" in m:
            s = m["storage"]
            row["storage_mib"] = {
                "shared": round(s["shared_bytes"] / 2**20, 1),
                "per_task": round(
                    sum(s["per_task_bytes"].values()) / len(s["per_task_bytes"]) / 2**20, 2
                ),  # fmt: skip
                "total": round(s["total_bytes"] / 2**20, 1),
                "experts": round(s["experts_bytes"] / 2**20, 1),
            }
        if "pass" in m:
            row["data"] = _extrapolate(m, n_experts, full)
        res["rows"][mode] = row
    return res


def print_report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"data-driven and task-conditional merges: {res['n_experts']} experts × "
        f"{res['n_params'] / 1e6:.1f}M params ({res['model_mb']:.0f} MiB each, fp32), "
        "CPU, 2 threads"
    )
    cols = ("mode", "wall s", "cpu s", "× plain cpu", "peak extra MiB", "model copies",
            "images/task", "fixed cpu s", "cpu s / unit",
            f"≈ cpu s at {res['full_samples_per_task']}/task", "result MiB")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for mode, r in res["rows"].items():
        d = r.get("data")
        s = r.get("storage_mib")
        t.add_row(
            mode,
            f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}",
            f"{r['cpu_ratio']:.2f}",
            f"{r['extra_mb']:.0f}",
            f"{r['extra_model_copies']:.2f}",
            str(d["samples_per_task"]) if d else "",
            f"{d['fixed_cpu_s']:.1f}" if d else "",
            f"{d['per_unit_cpu_s']:.3f} / {d['unit']}" if d else "",
            f"{d['full_cpu_s']:.0f}" if d else "",
            f"{s['total']:.0f} (experts {s['experts']:.0f})" if s else "",
        )
    Console(width=170).print(t)
    print(
        "peak extra = what the merge added to RSS at its peak (its output included). "
        "result MiB (tall_masks, emr) = θ0 + the shared model + one bit-packed mask and one "
        "scalar per task, vs the T expert models it replaces."
    )
    for mode, r in res["rows"].items():
        d = r.get("data")
        if not d:
            continue
        print(
            f"{mode}: measured on {d['samples_per_task']} images/task; EXTRAPOLATED to "
            f"{res['full_samples_per_task']} images/task ({d['full_units']} {d['unit']}s) as "
            f"fixed + per-{d['unit']} × {d['unit']}s: ≈ {d['full_cpu_s']:.0f} CPU s, "
            f"≈ {d['full_wall_s']:.0f} wall s (fixed {d['fixed_wall_s']:.1f} wall s, "
            f"{d['per_unit_wall_s']:.3f} wall s / {d['unit']})"
        )
    if "fisher_exact" in res["rows"]:
        print(
            "fisher_exact: heads with few classes, scaled per VJP to the 8 tasks' real class "
            "counts; the forward is amortised into the per-VJP time, so this is an upper bound."
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dir", default=".bench/vit_b32")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--samples", type=int, default=2, help="images per task (regmean, fisher)")
    ap.add_argument("--exact-samples", type=int, default=1, help="images per task, fisher_exact")
    ap.add_argument("--exact-classes", type=int, default=3, help="classes per head, fisher_exact")
    ap.add_argument("--full-samples", type=int, default=256, help="images per task extrapolated to")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the figures to this json file")
    a = ap.parse_args()
    if a.child:
        if a.child in CONDITIONAL:
            out = _child_conditional(a.child, a.dir, a.experts)
        else:
            out = _child_data(a.child, a.dir, a.experts, a.samples, a.exact_classes)
        print(json.dumps(out))
        return
    modes = tuple(a.only.split(",")) if a.only else MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"unknown bench mode {bad[0]!r}; expected some of {', '.join(MODES)}")
    if min(a.samples, a.exact_samples, a.exact_classes, a.full_samples) < 1:
        sys.exit("--samples, --exact-samples, --exact-classes and --full-samples must be ≥ 1")
    res = run_bench(
        Path(a.dir), a.experts, modes, a.samples, a.exact_samples, a.exact_classes, a.full_samples
    )
    print_report(res)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
