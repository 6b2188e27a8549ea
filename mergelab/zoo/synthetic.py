"""Synthetic pools: random tiny ViTs with random "experts" (θ0 + noise) and random images.

For unit tests of the mechanics (merges, surgery, AdaMerging) in seconds, and for the
ViT-B/32-size merge benchmark. No accuracy claims are made on these.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from mergelab.pool.base import ModelPool
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.vit import build_openclip_vision


def synthetic_pool(
    n_tasks: int = 3,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 16,
    image_size: int = 16,
    patch_size: int = 8,
    n_classes: int = 4,
    n_images: int = 32,
    expert_noise: float = 0.05,
    seed: int = 0,
) -> ModelPool:
    """A ModelPool of random tiny open_clip ViTs. Experts differ from θ0 by Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        head_width=width // heads,
        mlp_ratio=4.0,
    )

    def factory():
        return build_openclip_vision(embed_dim, **vision)

    torch.manual_seed(seed)
    theta0 = {k: v.clone() for k, v in factory().state_dict().items()}
    tasks = [f"task{i}" for i in range(n_tasks)]
    experts = {
        t: {k: v + expert_noise * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
        for t in tasks
    }
    head_map = {
        t: ClassificationHead(torch.randn(n_classes, embed_dim, generator=g)) for t in tasks
    }
    data = {
        t: TensorDataset(
            torch.randn(n_images, 3, image_size, image_size, generator=g),
            torch.randint(0, n_classes, (n_images,), generator=g),
        )
        for t in tasks
    }
    return ModelPool(
        family="synthetic",
        backbone=f"vit-w{width}-l{layers}",
        tasks=tasks,
        encoder_factory=factory,
        pretrained=theta0,
        experts=experts,
        heads=head_map,
        test_sets=data,
        meta={"vision_cfg": vision, "embed_dim": embed_dim},
    )
