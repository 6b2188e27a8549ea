"""`make bench`: every speed/memory benchmark, each in its own process, figures to .bench/.

1. merges at ViT-B/32 size (8 synthetic experts): wall time and peak memory vs a plain read;
   TALL masks / EMR (and their task-conditional storage), RegMean / Fisher (measured on a few
   images per task, extrapolated to 256);
2. surgery v1/v2 on the embedded benchmark vs the reference loop (same steps, same seed), then
   their step cost through Lightning at ViT-B/32 size as a ratio to the merged model's forward
   (+ backward), on 1 and 2 CPU processes (bench.scaling);
3. one AdaMerging step vs one forward+backward of the merged model, embedded and ViT-B/32 size,
   then the same through Lightning on 1 and 2 CPU processes;
4. permutation alignment (weight / activation matching) per model, embedded and ViT-B/32 size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OUT = Path(".bench")

JOBS = [
    ("merge", ["-m", "bench.merge_bench", "--json", str(OUT / "merge.json")]),
    (
        "merge_methods",
        ["-m", "bench.merge_methods_bench", "--json", str(OUT / "merge_methods.json")],
    ),
    (
        "data_merge",
        ["-m", "bench.data_merge_bench", "--json", str(OUT / "data_merge.json")],
    ),
    ("surgery", ["-m", "bench.surgery_bench", "--embedded", "--json", str(OUT / "surgery.json")]),
    ("adamerging", ["-m", "bench.adamerging_bench", "--json", str(OUT / "adamerging.json")]),
    ("align", ["-m", "bench.align_bench", "--json", str(OUT / "align.json")]),
]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    only = set(sys.argv[1:])
    failed = []
    for name, args in JOBS:
        if only and name not in only:
            continue
        print(f"\n=== bench: {name} ===", flush=True)
        if subprocess.run([sys.executable, *args]).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
