"""Step cost of surgery v1 / v2 and AdaMerging through the run's own Lightning engine, as a
ratio to one forward (v1) or forward + backward (v2, AdaMerging) of the merged model, on 1 or
N CPU processes (DDP, gloo).

With ``--method`` this module is the *worker*: one invocation measures one method on one
process count and, on rank 0, writes a json. Under DDP Lightning re-runs this same command
once per extra process, so every process builds the same seeded random pool and joins the
same steps. ``surgery_bench`` and ``adamerging_bench`` run it as a subprocess per (method,
processes), keep its output (Lightning's included) out of the terminal, and print one table
(:func:`measure` / :func:`print_table`); so does this module without ``--method``.

    python -m bench.scaling --method v2 --devices 2 --json /tmp/v2.json   # one worker
    python -m bench.scaling          # the table: v1, v2 and AdaMerging on 1 and 2 processes

What is timed:
- a *step*: Lightning's ``on_train_batch_start`` → ``on_train_batch_end`` on rank 0 (forward,
  backward with DDP's gradient all-reduce, optimiser step), median over the steps after
  ``warmup``; the global batch is ``tasks × batch_size`` images whatever the process count;
- the *reference*: the merged model (weight average of the experts) as a plain module on the
  same global batch, one process: forward (no grad) and forward + backward to its weights,
  median of ``repeats``;
- the *whole run*: ``apply`` / ``fit`` wall time (v1/v2 include caching the fixed targets over
  every drawn image; AdaMerging includes building the task vectors), per step.

Every process runs ``--threads`` torch threads (1 by default), the reference too: N processes
then use N cores, and no run pays for OpenMP threads spinning on an oversubscribed machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

# Architecture presets as synthetic_pool arguments (random weights, nothing downloaded).
SIZES = {
    # the embedded benchmark's backbone: open_clip ViT, width 128, 4 blocks, 28 px, patch 7
    "embedded": dict(width=128, layers=4, heads=2, embed_dim=64, image_size=28, patch_size=7),
    # CLIP ViT-B/32's image tower: width 768, 12 blocks, 224 px, patch 32, embed 512
    "vit-b-32": dict(width=768, layers=12, heads=12, embed_dim=512, image_size=224, patch_size=32),
}
METHODS = ("v1", "v2", "adamerging")
# What each method's step is compared with: v1 trains on cached features, so its step is
# measured against the forward pass that caching costs per image; v2 and AdaMerging run the
# merged backbone forward and backward in every step.
REFERENCE = {"v1": "forward", "v2": "forward_backward", "adamerging": "forward_backward"}


class StepTimer(L.Callback):
    """Wall and CPU time (this process) of every training step, batch start to batch end."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def quiet() -> None:
    """Keep Lightning's start-up lines, tips and expected warnings out of the output."""
    from mergelab.cli import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore")


def weight_average(pool):
    from mergelab.pool.base import MultiTaskModel

    merged = {}
    for k, base in pool.pretrained.items():
        vals = [pool.experts[t][k] for t in pool.tasks]
        merged[k] = torch.stack(vals).mean(0).to(base.dtype) if base.is_floating_point() else base
    return MultiTaskModel(pool.encoder(merged), pool.heads)


def _median_times(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU time of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def reference_times(pool, batch_size: int, repeats: int) -> dict[str, float]:
    """Forward, and forward + backward (gradients to every weight), of the merged model as a
    plain module on one step's global batch (every task's ``batch_size`` images, one pass)."""
    model = weight_average(pool)
    encoder = model.encoder.requires_grad_(True)
    x = torch.cat([pool.test_sets[t].tensors[0][:batch_size] for t in pool.tasks])
    sizes = [min(batch_size, len(pool.test_sets[t])) for t in pool.tasks]

    def forward() -> None:
        with torch.no_grad():
            encoder(x)

    def forward_backward() -> None:
        encoder.zero_grad(set_to_none=True)
        feats = encoder(x)
        loss = sum(
            model.heads[t](f).logsumexp(-1).mean() for t, f in zip(pool.tasks, feats.split(sizes))
        )
        loss.backward()

    forward()  # warm-up
    forward_backward()
    (fw, fw_cpu), (fb, fb_cpu) = (_median_times(f, repeats) for f in (forward, forward_backward))
    return {
        "forward": fw,
        "forward_backward": fb,
        "forward_cpu": fw_cpu,
        "forward_backward_cpu": fb_cpu,
    }


def worker(a: argparse.Namespace) -> None:
    """Measure ``a.method`` on ``a.devices`` processes; rank 0 writes ``a.json``."""
    from mergelab.context import RunContext
    from mergelab.zoo.synthetic import synthetic_pool

    quiet()
    torch.set_num_threads(a.threads)
    timer = StepTimer()
    trainer = {"accelerator": "cpu", "devices": a.devices, "callbacks": [timer]}
    if a.devices > 1:
        trainer["strategy"] = "ddp"
    out = Path(tempfile.mkdtemp(prefix="mergelab_bench_"))
    ctx = RunContext(out_dir=out, trainer=trainer, seed=a.seed)
    ctx.engine.start()  # bring up every process now: the pool below is built in lockstep
    pool = synthetic_pool(
        n_tasks=a.tasks,
        n_images=a.images,
        n_classes=10,
        expert_noise=0.02,
        seed=a.seed,
        **SIZES[a.size],
    )
    total = a.warmup + a.steps
    t0 = time.perf_counter()
    if a.method == "adamerging":
        from mergelab.merge.adamerging import AdaMerging

        method = AdaMerging(granularity="layer", steps=total, batch_size=a.batch_size,
                            seed=a.seed, save_coefficients=False, plot=False)  # fmt: skip
        method.fit(pool, ctx)
    else:
        from mergelab.surgery.v1 import SurgeryV1
        from mergelab.surgery.v2 import SurgeryV2

        kind = {"v1": SurgeryV1, "v2": SurgeryV2}[a.method]
        surgery = kind(rank=a.rank, steps=total, batch_size=a.batch_size, seed=a.seed, save=False)
        surgery.apply(weight_average(pool), pool, ctx)
    whole = time.perf_counter() - t0
    if not ctx.engine.is_global_zero:
        return
    timed = timer.steps[a.warmup :] or timer.steps
    timed_cpu = timer.cpu[a.warmup :] or timer.cpu
    result = {
        "method": a.method,
        "processes": ctx.engine.world_size,
        "threads_per_process": torch.get_num_threads(),
        "size": a.size,
        "tasks": a.tasks,
        "batch_per_task": a.batch_size,
        "global_batch": a.tasks * a.batch_size,
        "steps_timed": len(timed),
        "warmup": a.warmup,
        "step_s": statistics.median(timed),
        # CPU time of rank 0's process: steadier than wall time on a shared machine; with N
        # processes it is one process's share of the step
        "step_cpu_s": statistics.median(timed_cpu),
        "steps_s": timer.steps,
        "whole_run_s": whole,
        "whole_run_per_step_s": whole / max(1, len(timer.steps)),
        "merged_params": sum(v.numel() for v in pool.pretrained.values()),
    }
    if a.reference:
        result["reference"] = reference_times(pool, a.batch_size, a.repeats)
    Path(a.json).write_text(json.dumps(result, indent=2))


def measure(
    methods: list[str],
    processes: list[int],
    size: str = "vit-b-32",
    tasks: int = 4,
    batch_size: int = 2,
    steps: int = 4,
    warmup: int = 2,
    repeats: int = 3,
    rank: int = 16,
    threads: int = 1,
    timeout: float = 1800.0,
) -> dict:
    """Run the worker once per (method, process count), each in its own process(es), for at
    most ``timeout`` seconds each; the reference times come from the first one-process run.
    Returns every result and ratios."""
    results: dict = {"runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for n in processes:
                path = Path(tmp) / f"{method}_{n}.json"
                need_ref = "reference" not in results and n == 1
                cmd = [sys.executable, "-m", "bench.scaling", "--method", method,
                       "--devices", str(n), "--size", size, "--tasks", str(tasks),
                       "--batch-size", str(batch_size), "--steps", str(steps),
                       "--warmup", str(warmup), "--repeats", str(repeats), "--rank", str(rank),
                       "--threads", str(threads), "--json", str(path)]  # fmt: skip
                if need_ref:
                    cmd.append("--reference")
                code, output = _run_bounded(cmd, timeout)
                if code != 0 or not path.exists():
                    raise RuntimeError(f"{method} on {n} process(es) failed:\n{output[-3000:]}")
                run = json.loads(path.read_text())
                if need_ref:
                    results["reference"] = run.pop("reference")
                results["runs"].append(run)
    ref = results.get("reference")
    for run in results["runs"]:
        one = next(r for r in results["runs"] if r["method"] == run["method"])
        run["speedup_vs_first"] = one["step_s"] / run["step_s"]
        if ref is not None:
            run["reference_kind"] = REFERENCE[run["method"]]
            run["ratio"] = run["step_s"] / ref[REFERENCE[run["method"]]]
            run["whole_run_ratio"] = run["whole_run_per_step_s"] / ref[REFERENCE[run["method"]]]
            run["cpu_ratio"] = run["step_cpu_s"] / ref[REFERENCE[run["method"]] + "_cpu"]
    return results


def _run_bounded(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with its output captured; past ``timeout`` seconds (or when this process is
    interrupted) its whole process group is killed — a DDP worker's extra processes too, which
    its own session keeps out of the terminal's signals — and the exit code is -9."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        return -9, f"{output}\n(killed after {timeout:.0f} s)"
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    _kill_group(proc.pid)  # a DDP process left behind by a failed worker
    return proc.returncode, output


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _ratio(value: float | None, width: int) -> str:
    """A ratio for the table; small ones (v1's step on cached features) keep 2 significant
    digits instead of reading 0.00x."""
    if value is None:
        return f"{'-':>{width + 1}}"
    return f"{value:{width}.2f}x" if value >= 0.1 else f"{value:{width}.2g}x"


def print_table(results: dict) -> None:
    runs = results["runs"]
    if not runs:
        return
    r0, ref = runs[0], results.get("reference")
    print(f"Step cost through Lightning, {r0['size']} random model "
          f"({r0['merged_params'] / 1e6:.1f}M params), {r0['tasks']} tasks x "
          f"{r0['batch_per_task']} images per step, median of {r0['steps_timed']} steps "
          f"after {r0['warmup']} warm-up")  # fmt: skip
    if ref is not None:
        print(f"  merged model, 1 process: forward {ref['forward'] * 1e3:.1f} ms "
              f"(CPU {ref['forward_cpu'] * 1e3:.1f}), forward+backward "
              f"{ref['forward_backward'] * 1e3:.1f} ms (CPU {ref['forward_backward_cpu'] * 1e3:.1f})")  # fmt: skip
    head = (f"  {'method':<11}{'procs':>6}{'threads':>8}{'step ms':>10}{'ratio':>8}  "
            f"{'vs':<17}{'CPU ms':>9}{'CPU ratio':>10}{'run/step ms':>12}{'run ratio':>10}"
            f"{'speed-up':>9}")  # fmt: skip
    print(head)
    for r in runs:
        ratio, run_ratio, cpu_ratio = (
            _ratio(r.get(k), w) for k, w in (("ratio", 7), ("whole_run_ratio", 9), ("cpu_ratio", 9))
        )
        print(f"  {r['method']:<11}{r['processes']:>6}{r['threads_per_process']:>8}"
              f"{r['step_s'] * 1e3:>10.1f}{ratio}  {r.get('reference_kind', ''):<17}"
              f"{r['step_cpu_s'] * 1e3:>9.1f}{cpu_ratio}"
              f"{r['whole_run_per_step_s'] * 1e3:>12.1f}{run_ratio}"
              f"{r['speedup_vs_first']:>8.2f}x")  # fmt: skip
    print(
        "  ratio: step / the merged model's forward (v1: it trains on cached features) or "
        "forward+backward (v2, AdaMerging) on the same global batch, one process (wall time;\n"
        "  CPU: rank 0's process CPU time, steadier on a shared machine);\n"
        "  run/step: the whole apply/fit (caching targets, building task vectors) per step; "
        "speed-up: step time on the first process count / this one."
    )


def add_scaling_arguments(p: argparse.ArgumentParser) -> None:
    """The drivers' options for this measurement (``surgery_bench``, ``adamerging_bench``)."""
    g = p.add_argument_group("step cost through Lightning, 1 vs N CPU processes (bench.scaling)")
    g.add_argument("--processes", default="1,2", help="process counts, comma-separated")
    g.add_argument("--scaling-size", choices=list(SIZES), default="vit-b-32")
    g.add_argument("--scaling-tasks", type=int, default=4)
    g.add_argument("--scaling-batch", type=int, default=2, help="images per task per step")
    g.add_argument("--scaling-steps", type=int, default=4, help="timed steps")
    g.add_argument("--scaling-warmup", type=int, default=2)
    g.add_argument("--skip-scaling", action="store_true")


def run_scaling(methods: list[str], a: argparse.Namespace) -> dict | None:
    """Measure and print the table from :func:`add_scaling_arguments`' options."""
    if a.skip_scaling:
        return None
    return table(
        methods,
        a.processes,
        size=a.scaling_size,
        tasks=a.scaling_tasks,
        batch_size=a.scaling_batch,
        steps=a.scaling_steps,
        warmup=a.scaling_warmup,
    )


def table(methods: list[str], processes: str | int, **options) -> dict:
    """:func:`measure` ``methods`` on every comma-separated count in ``processes`` (other
    arguments as :func:`measure`'s) and print the table; returns the measurements."""
    res = measure(methods, [int(n) for n in str(processes).split(",")], **options)
    print_table(res)
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="the worker: measure this method on --devices processes and write --json; "
        "without it, measure every --methods on every --processes count and print the table",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="table: methods, comma-separated")
    p.add_argument("--processes", default="1,2", help="table: process counts, comma-separated")
    p.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    p.add_argument("--images", type=int, default=0, help="test images per task (0: steps × batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="also time the plain merged model")
    p.add_argument("--json", default=None, help="where the worker (or the table's results) go")
    p.add_argument("--size", choices=list(SIZES), default="vit-b-32")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="images per task per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="reference timings")
    p.add_argument("--rank", type=int, default=16, help="surgery rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=1800, help="table: seconds per run at most")
    a = p.parse_args()
    if a.method is None:
        res = table(
            a.methods.split(","),
            a.processes,
            size=a.size,
            tasks=a.tasks,
            batch_size=a.batch_size,
            steps=a.steps,
            warmup=a.warmup,
            repeats=a.repeats,
            rank=a.rank,
            threads=a.threads,
            timeout=a.timeout,
        )
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        return
    if a.json is None:
        p.error("--method needs --json (where the worker writes its measurement)")
    a.images = a.images or (a.steps + a.warmup) * a.batch_size
    worker(a)


if __name__ == "__main__":
    main()
