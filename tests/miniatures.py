"""Miniature versions of the real checkpoint and data formats, built on the fly, offline:

- task_vectors: pickled ``src.modeling.ImageEncoder`` / ``ClassificationHead`` objects whose
  open_clip classes carry the open_clip 2.0.x names (``open_clip.model.VisualTransformer`` ...),
  registered in ``sys.modules`` only while pickling;
- FusionBench: a tiny HF ``CLIPModel`` base and ``CLIPVisionModel`` experts (save_pretrained);
- image-folder test sets in the task_vectors layout.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
from pathlib import Path

import torch
from torch import nn

from mergelab.tasks.vit8 import TASKS

# A tiny open_clip config (QuickGELU, like OpenAI's CLIP). The text tower keeps CLIP's BPE
# vocabulary size so the real tokenizer works with it.
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
ARCH = "ViT-B-32"
OLD_NAMES = {"VisionTransformer": "VisualTransformer"}  # today's name → open_clip 2.0.x name


def tiny_clip(seed: int = 0) -> nn.Module:
    """A random tiny open_clip CLIP (both towers) with QuickGELU."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_CFG, quick_gelu=True).eval()


@contextlib.contextmanager
def legacy_modules():
    """Fake ``open_clip.model`` (2.0.x class names) and ``src.modeling`` modules, present in
    ``sys.modules`` only inside the block, so pickles record exactly those global names."""
    old_cls = {}
    fake_oc = types.ModuleType("open_clip.model")
    for name in (
        "CLIP",
        "VisualTransformer",
        "Transformer",
        "ResidualAttentionBlock",
        "LayerNorm",
        "QuickGELU",
    ):
        old_cls[name] = type(name, (nn.Module,), {"__module__": "open_clip.model"})
        setattr(fake_oc, name, old_cls[name])
    fake_src = types.ModuleType("src")
    fake_modeling = types.ModuleType("src.modeling")
    fake_modeling.ImageEncoder = type("ImageEncoder", (nn.Module,), {"__module__": "src.modeling"})
    fake_modeling.ClassificationHead = type(
        "ClassificationHead", (nn.Linear,), {"__module__": "src.modeling"}
    )
    fake_src.modeling = fake_modeling
    saved = {k: sys.modules.get(k) for k in ("open_clip.model", "src", "src.modeling")}
    sys.modules.update({"open_clip.model": fake_oc, "src": fake_src, "src.modeling": fake_modeling})
    try:
        yield old_cls, fake_modeling
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _as_legacy(clip: nn.Module, old_cls: dict) -> nn.Module:
    """A copy of ``clip`` whose open_clip modules are re-classed to the 2.0.x classes."""
    clip = copy.deepcopy(clip)
    for m in clip.modules():
        cls = type(m)
        if cls.__module__.startswith("open_clip."):
            m.__class__ = old_cls[OLD_NAMES.get(cls.__name__, cls.__name__)]
    return clip


def save_image_encoder(clip: nn.Module, path: Path) -> None:
    """Pickle ``clip`` the way task_vectors' ``ImageEncoder.save`` does: a whole
    ``src.modeling.ImageEncoder`` holding the CLIP model (text transformer deleted) and its
    torchvision preprocessing pipelines."""
    from open_clip.transform import _convert_to_rgb
    from torchvision import transforms as T

    size = TINY_CFG["vision_cfg"]["image_size"]
    pre = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            _convert_to_rgb,
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    with legacy_modules() as (old_cls, modeling):
        enc = modeling.ImageEncoder()
        enc.model = _as_legacy(clip, old_cls)
        del enc.model.transformer  # as ImageEncoder(keep_lang=False) does
        enc.train_preprocess, enc.val_preprocess = pre, pre
        enc.cache_dir = None
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(enc, path)


def save_head(weights: torch.Tensor, path: Path) -> None:
    """Pickle a task_vectors ``src.modeling.ClassificationHead(normalize=True, weights)``."""
    with legacy_modules() as (_, modeling):
        head = modeling.ClassificationHead(weights.shape[1], weights.shape[0])
        head.normalize = True
        with torch.no_grad():
            head.weight.copy_(weights)
            head.bias.zero_()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(head, path)


def perturbed(clip: nn.Module, scale: float, seed: int) -> nn.Module:
    """A fine-tuned-looking copy: every float weight moved by Gaussian noise."""
    out = copy.deepcopy(clip)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def make_task_vectors_root(root: Path, tasks: list[str], heads: bool = True, seed: int = 0) -> dict:
    """``<root>/ViT-B-32/{zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt}``; returns the
    reference models (today's open_clip modules with the same weights)."""
    clip = tiny_clip(seed)
    arch_dir = root / ARCH
    save_image_encoder(clip, arch_dir / "zeroshot.pt")
    ref = {"clip": clip, "experts": {}, "heads": {}}
    g = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(tasks):
        ft = perturbed(clip, 0.02, seed + 10 + i)
        save_image_encoder(ft, arch_dir / t / "finetuned.pt")
        ref["experts"][t] = ft
        if heads:
            w = torch.randn(len(TASKS[t].classnames), TINY_CFG["embed_dim"], generator=g)
            save_head(w, arch_dir / f"head_{t}.pt")
            ref["heads"][t] = w
    return ref


# --- data ---------------------------------------------------------------------------------

# Class folder names as the task_vectors layouts spell them (EuroSAT's CamelCase folders).
_EUROSAT_DIRS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]
_FOLDERS = {"EuroSAT": "EuroSAT_splits/test", "DTD": "dtd/test", "SUN397": "sun397/test"}


def _png(path: Path, value: int, size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(value)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)


def make_image_folders(
    root: Path, tasks: list[str], per_class: int = 1, max_classes: int | None = None
) -> dict:
    """Tiny test splits in the task_vectors layout; returns ``{task: [(file, label), ...]}``."""
    written = {}
    for t in tasks:
        spec = TASKS[t]
        n = len(spec.classnames) if max_classes is None else min(max_classes, len(spec.classnames))
        if t == "EuroSAT":
            dirs = _EUROSAT_DIRS[:n]  # sorted-order rule: all 10 folders must exist
            n = len(dirs)
        elif t in ("MNIST", "SVHN"):
            dirs = [str(i) for i in range(n)]
        else:
            dirs = [c.replace(" ", "_").replace("/", "-") for c in spec.classnames[:n]]
        folder = root / _FOLDERS.get(t, f"{t}/test")
        items = []
        for label, d in enumerate(dirs):
            for k in range(per_class):
                f = folder / d / f"img{k}.png"
                _png(f, 1000 * label + k)
                items.append((f, label))
        written[t] = items
    return written


# --- FusionBench (HF) ---------------------------------------------------------------------


# A tiny CLIP BPE vocabulary: every single character the prompts use, bare and word-final
# ("</w>"), then CLIP's two special tokens; no merges, so each character is one token.
_TOKEN_PIECES = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,:;'\"!-/&")
TINY_VOCAB_SIZE = 99
TINY_CONTEXT = 77  # CLIP's context length; character-level prompts need the room


def tiny_clip_vocab() -> dict[str, int]:
    """vocab.json of a tiny CLIP tokenizer (special tokens last, as in CLIP's)."""
    pieces = _TOKEN_PIECES + [p + "</w>" for p in _TOKEN_PIECES]
    vocab = {p: i for i, p in enumerate(pieces)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= TINY_VOCAB_SIZE
    return vocab


def save_tiny_clip_tokenizer(model_dir: Path) -> None:
    """Write a tiny ``CLIPTokenizer`` next to a saved model (its save_pretrained files), built
    locally from a hand-written vocab.json + empty merges.txt."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as src:
        (Path(src) / "vocab.json").write_text(json.dumps(tiny_clip_vocab()))
        (Path(src) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer.from_pretrained(src, model_max_length=TINY_CONTEXT)
    tok.save_pretrained(model_dir)


def tiny_hf_configs():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    text = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=TINY_CONTEXT,
        projection_dim=16,
        # the ids of tiny_clip_vocab()'s special tokens (CLIP pools the first end-of-text)
        bos_token_id=len(_TOKEN_PIECES) * 2,
        eos_token_id=len(_TOKEN_PIECES) * 2 + 1,
        pad_token_id=len(_TOKEN_PIECES) * 2 + 1,
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    ), vision


def make_fusionbench_root(
    root: Path, tasks: list[str], seed: int = 0, tokenizer: bool = True
) -> dict:
    """``<root>/clip-vit-base-patch32`` (a tiny CLIPModel, with a tiny tokenizer unless
    ``tokenizer=False``) and
    ``<root>/clip-vit-base-patch32_<task>`` (CLIPVisionModel experts), via save_pretrained;
    plus ``<root>/heads/head_<Task>.safetensors``. Returns the reference models."""
    from transformers import CLIPModel, CLIPVisionModel

    from mergelab.pool.hf import FUSIONBENCH_NAMES
    from mergelab.pool.state import save_state_dict

    cfg, vcfg = tiny_hf_configs()
    torch.manual_seed(seed)
    base = CLIPModel(cfg).eval()
    base.save_pretrained(root / "clip-vit-base-patch32")
    if tokenizer:
        save_tiny_clip_tokenizer(root / "clip-vit-base-patch32")
    ref = {"base": base, "experts": {}, "heads": {}}
    g = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(tasks):
        torch.manual_seed(seed + 100 + i)
        ex = CLIPVisionModel(vcfg).eval()
        ex.save_pretrained(root / f"clip-vit-base-patch32_{FUSIONBENCH_NAMES[t]}")
        ref["experts"][t] = ex
        w = torch.randn(len(TASKS[t].classnames), 16, generator=g)
        save_state_dict({"weight": w}, root / "heads" / f"head_{t}.safetensors")
        ref["heads"][t] = w
    return ref


# --- Hugging Face datasets ----------------------------------------------------------------


def tiny_hf_dataset(n_classes: int, n: int, seed: int = 0, mode: str = "RGB"):
    """A ``datasets.Dataset`` of ``n`` random images (sizes vary, as in real sets) with an
    ``image`` and a ``label`` column, like the benchmark's HF datasets."""
    import datasets
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    images, labels = [], []
    for i in range(n):
        side = 8 + 2 * (i % 3)
        arr = (torch.rand(side, side, channels, generator=g) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode))
        labels.append(int(torch.randint(n_classes, (1,), generator=g)))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=n_classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def write_hf_dataset_repo(folder: Path, splits: dict, config: str | None = None) -> None:
    """A dataset repository as the Hub serves it: ``data/<split>-00000-of-00001.parquet`` (or
    ``<config>/<split>-...`` with a README declaring the config, as ufldl-stanford/svhn does)."""
    sub = config or "data"
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for split, ds in splits.items():
        ds.to_parquet(str(folder / sub / f"{split}-00000-of-00001.parquet"))
    if config:
        files = "".join(f"  - split: {split}\n    path: {config}/{split}-*\n" for split in splits)
        (folder / "README.md").write_text(
            f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n"
        )


def write_hub_cache_snapshot(
    hub_cache: Path, repo_id: str, splits: dict, config: str | None = None
) -> Path:
    """What ``huggingface-cli download --repo-type dataset <repo_id>`` leaves in the hub cache:
    ``datasets--<owner>--<name>/{refs/main, snapshots/<commit>/...}``. Returns the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    write_hf_dataset_repo(snapshot, splits, config)
    return snapshot
