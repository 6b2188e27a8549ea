"""Correction sites: which modules of every residual block are corrected, found in the block
(never hard-coded), ordered as one forward pass visits them.

Site kinds, per block (the four that Non-local merging, arXiv 2410.12766, corrects):

- ``attn``        the attention module's output (before the residual add),
- ``ln2``         the output of the second LayerNorm (the MLP's input),
- ``mlp_hidden``  the MLP hidden layer, before the activation,
- ``block``       the block's output (the residual stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from mergelab.errors import ConfigError
from mergelab.surgery.blocks import block_tensor, discover_blocks

# Site kind -> attribute paths tried inside one block, first match wins. "" is the block
# itself. open_clip ResidualAttentionBlock, Hugging Face CLIPEncoderLayer, timm Block.
SITE_PATHS: dict[str, tuple[str, ...]] = {
    "attn": ("attn", "self_attn"),
    "ln2": ("ln_2", "layer_norm2", "norm2"),
    "mlp_hidden": ("mlp.c_fc", "mlp.fc1"),
    "block": ("",),
}

# The paper's sites, in the order a pre-LN transformer block visits them.
PAPER_SITES: tuple[str, ...] = ("attn", "ln2", "mlp_hidden", "block")


@dataclass(frozen=True)
class Site:
    """One corrected location: its kind, the block it lives in, and its module name."""

    kind: str
    block: int
    name: str  # qualified module name inside the encoder, e.g. "transformer.resblocks.2.ln_2"


def check_kinds(kinds: Sequence[str] | str) -> list[str]:
    """``kinds`` as a list, or a ConfigError naming the unknown, repeated or missing kind."""
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(kinds)
    valid = ", ".join(sorted(SITE_PATHS))
    if not kinds:
        raise ConfigError(f"statistics surgery needs at least one site; valid sites: {valid}")
    for k in kinds:
        if k not in SITE_PATHS:
            raise ConfigError(f"unknown statistics surgery site {k!r}; valid sites: {valid}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"statistics surgery sites must not repeat, got {kinds}")
    return kinds


def discover_sites(encoder: nn.Module, kinds: Sequence[str]) -> list[Site]:
    """The sites of ``kinds`` in every block of ``encoder`` (block by block, static order).

    Unknown kinds, or a kind whose submodule a block does not have, are a ConfigError.
    """
    kinds = check_kinds(kinds)
    blocks = discover_blocks(encoder)
    sites: list[Site] = []
    for b, (block, block_name) in enumerate(zip(blocks.modules, blocks.names)):
        for kind in kinds:
            path = _find_path(block, kind)
            sites.append(Site(kind, b, f"{block_name}.{path}" if path else block_name))
    return sites


def _find_path(block: nn.Module, kind: str) -> str:
    for path in SITE_PATHS[kind]:
        if path == "":
            return path
        try:
            block.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise ConfigError(
        f"site {kind!r}: block {type(block).__name__} has none of the submodules "
        f"{', '.join(SITE_PATHS[kind])}"
    )


def trace_sites(
    encoder: nn.Module, sites: Sequence[Site], forward: Callable[[], object]
) -> tuple[list[Site], list[int]]:
    """``sites`` in the order ``forward()`` (one pass of a model over ``encoder``) visits them,
    and each site's channel count (the last dim of its output). "Earlier corrections" in the
    calibration means earlier in this order. A site never visited is a ConfigError."""
    seen: dict[int, tuple[int, int]] = {}  # site index -> (call order, channels)

    def recorder(i: int):
        def hook(module, args, output):
            if i not in seen:
                seen[i] = (len(seen), int(block_tensor(output).shape[-1]))

        return hook

    handles = [
        encoder.get_submodule(s.name).register_forward_hook(recorder(i))
        for i, s in enumerate(sites)
    ]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for i, s in enumerate(sites) if i not in seen]
    if missing:
        raise ConfigError(
            f"statistics surgery: site module(s) never called in a forward pass: {missing}"
        )
    order = sorted(range(len(sites)), key=lambda i: seen[i][0])
    return [sites[i] for i in order], [seen[i][1] for i in order]
