"""open_clip vision towers built from a config (architecture as data, as open_clip does)."""

from __future__ import annotations

from typing import Any

from torch import nn


def build_openclip_vision(embed_dim: int, **vision_cfg: Any) -> nn.Module:
    """Build an open_clip ``VisionTransformer`` exactly as ``open_clip.create_model`` does for
    the image tower of a model config ``{"embed_dim": ..., "vision_cfg": {...}}``.

    The embedded benchmark uses this with a tiny config, so it runs the same blocks
    (``transformer.resblocks``), projection and pooling code as CLIP ViT-B/32.
    """
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(**vision_cfg)
    return _build_vision_tower(embed_dim=embed_dim, vision_cfg=cfg)
