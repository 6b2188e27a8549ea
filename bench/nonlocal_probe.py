"""Why merges of the non-local zoo stay at chance: three probes on its two foundations.

1. Linear CKA of the two foundations' output embeddings on the tasks' test images.
2. Foundation A's encoder with foundation B's zero-shot heads, on B's tasks: as it is, and
   with A's embeddings rotated by their Procrustes map onto B's (fitted on the same unlabeled
   images); B's own encoder for reference.
3. The average of the two foundations, zero-shot with each task's head: as they are, and
   weight-matched with the embedding rotation (``align=weight_matching``, heads rotated).

    python -m bench.nonlocal_probe [--images 300] [override ...]
    python -m bench.nonlocal_probe model.pretrain.grayscale=false model.finetune.lr=3e-4

Overrides go to the run's config (``model=embedded-nonlocal`` and ``align=weight_matching``
are set first); the zoo is built into ``paths.cache_dir`` if it is not there.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=300, help="test images per task")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mergelab.align.base import procrustes
    from mergelab.context import RunContext
    from mergelab.pipeline import build

    torch.set_num_threads(1)
    with initialize_config_module(config_module="mergelab.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["model=embedded-nonlocal", "align=weight_matching", "logger=none"]
            + a.overrides,
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    ctx = RunContext(out_dir=Path(tempfile.mkdtemp(prefix="nonlocal_probe_")))
    ctx.engine.start()
    pool = build(
        cfg.model,
        tasks=list(cfg.tasks.names),
        cache_dir=cfg.paths.cache_dir,
        engine=ctx.engine,
        _convert_="all",
    )
    if len(pool.bases) != 2:
        raise SystemExit(f"needs a zoo with two foundations, got {list(pool.bases)}")
    A, B = pool.bases

    data = {}
    for t in pool.tasks:
        ds = pool.test_sets[t]
        xs, ys = zip(*[ds[i] for i in range(min(a.images, len(ds)))])
        data[t] = torch.stack(xs), torch.tensor(ys)

    @torch.no_grad()
    def embed(state, task):
        return pool.encoder(state)(data[task][0]).float()

    @torch.no_grad()
    def accuracy(features, task, heads=pool.heads):
        return float((heads[task](features).argmax(1) == data[task][1]).float().mean()) * 100

    def cka(X, Y):
        X, Y = X - X.mean(0), Y - Y.mean(0)
        return float((X.T @ Y).norm() ** 2 / ((X.T @ X).norm() * (Y.T @ Y).norm()))

    fa = {t: embed(pool.bases[A], t) for t in pool.tasks}
    fb = {t: embed(pool.bases[B], t) for t in pool.tasks}
    XA, XB = torch.cat(list(fa.values())), torch.cat(list(fb.values()))
    print(f"linear CKA of the foundations' embeddings: {cka(XA, XB):.3f}")

    R = procrustes(XA, XB).float()  # XA @ R ≈ XB
    b_tasks = [t for t in pool.tasks if pool.expert_base[t] == B]

    def mean(values):
        return sum(values) / len(values)

    own = mean([accuracy(fb[t], t) for t in b_tasks])
    raw = mean([accuracy(fa[t], t) for t in b_tasks])
    rotated = mean([accuracy(fa[t] @ R, t) for t in b_tasks])
    print(
        f"on {B}'s tasks {b_tasks}: {B}'s encoder {own:.1f}; {A}'s encoder with {B}'s heads "
        f"{raw:.1f}; {A}'s embeddings rotated onto {B}'s {rotated:.1f}"
    )

    average = {k: (pool.bases[A][k].float() + pool.bases[B][k].float()) / 2 for k in pool.bases[A]}
    print(
        f"average of the foundations: {mean([accuracy(embed(average, t), t) for t in pool.tasks]):.1f}"
    )
    aligned = build(cfg.align).align(pool, ctx)
    matched = mean(
        [accuracy(embed(aligned.pretrained, t), t, aligned.heads) for t in aligned.tasks]
    )
    print(f"average of the weight-matched foundations (embedding rotated): {matched:.1f}")


if __name__ == "__main__":
    main()
