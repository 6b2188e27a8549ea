"""The task_vectors checkpoint family (Ilharco et al., "Editing Models with Task Arithmetic",
ICLR 2023), shared by the AdaMerging, Representation Surgery and SurgeryV2 repositories:

    <root>/<arch>/zeroshot.pt               θ0: a pickled src.modeling.ImageEncoder
    <root>/<arch>/<Task>/finetuned.pt       θt: a pickled ImageEncoder fine-tuned on Task
    <root>/<arch>/head_<Task>.pt            the frozen zero-shot head (ClassificationHead)

The pickles hold open_clip 2.0.x objects; they are read with the restricted unpickler of
:mod:`mergelab.pool.checkpoints` (no pickled code runs, no ``src`` package needed), their
image tower ``model.visual.*`` is loaded into today's open_clip ``VisionTransformer``, and each
one is converted once into a cached safetensors file served lazily (a merge holds one
parameter per expert at a time).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool
from mergelab.pool.checkpoints import load_checkpoint
from mergelab.pool.clip import (
    clip_transform,
    file_identity,
    load_clip,
    model_config,
    openclip_zero_shot_heads,
    vision_factory,
)
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.state import LazyStateDict, check_compatible, check_finite, save_state_dict
from mergelab.tasks.vit8 import TaskSpec, load_test_set, resolve_tasks

if TYPE_CHECKING:
    from mergelab.engine import Engine

HOW_TO_GET = (
    "The task_vectors checkpoints (zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt per "
    "architecture) are linked from the task_vectors and AdaMerging repositories' READMEs; "
    "place them under <checkpoints>/<arch>/ and set model.checkpoints or MERGELAB_CHECKPOINTS."
)

# Where the image tower sits inside the pickled objects' state dicts.
_VISION_PREFIXES = ("model.visual.", "visual.", "image_encoder.model.visual.")


def checkpoints_root(configured: str | os.PathLike | None) -> Path:
    """The checkpoint root: the config value, else ``$MERGELAB_CHECKPOINTS``."""
    root = configured or os.environ.get("MERGELAB_CHECKPOINTS")
    if not root:
        raise ConfigError(
            "no checkpoint root: set model.checkpoints=/path/to/checkpoints or the "
            f"MERGELAB_CHECKPOINTS environment variable. {HOW_TO_GET}"
        )
    return Path(os.path.expanduser(str(root)))


def vision_state(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str
) -> dict[str, Tensor]:
    """The image-tower weights inside ``state`` (an ImageEncoder's, a CLIP's or a bare tower's
    state dict), keyed like today's open_clip ``VisionTransformer``, checked against it."""
    for prefix in _VISION_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            break
    else:
        sub = dict(state)
    check_compatible(expected, sub, what)
    check_finite(sub, what)
    return sub


def cached_vision_state(
    path: Path, cache_dir: str | os.PathLike, expected: Mapping[str, Tensor], what: str
) -> LazyStateDict:
    """Convert a checkpoint's image tower to safetensors once (cached by file identity) and
    return it lazily."""
    digest = hashlib.sha256(file_identity(path).encode()).hexdigest()[:16]
    out = Path(cache_dir) / "converted" / f"{path.parent.name}-{path.stem}-{digest}.safetensors"
    if not out.is_file():
        ckpt = load_checkpoint(path)
        save_state_dict(vision_state(ckpt.state_dict, expected, f"{what} ({path})"), out)
    lazy = LazyStateDict(out)
    check_compatible(expected, lazy, f"{what} ({path})")
    return lazy


def load_head(path: Path, embed_dim: int, n_classes: int, task: str) -> ClassificationHead:
    """A task_vectors ``head_<Task>.pt`` (pickled ClassificationHead or a weight/bias dict)."""
    ckpt = load_checkpoint(path)
    head = ckpt.head
    if head is None:
        if "weight" not in ckpt.state_dict:
            raise CheckpointError(f"{path}: not a classification head (no 'weight' tensor)")
        head = ClassificationHead(ckpt.state_dict["weight"].float(), ckpt.state_dict.get("bias"))
    out_dim, in_dim = head.weight.shape
    if in_dim != embed_dim or out_dim != n_classes:
        raise CheckpointError(
            f"{path}: head for {task} maps {in_dim} → {out_dim}, expected {embed_dim} features "
            f"→ {n_classes} classes"
        )
    return head


def _find(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def build_pool(
    tasks: list[str],
    cache_dir: str,
    arch: str = "ViT-B-32",
    checkpoints: str | None = None,
    data: str | None = None,
    pretrained: str | None = "openai",
    quick_gelu: bool = True,
    model_cfg: Mapping[str, Any] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    data_source: str = "auto",
    max_items_per_task: int | None = None,
    seed: int = 0,
    text_batch_size: int = 256,
    engine: Engine | None = None,
) -> ModelPool:
    """Build a ModelPool from task_vectors-format checkpoints (family ``"task_vectors"``).

    θ0 comes from ``<root>/<arch>/zeroshot.pt`` (else from ``pretrained``: an open_clip tag in
    the cache or a local file); experts from ``<root>/<arch>/<Task>/finetuned.pt``; heads from
    ``head_<Task>.pt`` (next to the experts or in the task folder), else zero-shot from
    ``pretrained``'s text tower (cached). ``model_cfg`` replaces the open_clip config of
    ``arch`` (tiny test models); ``max_items_per_task`` subsamples the test sets.
    ``engine`` (the run's) is not used: this pool is read from checkpoints, and its zero-shot
    heads are model files, computed once in fp32 on the CPU whatever the run's precision.
    """
    specs: list[TaskSpec] = resolve_tasks(tasks)
    names = [str(t) for t in tasks]  # the caller's spelling keys the pool; files use spec.name
    cfg = model_config(arch, model_cfg)
    factory = vision_factory(cfg, quick_gelu)
    expected = factory().state_dict()
    embed_dim = int(cfg["embed_dim"])
    arch_dir = checkpoints_root(checkpoints) / arch
    cache = Path(os.path.expanduser(str(cache_dir))) / "task_vectors" / arch

    # Every expert must exist before any work starts: one error names all missing files.
    expert_paths = {n: arch_dir / s.name / "finetuned.pt" for n, s in zip(names, specs)}
    missing = [str(p) for p in expert_paths.values() if not p.is_file()]
    if missing:
        raise CheckpointError(f"missing expert checkpoint(s): {', '.join(missing)}. {HOW_TO_GET}")

    zeroshot = arch_dir / "zeroshot.pt"
    clip_model: nn.Module | None = None
    if zeroshot.is_file():
        theta0: Mapping[str, Tensor] = cached_vision_state(zeroshot, cache, expected, "pretrained")
        theta0_src = str(zeroshot)
    else:
        if not pretrained:
            raise CheckpointError(
                f"pretrained weights not found: expected {zeroshot} (or set model.pretrained to "
                f"an open_clip tag or file). {HOW_TO_GET}"
            )
        clip_model = load_clip(arch, pretrained, quick_gelu, model_cfg, cache_dir)
        theta0 = vision_state(
            {f"visual.{k}": v for k, v in clip_model.visual.state_dict().items()},
            expected,
            "pretrained",
        )
        theta0_src = str(pretrained)

    experts = {
        t: cached_vision_state(p, cache, expected, f"expert {t!r}") for t, p in expert_paths.items()
    }

    heads: dict[str, nn.Module] = {}
    head_src: dict[str, str] = {}
    need_zero_shot = []
    for n, s in zip(names, specs):
        found = _find([arch_dir / f"head_{s.name}.pt", arch_dir / s.name / f"head_{s.name}.pt"])
        if found is not None:
            heads[n] = load_head(found, embed_dim, len(s.classnames), s.name)
            head_src[n] = str(found)
        else:
            need_zero_shot.append(s)
    if need_zero_shot:
        import open_clip

        if clip_model is None:
            try:
                clip_model = load_clip(arch, pretrained, quick_gelu, model_cfg, cache_dir)
            except (ConfigError, CheckpointError) as e:
                wanted = ", ".join(str(arch_dir / f"head_{s.name}.pt") for s in need_zero_shot)
                raise CheckpointError(
                    f"no head file ({wanted}) and no CLIP text tower to build zero-shot heads: {e}"
                ) from None
        backbone_id = f"{arch}:{pretrained}:{quick_gelu}:{sorted(cfg.items())!r}"
        if model_cfg is None:
            tokenizer = open_clip.get_tokenizer(arch)
        else:  # a custom config: CLIP's BPE tokenizer at the config's context length
            context = int(dict(cfg.get("text_cfg", {})).get("context_length", 77))
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
        built = openclip_zero_shot_heads(
            clip_model, tokenizer, need_zero_shot, cache, backbone_id, text_batch_size
        )
        for n, s in zip(names, specs):
            if s.name in built:
                heads[n] = built[s.name]
                head_src[n] = f"zero-shot from {pretrained} (cached under {cache / 'heads'})"

    transform = clip_transform(cfg, preprocess)
    test_sets = {
        n: load_test_set(s, data, transform, data_source, max_items_per_task, seed)
        for n, s in zip(names, specs)
    }
    return ModelPool(
        family="task_vectors",
        backbone=arch,
        tasks=names,
        encoder_factory=factory,
        pretrained=theta0,
        experts=experts,
        heads=heads,
        test_sets=test_sets,
        meta={
            "checkpoints": {
                "pretrained": theta0_src,
                "experts": {t: str(p) for t, p in expert_paths.items()},
                "heads": head_src,
                # the converted files' names carry the source files' identity (path/size/mtime)
                "converted": {t: str(sd.path) for t, sd in experts.items()},
            },
            "arch": arch,
            "pretrained_weights": str(pretrained),
            "max_items_per_task": max_items_per_task,
            "seed": seed,
            "quick_gelu": quick_gelu,
            "embed_dim": embed_dim,
            "vision_cfg": dict(cfg["vision_cfg"]),
            "data": str(data or os.environ.get("MERGELAB_DATA", "")),
        },
    )
