"""The FusionBench checkpoint family (Tang et al., FusionBench 2024): Hugging Face
``CLIPVisionModel`` experts (``tanganke/clip-vit-base-patch32_<task>``) fine-tuned from
``openai/clip-vit-base-patch32``, read from a local directory or the HF cache, offline.

The encoder maps images to projected CLIP features, as FusionBench does: the vision model's
pooled output times the base CLIP model's ``visual_projection`` (shared by all experts, so it
is a frozen non-persistent buffer and never merged). Its state-dict keys are the expert files'
keys (``vision_model.embeddings...``, ``vision_model.encoder.layers.N...``), and
``vision_model.encoder.layers`` is what :func:`mergelab.surgery.blocks.discover_blocks` finds.

Needs the optional extra ``pip install mergelab[hf]`` (transformers).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool
from mergelab.pool.checkpoints import load_checkpoint
from mergelab.pool.clip import (
    cached_head,
    clip_transform,
    file_identity,
    head_cache_path,
    zero_shot_weights,
)
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.state import LazyStateDict, check_compatible, check_finite, save_state_dict
from mergelab.tasks.vit8 import TaskSpec, load_test_set, resolve_tasks

if TYPE_CHECKING:
    from mergelab.engine import Engine

# FusionBench's task names in its model repository ids.
FUSIONBENCH_NAMES = {
    "SUN397": "sun397",
    "Cars": "stanford-cars",
    "RESISC45": "resisc45",
    "EuroSAT": "eurosat",
    "SVHN": "svhn",
    "GTSRB": "gtsrb",
    "MNIST": "mnist",
    "DTD": "dtd",
}
_PREFIX = "vision_model."
# Keys older transformers saved that are not parameters of the model (a constant buffer).
_IGNORED_SUFFIXES = ("position_ids",)
# A CLIP tokenizer's files (fast tokenizer, or the BPE vocabulary with merges.txt).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "the Hugging Face CLIP family needs transformers: pip install 'mergelab[hf]'"
        ) from None
    return transformers


class HFCLIPImageEncoder(nn.Module):
    """Images → projected CLIP features: ``visual_projection(pooler_output(vision_model(x)))``
    (FusionBench's CLIP classification protocol). ``projection`` is ``(embed_dim, width)``."""

    def __init__(self, vision_config: Any, projection: Tensor) -> None:
        super().__init__()
        model = _transformers().CLIPVisionModel(vision_config)
        # transformers < 5 nests the transformer under .vision_model; >= 5 does not. Holding
        # the inner module keeps our keys equal to the checkpoints' ("vision_model.…") in both.
        self.vision_model = getattr(model, "vision_model", model)
        self.register_buffer("projection", projection.detach().clone().float(), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=images).pooler_output
        return pooled @ self.projection.t().to(pooled.dtype)


def _vision_keys(state_keys, expected: Mapping[str, Tensor]) -> dict[str, str]:
    """Map our keys → the file's keys (files from transformers >= 5 lack the prefix)."""
    keys = [k for k in state_keys if not k.endswith(_IGNORED_SUFFIXES)]
    have = set(keys)
    out = {}
    for k in expected:
        bare = k[len(_PREFIX) :]
        out[k] = k if k in have else bare if bare in have else k
    return out


def resolve_model_dir(repo_id: str, local_root: str | os.PathLike | None) -> Path:
    """A model directory: ``<local_root>/<name>`` or ``<local_root>/<owner>/<name>`` when a
    local root is given, else the HF cache snapshot (offline; never downloads)."""
    name = repo_id.split("/")[-1]
    if local_root:
        root = Path(os.path.expanduser(str(local_root)))
        for cand in (root / repo_id, root / name):
            if (cand / "config.json").is_file():
                return cand
        raise CheckpointError(
            f"Hugging Face model {repo_id!r} not found: expected {root / name}/config.json "
            f"(or {root / repo_id}). Download it with `huggingface-cli download {repo_id} "
            f"--local-dir {root / name}`."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:
        raise CheckpointError(
            f"Hugging Face model {repo_id!r} is not in the local HF cache ({type(e).__name__}). "
            f"Download it once with `huggingface-cli download {repo_id}`, or set model.checkpoints "
            "to a folder holding it."
        ) from None


def _weights_file(model_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise CheckpointError(
        f"no weights in {model_dir}: expected model.safetensors or pytorch_model.bin"
    )


def cached_vision_model_state(
    model_dir: Path, cache_dir: Path, expected: Mapping[str, Tensor], what: str
) -> LazyStateDict:
    """The vision-model weights of a checkpoint directory as a lazy state dict keyed like
    :class:`HFCLIPImageEncoder`: the file itself when its keys already match, else a cached
    safetensors conversion (renamed keys, pytorch_model.bin, or a full CLIPModel file)."""
    path = _weights_file(model_dir)
    if path.suffix == ".safetensors":
        lazy = LazyStateDict(path)
        if set(lazy) == set(expected):
            check_compatible(expected, lazy, f"{what} ({path})")
            return lazy
    digest = hashlib.sha256(file_identity(path).encode()).hexdigest()[:16]
    out = cache_dir / "converted" / f"{model_dir.name}-{digest}.safetensors"
    if not out.is_file():
        src = (
            LazyStateDict(path)
            if path.suffix == ".safetensors"
            else load_checkpoint(path).state_dict
        )
        names = _vision_keys(list(src), expected)
        missing = [f for f in names.values() if f not in src]
        if missing:
            raise CheckpointError(f"{what} ({path}): missing key {missing[0]!r}")
        state = {k: src[f] for k, f in names.items()}
        check_compatible(expected, state, f"{what} ({path})")
        check_finite(state, f"{what} ({path})")
        save_state_dict(state, out)
    return LazyStateDict(out)


def _head_file(heads_dir: Path | None, task: str) -> Path | None:
    if heads_dir is None:
        return None
    for name in (f"head_{task}.safetensors", f"head_{task}.pt"):
        if (heads_dir / name).is_file():
            return heads_dir / name
    return None


def build_pool(
    tasks: list[str],
    cache_dir: str,
    base: str = "openai/clip-vit-base-patch32",
    experts: str = "tanganke/clip-vit-base-patch32_{task}",
    expert_names: Mapping[str, str] | None = None,
    checkpoints: str | None = None,
    heads: str | None = None,
    data: str | None = None,
    data_source: str = "auto",
    max_items_per_task: int | None = None,
    seed: int = 0,
    text_batch_size: int = 256,
    engine: Engine | None = None,
) -> ModelPool:
    """Build a ModelPool from FusionBench's HF CLIP experts (family ``"fusionbench"``).

    ``base``/``experts`` are HF repo ids (``{task}`` is replaced by FusionBench's task name),
    read from ``checkpoints`` (or ``$MERGELAB_CHECKPOINTS``) when set, else from the HF cache.
    Heads: ``<heads>/head_<Task>.safetensors|.pt`` when given, else zero-shot from the base
    CLIP text tower (needs its tokenizer files), cached.
    ``engine`` (the run's) is not used: this pool is read from checkpoints, and its zero-shot
    heads are model files, computed once in fp32 on the CPU whatever the run's precision.
    """
    tf = _transformers()
    specs: list[TaskSpec] = resolve_tasks(tasks)
    keys = [str(t) for t in tasks]  # the caller's spelling keys the pool
    names = {**FUSIONBENCH_NAMES, **dict(expert_names or {})}
    local = checkpoints or os.environ.get("MERGELAB_CHECKPOINTS")
    cache = Path(os.path.expanduser(str(cache_dir))) / "fusionbench" / base.replace("/", "--")

    base_dir = resolve_model_dir(base, local)
    expert_dirs = {
        k: resolve_model_dir(experts.format(task=names[s.name]), local) for k, s in zip(keys, specs)
    }

    config = tf.AutoConfig.from_pretrained(base_dir)
    vision_config = getattr(config, "vision_config", config)
    base_weights = _weights_file(base_dir)
    base_state = (
        LazyStateDict(base_weights)
        if base_weights.suffix == ".safetensors"
        else load_checkpoint(base_weights).state_dict
    )
    if "visual_projection.weight" not in base_state:
        raise CheckpointError(
            f"{base_weights}: no 'visual_projection.weight'; the base must be a full CLIPModel "
            "(e.g. openai/clip-vit-base-patch32), whose projection maps features to CLIP space"
        )
    projection = base_state["visual_projection.weight"]

    def factory() -> nn.Module:
        return HFCLIPImageEncoder(vision_config, projection)

    expected = factory().state_dict()
    theta0 = cached_vision_model_state(base_dir, cache, expected, "pretrained")
    expert_states = {
        t: cached_vision_model_state(d, cache, expected, f"expert {t!r}")
        for t, d in expert_dirs.items()
    }

    heads_dir = Path(os.path.expanduser(heads)) if heads else None
    head_map: dict[str, nn.Module] = {}
    head_src: dict[str, str] = {}
    text: dict[str, Any] = {}  # the base CLIP model and tokenizer, loaded on first need

    def text_tower() -> tuple[Any, Any]:
        # Only when a head is not cached yet: cached heads need neither the text tower nor the
        # tokenizer files.
        if not text:
            # transformers >= 5 silently builds an empty-vocabulary CLIP tokenizer when the
            # folder has no tokenizer files, which would give every class the same head row.
            if not any((base_dir / f).is_file() for f in _TOKENIZER_FILES):
                raise CheckpointError(
                    f"cannot build zero-shot heads: no tokenizer in {base_dir} (expected one of "
                    f"{', '.join(_TOKENIZER_FILES)}); download the full {base!r} repository, or "
                    "give head files as model.heads=<dir>/head_<Task>.safetensors"
                )
            try:
                text["clip"] = tf.CLIPModel.from_pretrained(base_dir).eval()
                text["tokenizer"] = tf.AutoTokenizer.from_pretrained(base_dir)
            except Exception as e:
                raise CheckpointError(
                    f"cannot build zero-shot heads from {base_dir} ({type(e).__name__}: {e}); "
                    f"give head files as model.heads=<dir>/head_<Task>.safetensors"
                ) from None
        return text["clip"], text["tokenizer"]

    def encode(texts: list[str]) -> Tensor:
        clip, tokenizer = text_tower()
        # Truncate to the text tower's context (a long class name must not overflow its
        # position table); CLIP's tokenizer keeps the end-of-text token it pools.
        context = int(clip.config.text_config.max_position_embeddings)
        out = []
        for i in range(0, len(texts), text_batch_size):
            tok = tokenizer(
                texts[i : i + text_batch_size],
                padding=True,
                truncation=True,
                max_length=context,
                return_tensors="pt",
            )
            feats = clip.get_text_features(**tok)
            out.append(getattr(feats, "pooler_output", feats))
        return torch.cat(out)

    def zero_shot(spec: TaskSpec) -> Tensor:
        clip, _ = text_tower()
        return zero_shot_weights(encode, spec.classnames, spec.prompts, clip.logit_scale)

    for k, s in zip(keys, specs):
        found = _head_file(heads_dir, s.name)
        if found is not None:
            ckpt = load_checkpoint(found)
            head = ckpt.head or ClassificationHead(
                ckpt.state_dict["weight"].float(), ckpt.state_dict.get("bias")
            )
            if tuple(head.weight.shape) != (len(s.classnames), projection.shape[0]):
                raise CheckpointError(
                    f"{found}: head shape {tuple(head.weight.shape)}, expected "
                    f"{(len(s.classnames), projection.shape[0])} for {s.name}"
                )
            head_map[k], head_src[k] = head, str(found)
            continue
        path = head_cache_path(
            cache, file_identity(base_weights), s.name, s.classnames, s.templates
        )
        head_map[k] = cached_head(path, lambda s=s: zero_shot(s))
        head_src[k] = f"zero-shot from {base_dir} (cached at {path})"

    transform = clip_transform({"vision_cfg": {"image_size": int(vision_config.image_size)}})
    test_sets = {
        k: load_test_set(s, data, transform, data_source, max_items_per_task, seed)
        for k, s in zip(keys, specs)
    }
    return ModelPool(
        family="fusionbench",
        backbone=base.split("/")[-1],
        tasks=keys,
        encoder_factory=factory,
        pretrained=theta0,
        experts=expert_states,
        heads=head_map,
        test_sets=test_sets,
        meta={
            "checkpoints": {
                "pretrained": str(base_dir),
                "experts": {t: str(d) for t, d in expert_dirs.items()},
                "heads": head_src,
                "converted": {t: str(sd.path) for t, sd in expert_states.items()},
            },
            "max_items_per_task": max_items_per_task,
            "seed": seed,
            "embed_dim": int(projection.shape[0]),
            "data": str(data or os.environ.get("MERGELAB_DATA", "")),
        },
    )
