"""Merge bench for TSV-M, Iso-C, Iso-CTS, DARE and Consensus at ViT-B/32 size: the same 8
synthetic experts (≈88M parameters each, random weights, nothing downloaded) and lazy
safetensors files as ``bench.merge_bench`` (shared with it: same directory, same files), the
same measurement (a fresh subprocess per method; peak RSS the merge itself added, via
/proc/self/clear_refs + VmHWM), reported next to the plain read of every expert.

The SVD methods run fp32 SVDs on the CPU: per 2-D matrix TSV-M does T + 2 of them, Iso-C one,
Iso-CTS T + 3. A probe times one 3072×768 MLP matrix (the largest ViT-B/32 matrix) per method.

    python -m bench.merge_methods_bench [--experts 8] [--dir .bench/vit_b32] [--only tsv_m,dare_ta]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.merge_bench import make_checkpoints, measure, measured, print_report


def build(mode: str):
    """The method each bench row measures, at its yaml defaults."""
    from mergelab.merge.consensus import Consensus
    from mergelab.merge.dare import Dare
    from mergelab.merge.iso import IsoC, IsoCTS
    from mergelab.merge.tsv_m import TSVM

    return {
        "tsv_m": lambda: TSVM(scaling=1.0),
        "iso_c": lambda: IsoC(scaling=1.0),
        "iso_cts": lambda: IsoCTS(common_fraction=0.8, scaling=1.0),
        "dare_ta": lambda: Dare(p=0.5, base="task_arithmetic", scaling=0.3),
        "dare_ties": lambda: Dare(p=0.5, base="ties", scaling=0.5),
        "consensus_ta": lambda: Consensus(k=2, tall_lambda=0.6, scaling=0.3),
        "consensus_ties": lambda: Consensus(k=2, tall_lambda=0.6, scaling=0.3, base="ties"),
    }[mode]()


MODES = ("tsv_m", "iso_c", "iso_cts", "dare_ta", "dare_ties", "consensus_ta", "consensus_ties")


def _child(mode: str, root: str, n_experts: int) -> None:
    """Runs inside the measured subprocess; prints one json line (see bench.merge_bench)."""
    import torch

    from mergelab.pool.state import LazyStateDict

    torch.set_num_threads(2)
    method = build(mode)
    p = LazyStateDict(Path(root) / "pretrained.safetensors")
    experts = {
        f"t{i}": LazyStateDict(Path(root) / f"expert_{i}.safetensors") for i in range(n_experts)
    }
    _merged, wall, cpu, extra_kb = measured(lambda: method.merge(p, experts))
    print(json.dumps({"mode": mode, "wall_s": wall, "cpu_s": cpu, "extra_kb": extra_kb}))


def svd_probe(n_experts: int, shape=(3072, 768), seed: int = 0) -> dict[str, list[float]]:
    """[wall s, CPU s] for one matrix of ``shape`` with ``n_experts`` task vectors, per SVD
    method."""
    import torch

    from mergelab.merge.iso import iso_c_matrix, iso_cts_matrix
    from mergelab.merge.tsv_m import tsv_merge_matrix

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(seed)
    taus = [1e-3 * torch.randn(*shape, generator=g) for _ in range(n_experts)]
    out = {}
    for name, fn in (
        ("tsv_m", lambda: tsv_merge_matrix(taus)),
        ("iso_c", lambda: iso_c_matrix(taus)),
        ("iso_cts", lambda: iso_cts_matrix(taus, 0.8)),
    ):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out[name] = [round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)]
    return out


def measure_method(mode: str, root: Path, n_experts: int) -> dict:
    args = ["--child", mode, "--dir", str(root), "--experts", str(n_experts)]
    r = subprocess.run(
        [sys.executable, "-m", "bench.merge_methods_bench", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(root: Path, n_experts: int = 8, modes: tuple[str, ...] = MODES) -> dict:
    meta = make_checkpoints(root, n_experts)
    model_mb = meta["bytes"] / 2**20
    res = {
        "n_experts": n_experts,
        "n_params": meta["n_params"],
        "model_mb": round(model_mb, 1),
        "rows": {},
    }
    # Page cache warmed once by a plain read (the SVD methods are too slow to run twice);
    # the second plain read is the I/O floor every row is compared with.
    measure("plain_read", root, n_experts)
    rows = [("plain_read", measure("plain_read", root, n_experts))]
    for mode in modes:
        print(f"[merge_methods_bench] {mode} …", file=sys.stderr, flush=True)
        rows.append((mode, measure_method(mode, root, n_experts)))
    plain = rows[0][1]
    for mode, m in rows:
        extra_mb = m["extra_kb"] / 1024
        res["rows"][mode] = {
            "wall_s": round(m["wall_s"], 2),
            "cpu_s": round(m["cpu_s"], 2),
            "extra_mb": round(extra_mb, 1),
            "extra_model_copies": round(extra_mb / model_mb, 2),
            "time_ratio": round(m["wall_s"] / plain["wall_s"], 2),
            "cpu_ratio": round(m["cpu_s"] / plain["cpu_s"], 2),
        }
    res["svd_probe_s"] = svd_probe(n_experts)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dir", default=".bench/vit_b32")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the figures to this json file")
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.dir, a.experts)
        return
    modes = tuple(a.only.split(",")) if a.only else MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"unknown bench mode {bad[0]!r}; expected some of {', '.join(MODES)}")
    res = run_bench(Path(a.dir), a.experts, modes)
    print_report(res)
    probe = ", ".join(f"{k} {w:.1f} s ({c:.1f} s CPU)" for k, (w, c) in res["svd_probe_s"].items())
    print(f"one 3072×768 matrix × {res['n_experts']} task vectors (fp32 SVDs, 2 threads): {probe}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
