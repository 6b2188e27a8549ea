"""Permutation alignment cost (Git Re-Basin, arXiv 2209.04836): seconds to align one model
(one expert, or one foundation in a non-local pool, whose experts then reuse its
permutation) for the embedded ViT and a ViT-B/32-sized open_clip tower, random weights.

Two pairs per size:
- ``independent``: two independently initialised models (the non-local case: nothing to
  recover, coordinate descent runs until a sweep changes nothing);
- ``permuted``: a model and a randomly permuted copy of it (residual channels, heads,
  within-head channels, MLP units) — must come back exactly (``recovered``).

Weight matching runs through ``WeightMatching.find`` and activation matching through
``ActivationMatching.find`` (the Lightning ``trainer.predict`` pass the pipeline uses), on
random images. ``seconds`` is wall time, ``cpu_seconds`` the process's CPU time (with the
default ``--threads 1``, what one idle core would take — robust on a shared machine).

    python -m bench.align_bench                                   # both sizes
    python -m bench.align_bench --size embedded --images 256
    python -m bench.align_bench --size vit-b-32 --images 64 --accelerator gpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

SIZES = {
    # the embedded benchmark's backbone (mergelab/conf/model/embedded.yaml)
    "embedded": dict(
        image_size=28, patch_size=7, width=128, layers=4, head_width=32, mlp_ratio=4.0, embed_dim=64
    ),  # fmt: skip
    # CLIP ViT-B/32's image tower: width 768, 12 blocks, 12 heads, 224 px, patch 32
    "vit-b-32": dict(
        image_size=224,
        patch_size=32,
        width=768,
        layers=12,
        head_width=64,
        mlp_ratio=4.0,
        embed_dim=512,
    ),  # fmt: skip
}
DEFAULT_IMAGES = {"embedded": 256, "vit-b-32": 64}


def _bench_size(
    size: str, n_images: int, batch_size: int, accelerator: str, seed: int, methods_on: list[str]
) -> dict:
    from mergelab.align import ActivationMatching, WeightMatching, spec_for
    from mergelab.context import RunContext
    from mergelab.pool.base import ModelPool
    from mergelab.pool.vit import build_openclip_vision

    cfg = dict(SIZES[size])
    embed_dim = cfg.pop("embed_dim")

    def factory():
        return build_openclip_vision(embed_dim, **cfg)

    def model(s: int) -> dict:
        torch.manual_seed(s)
        return factory().state_dict()

    a = model(seed)
    spec = spec_for(factory())
    pairs = {
        "independent": model(seed + 1),
        "permuted": spec.apply(a, spec.random(torch.Generator().manual_seed(seed + 2))),
    }
    px = cfg["image_size"]
    g = torch.Generator().manual_seed(seed)
    pool = ModelPool(
        family="bench", backbone=size, tasks=["random"], encoder_factory=factory,
        pretrained=a, experts={}, heads={},
        test_sets={"random": TensorDataset(torch.randn(n_images, 3, px, px, generator=g))},
    )  # fmt: skip
    ctx = RunContext(
        out_dir=Path(".bench") / "align_tmp",
        trainer={"accelerator": accelerator, "devices": 1},
        eval_batch_size=batch_size,
    )
    n_params = sum(v.numel() for v in a.values())
    out = {"size": size, "params": n_params, "images": n_images, "runs": []}
    methods = {
        "weight_matching": WeightMatching(seed=seed),
        "activation_matching": ActivationMatching(
            num_samples=n_images, batch_size=batch_size, seed=seed
        ),
    }
    for pair, b in pairs.items():
        for name, method in methods.items():
            if name not in methods_on:
                continue
            t, c = time.perf_counter(), time.process_time()
            perms, info = method.find(spec, a, b, pool, ctx, ["random"])
            secs, cpu = time.perf_counter() - t, time.process_time() - c
            row = {"pair": pair, "method": name, "seconds": round(secs, 3),
                   "cpu_seconds": round(cpu, 3), **info}  # fmt: skip
            if pair == "permuted":
                back = spec.apply(b, perms)
                row["recovered"] = all(torch.equal(back[k], a[k]) for k in a)
            out["runs"].append(row)
            extra = {k: v for k, v in row.items() if k not in ("pair", "method", "seconds")}
            extra.pop("moved", None)
            shown = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in extra.items())  # fmt: skip
            print(f"{size:9s} {pair:11s} {name:19s} {secs:8.2f} s  {shown}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=[*SIZES, "both"], default="both")
    ap.add_argument("--images", type=int, default=None, help="images for activation matching")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu | gpu)")
    ap.add_argument(
        "--methods", default="weight_matching,activation_matching", help="comma-separated"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: cpu_seconds = core-s)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this json file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = list(SIZES) if a.size == "both" else [a.size]
    res = {
        "threads": torch.get_num_threads(),
        "accelerator": a.accelerator,
        "device": torch.cuda.get_device_name() if a.accelerator != "cpu" else "cpu",
        "sizes": [
            _bench_size(
                s,
                a.images or DEFAULT_IMAGES[s],
                a.batch_size,
                a.accelerator,
                a.seed,
                a.methods.split(","),
            )  # fmt: skip
            for s in sizes
        ],
    }
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
