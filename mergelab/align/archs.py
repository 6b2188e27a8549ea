"""Permutation specs of the backbones mergelab runs, read from the model (depth, width,
heads, MLP width), never hard-coded.

- open_clip ``VisionTransformer`` (the CLIP benchmark and the embedded ViT): the residual
  stream permutation shared by every block, each block's attention heads (with within-head
  q/k and v permutations) and MLP hidden units.
  Its output projection ``proj`` also carries the embedding-space rotation
  (``PermutationSpec.embedding``).
- Hugging Face CLIP vision towers (FusionBench's experts): heads and MLP units only. The
  residual stream stays fixed because the visual projection that reads it is a buffer
  outside the state dict (``mergelab.pool.hf.HFCLIPImageEncoder``), so no state-dict
  permutation of the stream could keep the output features unchanged — and for the same
  reason no embedding rotation (``embedding=None``).

Anything else — other encoders, open_clip's custom blocks (qk-norm, scaled heads),
attentional pooling — is a ConfigError naming what was found: a spec that missed a tensor
would change the model's function silently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mergelab.align.spec import (
    Action,
    Concat,
    Embedding,
    HeadGroup,
    Heads,
    PermutationSpec,
    Site,
    Units,
)
from mergelab.errors import ConfigError

SUPPORTED = "open_clip VisionTransformer (standard ResidualAttentionBlocks) or a Hugging Face CLIP vision tower"


def spec_for(encoder: nn.Module) -> PermutationSpec:
    """The permutation spec of ``encoder``; ConfigError for an architecture it cannot handle."""
    for find, build in ((_find_openclip, _openclip_spec), (_find_hf, _hf_spec)):
        found = find(encoder)
        if found is not None:
            prefix, module = found
            spec = build(module, prefix)
            _check_covered(spec, encoder)
            return spec
    raise ConfigError(
        f"align: no permutation spec for {type(encoder).__name__} (found no {SUPPORTED} "
        "inside it); use align=none for this backbone"
    )


def spec_for_factory(factory: Callable[[], nn.Module]) -> PermutationSpec:
    """:func:`spec_for` on a freshly built encoder, on the meta device when the constructor
    allows it (a spec needs shapes and structure, not weights)."""
    try:
        with torch.device("meta"):
            encoder = factory()
    except Exception:  # noqa: BLE001 — some constructors touch real storage; build on CPU
        encoder = factory()
    return spec_for(encoder)


def _check_covered(spec: PermutationSpec, encoder: nn.Module) -> None:
    state = encoder.state_dict()
    for key in state:
        if key not in spec.axes:
            raise ConfigError(
                f"align: {type(encoder).__name__} has tensor {key!r} whose permutation symmetry "
                f"the {spec.arch} spec does not know (supported: {SUPPORTED}); use align=none"
            )
    spec.check_shapes({k: tuple(v.shape) for k, v in state.items()}, f"align ({spec.arch})")


# ------------------------------------------------------------------ open_clip
def _find_openclip(encoder: nn.Module) -> tuple[str, nn.Module] | None:
    from open_clip.transformer import VisionTransformer

    for name, m in encoder.named_modules():
        if isinstance(m, VisionTransformer):
            return (f"{name}." if name else ""), m
    return None


def _openclip_spec(vit: nn.Module, p: str) -> PermutationSpec:
    from open_clip.transformer import ResidualAttentionBlock

    name = type(vit).__name__
    if getattr(vit, "attn_pool", None) is not None:
        raise ConfigError(f"align: {name} with attentional pooling is not supported")
    if getattr(vit, "proj", None) is None:
        # without the projection the output IS the residual stream: permuting it would
        # permute the features the heads read
        raise ConfigError(f"align: {name} without an output projection (proj) is not supported")
    if getattr(vit, "output_tokens", False):
        raise ConfigError(f"align: {name} with output_tokens=True is not supported")

    R = Units("res")
    axes: dict[str, tuple[Action | None, ...]] = {}
    units: dict[str, int] = {"res": int(vit.transformer.width)}
    heads: dict[str, HeadGroup] = {}
    sites: dict[str, dict[str, list[Site]]] = {"res": {"": [Site(f"{p}ln_pre")]}}

    axes[f"{p}conv1.weight"] = (R, None, None, None)
    axes[f"{p}conv1.bias"] = (R,)
    axes[f"{p}class_embedding"] = (R,)
    axes[f"{p}positional_embedding"] = (None, R)
    for ln in ("ln_pre", "ln_post"):
        axes[f"{p}{ln}.weight"] = axes[f"{p}{ln}.bias"] = (R,)
    axes[f"{p}proj"] = (R, None)

    for i, block in enumerate(vit.transformer.resblocks):
        b = f"{p}transformer.resblocks.{i}."
        if not isinstance(block, ResidualAttentionBlock):
            raise ConfigError(
                f"align: block {i} is a {type(block).__name__}; only open_clip's standard "
                "ResidualAttentionBlock is supported (custom blocks add qk-norm / head scales)"
            )
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise ConfigError(f"align: block {i} attention is not a fused nn.MultiheadAttention")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ConfigError(f"align: block {i} attention has bias_k/zero-attn; not supported")
        d, g = int(attn.embed_dim), f"attn.{i}"
        heads[g] = HeadGroup(int(attn.num_heads), d // int(attn.num_heads))
        mlp, m = f"mlp.{i}", block.mlp
        units[mlp] = int(m.c_fc.out_features)
        qkv = Concat((Heads(g, "qk"), Heads(g, "qk"), Heads(g, "v")), (d, d, d))
        for ln in ("ln_1", "ln_2"):
            axes[f"{b}{ln}.weight"] = axes[f"{b}{ln}.bias"] = (R,)
        for ls in ("ls_1", "ls_2"):  # LayerScale, when the config has one
            axes[f"{b}{ls}.gamma"] = (R,)
        axes[f"{b}attn.in_proj_weight"] = (qkv, R)
        axes[f"{b}attn.in_proj_bias"] = (qkv,)
        axes[f"{b}attn.out_proj.weight"] = (R, Heads(g, "v"))
        axes[f"{b}attn.out_proj.bias"] = (R,)
        axes[f"{b}mlp.c_fc.weight"] = (Units(mlp), R)
        axes[f"{b}mlp.c_fc.bias"] = (Units(mlp),)
        axes[f"{b}mlp.c_proj.weight"] = (R, Units(mlp))
        axes[f"{b}mlp.c_proj.bias"] = (R,)

        # nn.MultiheadAttention computes q, k, v inside one functional call (no hookable
        # submodule), so they are read as the attention input (ln_1's output) through the
        # model's own in_proj rows.
        def qkv_site(lo: int, hi: int, b: str = b) -> Site:
            return Site(
                f"{b}ln_1", "out", f"{b}attn.in_proj_weight", f"{b}attn.in_proj_bias", (lo, hi)
            )

        sites[g] = {"qk": [qkv_site(0, d), qkv_site(d, 2 * d)], "v": [qkv_site(2 * d, 3 * d)]}
        sites[mlp] = {"": [Site(f"{b}mlp.c_proj", "in")]}  # hidden units after the activation
        sites["res"][""].append(Site(b[:-1]))  # the residual stream after every block

    state = vit.state_dict()
    axes = {k: v for k, v in axes.items() if k[len(p) :] in state}
    # features = ln_post(x_cls) @ proj: proj's columns write the output embedding, the axis an
    # embedding rotation acts on (mergelab.align.spec, "the output embedding space")
    embedding = Embedding(f"{p}proj", 1, int(state["proj"].shape[1]))
    return PermutationSpec("open_clip VisionTransformer", units, heads, axes, sites, embedding)


# ------------------------------------------------------------------ Hugging Face CLIP
def _find_hf(encoder: nn.Module) -> tuple[str, nn.Module] | None:
    try:
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    except ImportError:
        return None
    for name, m in encoder.named_modules():
        if isinstance(getattr(m, "embeddings", None), CLIPVisionEmbeddings) and hasattr(
            getattr(m, "encoder", None), "layers"
        ):
            return (f"{name}." if name else ""), m
    return None


def _hf_spec(vision: nn.Module, p: str) -> PermutationSpec:
    axes: dict[str, tuple[Action | None, ...]] = {
        f"{p}embeddings.class_embedding": (None,),
        f"{p}embeddings.patch_embedding.weight": (None, None, None, None),
        f"{p}embeddings.position_embedding.weight": (None, None),
    }
    for ln in ("pre_layrnorm", "post_layernorm"):
        axes[f"{p}{ln}.weight"] = axes[f"{p}{ln}.bias"] = (None,)
    units: dict[str, int] = {}
    heads: dict[str, HeadGroup] = {}
    sites: dict[str, dict[str, list[Site]]] = {}
    for i, layer in enumerate(vision.encoder.layers):
        b = f"{p}encoder.layers.{i}."
        attn = layer.self_attn
        if not all(hasattr(attn, f"{x}_proj") for x in ("q", "k", "v", "out")):
            raise ConfigError(f"align: HF layer {i} attention has no q/k/v/out projections")
        g, mlp = f"attn.{i}", f"mlp.{i}"
        heads[g] = HeadGroup(int(attn.num_heads), int(attn.head_dim))
        units[mlp] = int(layer.mlp.fc1.out_features)
        for x, w in (("q", "qk"), ("k", "qk"), ("v", "v")):
            axes[f"{b}self_attn.{x}_proj.weight"] = (Heads(g, w), None)
            axes[f"{b}self_attn.{x}_proj.bias"] = (Heads(g, w),)
        axes[f"{b}self_attn.out_proj.weight"] = (None, Heads(g, "v"))
        axes[f"{b}self_attn.out_proj.bias"] = (None,)
        for ln in ("layer_norm1", "layer_norm2"):
            axes[f"{b}{ln}.weight"] = axes[f"{b}{ln}.bias"] = (None,)
        axes[f"{b}mlp.fc1.weight"] = (Units(mlp), None)
        axes[f"{b}mlp.fc1.bias"] = (Units(mlp),)
        axes[f"{b}mlp.fc2.weight"] = (None, Units(mlp))
        axes[f"{b}mlp.fc2.bias"] = (None,)
        sites[g] = {
            "qk": [Site(f"{b}self_attn.q_proj"), Site(f"{b}self_attn.k_proj")],
            "v": [Site(f"{b}self_attn.v_proj")],
        }
        sites[mlp] = {"": [Site(f"{b}mlp.fc2", "in")]}
    return PermutationSpec("Hugging Face CLIP vision", units, heads, axes, sites)
