"""Block discovery: find the residual blocks of any supported image encoder, and read their
count and width from the model (never hard-coded).

Supported: open_clip ``VisionTransformer`` (``transformer.resblocks``), Hugging Face CLIP
vision models (``encoder.layers`` / ``vision_model.encoder.layers``), and anything exposing
the same attributes (the embedded benchmark is an open_clip ViT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor, nn

from mergelab.errors import ConfigError

T = TypeVar("T")

# (attribute path to the block list, attribute path to the module holding width info)
_CANDIDATES = (
    "transformer.resblocks",
    "encoder.layers",
    "vision_model.encoder.layers",
    "model.vision_model.encoder.layers",
)


@dataclass
class Blocks:
    """The discovered residual blocks of an encoder."""

    modules: list[nn.Module]
    names: list[str]  # qualified names inside the encoder, e.g. "transformer.resblocks.3"
    width: int  # channels of the residual stream
    batch_first: bool  # token tensors are (B, L, D) if True, else (L, B, D)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def token_dim(self) -> int:
        """The tensor dim that indexes tokens (for token means)."""
        return 1 if self.batch_first else 0


def _get(obj: nn.Module, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def discover_blocks(encoder: nn.Module) -> Blocks:
    """Return the residual blocks of ``encoder`` with their width read from the weights."""
    for path in _CANDIDATES:
        blocks = _get(encoder, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            parent = _get(encoder, path.rsplit(".", 1)[0])
            batch_first = bool(getattr(parent, "batch_first", True))
            width = _block_width(blocks[0])
            names = [f"{path}.{i}" for i in range(len(blocks))]
            return Blocks(list(blocks), names, width, batch_first)
    raise ConfigError(
        f"cannot find residual blocks in {type(encoder).__name__}: expected one of "
        f"{', '.join(_CANDIDATES)}"
    )


def _block_width(block: nn.Module) -> int:
    """Width of the residual stream = normalized_shape of the block's first LayerNorm."""
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    raise ConfigError(f"cannot read the width of block {type(block).__name__}: no LayerNorm found")


def block_tensor(output) -> Tensor:
    """The residual-stream tensor of a block's output (HF layers return tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_block_tensor(output, new: Tensor):
    """``output`` with its residual-stream tensor replaced by ``new`` (same container type)."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


def block_token_means(blocks: Blocks, forward: Callable[[], T]) -> tuple[list[Tensor], T]:
    """Run ``forward()`` and return the token mean of every block's output, in block order,
    and what ``forward`` returned: the per-block representation that Surgery/SurgeryV2 align
    (Yang et al., ICML 2024 §3; arXiv 2410.14389 Eq. 5) and the bias analysis measures.

    Each capture hook is registered for this call only and moved to the end of its block's
    hook list when the block runs (a pre-hook does it), so it sees the output after every other
    hook, including hooks a surgery model registers inside ``forward``: the corrected output
    that the next block receives. A block ``forward`` never called is a ConfigError.
    """
    means: list[Tensor | None] = [None] * len(blocks)
    handles = []
    for i, module in enumerate(blocks.modules):

        def capture(mod: nn.Module, args, output, i: int = i) -> None:
            means[i] = block_tensor(output).mean(dim=blocks.token_dim)

        h = module.register_forward_hook(capture)
        handles += [h, module.register_forward_pre_hook(_move_to_end(h.id))]
    try:
        out = forward()
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, m in zip(blocks.names, means) if m is None]
    if missing:
        raise ConfigError(f"block(s) {missing} were not called by the model's forward")
    return means, out  # type: ignore[return-value]


def _move_to_end(hook_id: int):
    def pre_hook(module: nn.Module, args) -> None:
        hooks = getattr(module, "_forward_hooks", None)
        if hooks is not None and hook_id in hooks and hasattr(hooks, "move_to_end"):
            hooks.move_to_end(hook_id)

    return pre_hook
