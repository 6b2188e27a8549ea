"""Runs several tiny pipeline configurations in ONE process group, for tests/test_ddp.py.

    python tests/ddp_driver.py OUT CACHE [trainer overrides...]

Each configuration of ``CONFIGS`` runs through :func:`mergelab.pipeline.run` into
``OUT/<name>``. Under ``trainer=ddp`` Lightning's launcher re-runs this script once per extra
process (a plain script, so no Hydra run dir is involved), and every process walks the same
list; rank 0 writes the files. Importing and starting the processes once for all
configurations keeps the test short.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Small uneven sizes on purpose: batches that do not split evenly over 2 processes, a rank
# left without rows (online, batch 1), tasks absent from a step (round_robin), and 64 test
# images per task in batches of 10 (7 batches: one rank gets one more).
COMMON = ["eval.batch_size=10", "analysis.bias=false", "analysis.task_vectors=false"]
CONFIGS: dict[str, list[str]] = {
    "eval": ["analysis.bias=true", "analysis.max_images=21", "analysis.projection_tasks=2"],
    "v1": ["surgery=v1", "surgery.steps=4", "surgery.batch_size=5"],
    "v1_online": ["surgery=v1", "surgery.online=true"],
    "v2": ["surgery=v2", "surgery.steps=3", "surgery.batch_size=5", "surgery.sampling=round_robin"],
    "stats": ["surgery=stats", "surgery.num_samples=20", "surgery.batch_size=7"],
    "ada_task": [
        "merge=adamerging",
        "merge.granularity=task",
        "merge.steps=3",
        "merge.batch_size=5",
    ],
    "ada_layer": [
        "merge=adamerging",
        "merge.granularity=layer",
        "merge.steps=3",
        "merge.batch_size=5",
    ],
}
TINY = ["model=embedded-tiny", "tasks=embedded3", "logger=none"]


def main(out: Path, cache: Path, trainer: list[str], names: list[str]) -> None:
    import torch
    from hydra import compose, initialize_config_module

    from mergelab.pipeline import run

    torch.set_num_threads(1)
    for name in names:
        overrides = [*TINY, f"paths.cache_dir={cache}", *COMMON, *CONFIGS[name], *trainer]
        with initialize_config_module(config_module="mergelab.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        run(cfg, out / name)


if __name__ == "__main__":
    args = sys.argv[1:]
    only = [a.split("=", 1)[1].split(",") for a in args if a.startswith("only=")]
    rest = [a for a in args[2:] if not a.startswith("only=")]
    main(Path(args[0]), Path(args[1]), rest, only[0] if only else list(CONFIGS))
