"""Merge benchmark at ViT-B/32 size: 8 synthetic experts (≈88M parameters each, random
weights, nothing downloaded) merged with task arithmetic and TIES from lazy safetensors files.

Each measurement runs in a fresh subprocess so its peak RSS is its own. Reported next to a
plain pass that reads every expert's weights once (the I/O floor of any merge):
wall time, CPU time (all threads; steadier than wall time on a shared machine), peak RSS,
the increase over an idle process, and that increase in units of one model's size — TIES
must not hold a whole-model copy per expert. TIES runs in its default (reference) mode:
two streamed passes over the experts (and θ0), read in cache-sized slices, in its fused C
kernels (``ties``; the warm-up run compiles them if needed) and on its torch ops
(``ties_torch``, ``MERGELAB_NATIVE=0``): the same bits either way.

Every mode runs ``--repeat`` times (3), interleaved, after one warm-up run each; the table
shows medians and the wall-time range.

    python -m bench.merge_bench [--experts 8] [--repeat 3] [--dir .bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

VIT_B32 = dict(image_size=224, patch_size=32, width=768, layers=12, head_width=64, mlp_ratio=4.0)


def make_checkpoints(root: Path, n_experts: int, seed: int = 0) -> dict:
    import torch

    from mergelab.pool.state import save_state_dict
    from mergelab.pool.vit import build_openclip_vision

    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["n_experts"] == n_experts:
            return meta
    torch.manual_seed(seed)
    theta0 = build_openclip_vision(512, **VIT_B32).state_dict()
    n_params = sum(v.numel() for v in theta0.values())
    save_state_dict(theta0, root / "pretrained.safetensors")
    for i in range(n_experts):
        g = torch.Generator().manual_seed(seed + 1 + i)
        save_state_dict(
            {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in theta0.items()},
            root / f"expert_{i}.safetensors",
        )
    meta = {"n_experts": n_experts, "n_params": n_params, "bytes": 4 * n_params}
    meta_path.write_text(json.dumps(meta))
    return meta


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measured(fn):
    """Run ``fn()`` once in this (measured) subprocess: ``(result, wall s, CPU s, extra KiB)``.

    The kernel's peak-RSS counter is reset first (``/proc/self/clear_refs`` ← 5), so
    VmHWM − VmRSS(start) is exactly what ``fn`` added at its peak; the result is returned, so
    it is still alive at the peak reading (a merge's output counts)."""
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status_kb("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return out, wall, cpu, _status_kb("VmHWM") - rss0


def _child(mode: str, root: str, n_experts: int) -> None:
    """Runs inside the measured subprocess; prints one json line.

    Memory: after imports and opening the (lazy) files, the kernel's peak-RSS counter is
    reset (``/proc/self/clear_refs`` ← 5), so VmHWM − VmRSS(start) is exactly what the merge
    itself added at its peak — import-time transients of torch's libraries do not count.
    """
    import torch

    from mergelab.merge.task_arithmetic import TaskArithmetic
    from mergelab.merge.ties import Ties
    from mergelab.pool.state import LazyStateDict

    torch.set_num_threads(2)
    p = LazyStateDict(Path(root) / "pretrained.safetensors")
    experts = {
        f"t{i}": LazyStateDict(Path(root) / f"expert_{i}.safetensors") for i in range(n_experts)
    }
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status_kb("VmRSS")
    t, cpu = time.perf_counter(), time.process_time()
    if mode == "plain_read":  # the I/O floor: every tensor of θ0 and of every expert, once
        total = 0.0
        for key in p:
            total += float(p[key].view(-1)[0])
            for sd in experts.values():
                total += float(sd[key].view(-1)[0])
    elif mode == "task_arithmetic":
        _merged = TaskArithmetic(0.3).merge(p, experts)  # kept alive: the output counts
    elif mode in ("ties", "ties_torch"):
        _merged = Ties(k=0.2, scaling=0.3).merge(p, experts)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    extra = _status_kb("VmHWM") - rss0
    row = {"mode": mode, "wall_s": wall, "cpu_s": cpu, "extra_kb": extra}
    if mode.startswith("ties"):
        from mergelab.merge import native

        row["fused"] = native.kernels() is not None
    print(json.dumps(row))


def measure(mode: str, root: Path, n_experts: int) -> dict:
    env = {**os.environ, "MERGELAB_NATIVE": "0"} if mode == "ties_torch" else None
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.merge_bench",
            "--child",
            mode,
            "--dir",
            str(root),
            "--experts",
            str(n_experts),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(root: Path, n_experts: int = 8, repeat: int = 3) -> dict:
    """Each mode once to warm the page cache, then ``repeat`` measured runs, the modes
    interleaved (plain, TA, TIES, plain, ...) so that a load change on a shared machine hits
    all of them; every figure is the median over the runs, the range kept next to it, and
    the ratios are medians over the runs of each run's own ratio to that run's plain read."""
    meta = make_checkpoints(root, n_experts)
    model_mb = meta["bytes"] / 2**20
    modes = ("plain_read", "task_arithmetic", "ties", "ties_torch")
    for mode in modes:
        measure(mode, root, n_experts)  # warm the page cache so every mode reads from memory
    runs = {mode: [] for mode in modes}
    for _ in range(repeat):
        for mode in modes:
            runs[mode].append(measure(mode, root, n_experts))
    res = {
        "n_experts": n_experts,
        "n_params": meta["n_params"],
        "model_mb": round(model_mb, 1),
        "repeat": repeat,
        "rows": {},
    }
    plain = runs["plain_read"]
    for mode in modes:
        ms = runs[mode]
        extra_mb = median([m["extra_kb"] for m in ms]) / 1024
        res["rows"][mode] = {
            "wall_s": round(median([m["wall_s"] for m in ms]), 2),
            "wall_range_s": [
                round(min(m["wall_s"] for m in ms), 2),
                round(max(m["wall_s"] for m in ms), 2),
            ],
            "cpu_s": round(median([m["cpu_s"] for m in ms]), 2),
            "extra_mb": round(extra_mb, 1),
            "extra_model_copies": round(extra_mb / model_mb, 2),
            "time_ratio": round(median([m["wall_s"] / p["wall_s"] for m, p in zip(ms, plain)]), 2),
            "cpu_ratio": round(median([m["cpu_s"] / p["cpu_s"] for m, p in zip(ms, plain)]), 2),
        }
        if "fused" in ms[0]:
            res["rows"][mode]["fused"] = all(m["fused"] for m in ms)
    return res


def print_report(res: dict) -> None:
    """The table of :func:`run_bench` (medians of ``repeat`` runs, with wall ranges) or of a
    bench that measures each mode once (``bench.merge_methods_bench``: no ``repeat``)."""
    from rich.console import Console
    from rich.table import Table

    runs = f"median of {res['repeat']} runs" if res.get("repeat", 1) > 1 else "one run each"
    t = Table(
        title=f"merge bench ({runs}): {res['n_experts']} experts × "
        f"{res['n_params'] / 1e6:.1f}M params ({res['model_mb']:.0f} MB each, fp32), "
        "read lazily from safetensors"
    )
    cols = ("mode", "wall s", "range", "× plain", "cpu s", "× plain", "peak extra MB", "copies")
    for c in cols:
        t.add_column(c, justify="right")
    for mode, r in res["rows"].items():
        t.add_row(
            mode + {True: " (fused)", False: " (torch ops)"}.get(r.get("fused"), ""),
            f"{r['wall_s']:.2f}",
            "{:.2f}–{:.2f}".format(*r["wall_range_s"]) if "wall_range_s" in r else "–",
            f"{r['time_ratio']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{r['cpu_ratio']:.2f}",
            f"{r['extra_mb']:.0f}",
            f"{r['extra_model_copies']:.2f}",
        )
    Console(width=110).print(t)
    print(
        "peak extra = what the merge added to RSS at its peak; the merged output itself is one "
        "model copy. The plain read holds one tensor at a time."
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per mode (median)")
    ap.add_argument("--dir", default=".bench/vit_b32")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the figures to this json file")
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.dir, a.experts)
        return
    res = run_bench(Path(a.dir), a.experts, a.repeat)
    print_report(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
