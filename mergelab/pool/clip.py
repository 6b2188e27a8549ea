"""open_clip CLIP backbones (ViT-B/32, ViT-B/16, ViT-L/14, or any open_clip config), their
CLIP preprocessing, and zero-shot classification heads (Radford et al. 2021, §3.1.4 prompt
ensembling; the task_vectors protocol):

    w_c = s · normalize( mean_t normalize( E_text(template_t(class_c)) ) ),  s = exp(logit_scale)

Heads are cached on disk (safetensors), keyed by the backbone weights' identity and the exact
class names and templates, so a change of either rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.checkpoints import load_checkpoint
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.state import save_state_dict


def model_config(arch: str, model_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of ``arch``, or
    ``model_cfg`` when given (custom / tiny architectures)."""
    if model_cfg is not None:
        cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(model_cfg).items()}
    else:
        import open_clip

        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError(
                f"unknown open_clip architecture {arch!r}; e.g. ViT-B-32, ViT-B-16, ViT-L-14 "
                "(see open_clip.list_models())"
            )
    if "embed_dim" not in cfg or "vision_cfg" not in cfg:
        raise ConfigError(
            f"model config for {arch!r} needs embed_dim and vision_cfg, got {sorted(cfg)}"
        )
    return cfg


def vision_factory(cfg: Mapping[str, Any], quick_gelu: bool) -> Callable[[], nn.Module]:
    """A factory of fresh open_clip ``VisionTransformer`` image towers for ``cfg``.

    ``quick_gelu`` must match the weights: OpenAI's CLIP (and so the task_vectors experts)
    was trained with QuickGELU, and a GELU tower would silently give different features.
    """
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    embed_dim, vision = int(cfg["embed_dim"]), dict(cfg["vision_cfg"])

    def factory() -> nn.Module:
        return _build_vision_tower(embed_dim, CLIPVisionCfg(**vision), quick_gelu=quick_gelu)

    return factory


def clip_transform(cfg: Mapping[str, Any], preprocess: Mapping[str, Any] | None = None) -> Callable:
    """CLIP test-time preprocessing: resize (bicubic, shortest side), centre crop, RGB, CLIP
    mean/std — from open_clip's preprocess config for this model (``preprocess`` overrides)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    size = cfg["vision_cfg"].get("image_size", 224)
    pp: dict[str, Any] = {"size": size}
    pp.update(dict(cfg.get("preprocess_cfg", {}) or {}))
    pp.update(dict(preprocess or {}))
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that DDP-trained open_clip checkpoints carry."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_clip(
    arch: str,
    pretrained: str | None,
    quick_gelu: bool = True,
    model_cfg: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """A full open_clip CLIP model (both towers) from a local file or a cached pretrained tag.

    ``pretrained`` is a path to a state-dict file (``.pt``/``.bin``/``.safetensors``, loaded
    with ``weights_only``) or an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...) whose
    weights are already in the cache; nothing is downloaded.
    """
    import open_clip

    if not pretrained:
        raise ConfigError(
            "the CLIP text tower is needed (zero-shot heads or pretrained weights) but "
            "model.pretrained is empty: give an open_clip tag (e.g. openai) or a local file"
        )
    cfg = model_config(arch, model_cfg)
    path = Path(os.path.expanduser(str(pretrained)))
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise CheckpointError(
                f"CLIP weights file not found: {path} (model.pretrained); give an existing "
                "open_clip state-dict file or an open_clip pretrained tag such as 'openai'"
            )
        model = open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu)
        state = _strip_prefixes(load_checkpoint(path).state_dict)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise CheckpointError(
                f"{path} does not match open_clip {arch}: "
                f"{'missing' if missing else 'unexpected'} key {first!r}"
            )
        return model.eval()
    # An open_clip tag: offline only, from the cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = open_clip.create_model(
            arch,
            pretrained=str(pretrained),
            force_quick_gelu=quick_gelu,
            cache_dir=str(cache_dir) if cache_dir else None,
            require_pretrained=True,
        )
    except Exception as e:
        raise CheckpointError(
            f"open_clip weights {arch}/{pretrained} are not available offline ({type(e).__name__}: "
            f'{e}). Fetch them once with network: python -c "import open_clip; '
            f"open_clip.create_model('{arch}', pretrained='{pretrained}')\", or set "
            "model.pretrained to a local open_clip checkpoint file."
        ) from e
    return model.eval()


def zero_shot_weights(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    prompts: Callable[[str], list[str]],
    logit_scale: float,
) -> Tensor:
    """CLIP zero-shot classifier weights (Radford et al. 2021): per class, L2-normalise each
    template's text embedding, average, re-normalise; scale by ``exp(logit_scale)``."""
    rows = []
    with torch.no_grad():
        for c in classnames:
            e = encode_text(prompts(c)).float()
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(dim=0)
            rows.append(e / e.norm())
    return torch.stack(rows) * float(torch.as_tensor(logit_scale).exp())


def head_cache_path(
    cache_dir: str | os.PathLike, backbone_id: str, task: str, classnames, templates
) -> Path:
    """Where a zero-shot head is cached: keyed by backbone identity, class names, templates."""
    key = json.dumps([backbone_id, list(classnames), list(templates)]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return Path(cache_dir) / "heads" / f"{task}-{digest}.safetensors"


def cached_head(path: Path, build: Callable[[], Tensor]) -> ClassificationHead:
    """Load the cached head at ``path``, or build its weights once and write them atomically."""
    if path.is_file():
        weights = load_checkpoint(path).state_dict["weight"]
    else:
        weights = build()
        save_state_dict({"weight": weights}, path)
    return ClassificationHead(weights.float())


def openclip_zero_shot_heads(
    clip: nn.Module,
    tokenizer: Callable,
    specs: Sequence,
    cache_dir: str | os.PathLike,
    backbone_id: str,
    batch_size: int = 256,
) -> dict[str, ClassificationHead]:
    """Zero-shot heads for every task spec from an open_clip model's text tower, cached."""

    def encode(texts: list[str]) -> Tensor:
        return torch.cat(
            [
                clip.encode_text(tokenizer(texts[i : i + batch_size]))
                for i in range(0, len(texts), batch_size)
            ]
        )

    heads = {}
    for spec in specs:
        path = head_cache_path(cache_dir, backbone_id, spec.name, spec.classnames, spec.templates)
        heads[spec.name] = cached_head(
            path,
            lambda spec=spec: zero_shot_weights(
                encode, spec.classnames, spec.prompts, clip.logit_scale
            ),
        )
    return heads


def file_identity(path: str | os.PathLike) -> str:
    """A cheap identity for a file (absolute path, size, mtime) used in cache keys."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"
