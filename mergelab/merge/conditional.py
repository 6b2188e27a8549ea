"""Task-conditional merges: shared weights plus compact per-task parts.

TALL masks (Wang et al., ICML 2024, arXiv 2405.07813) and EMR-merging (Huang et al., NeurIPS
2024, arXiv 2405.17461) do not produce one model for every task but one per task, cheaply:

    θ_t = θ0 + λ_t · (M_t ⊙ (θ_s − θ0))

from the pretrained weights θ0, one shared model θ_s = θ0 + τ_s (TALL: the multi-task vector
τ_MTL; EMR: the elected unified vector τ_uni), a binary mask M_t and a scalar rescaler λ_t per
task (TALL: λ_t = 1). :class:`TaskConditionalMerge` holds exactly these parts.

**The contract.** A training-free method's ``merge(pretrained, experts)`` (or an adaptive
method's ``fit``) returns either a plain state dict — one model for every task — or a
:class:`TaskConditionalMerge`. Everything downstream accepts both: ``ModelPool.encoder``
builds an encoder that carries the per-task variants (:func:`attach`), and
``MultiTaskModel.encode(x, task)`` — the one entry point that evaluation, every surgery kind
and the bias analysis use — loads task t's weights before running a task-t batch
(:func:`select`). Code that runs several tasks in ONE encoder pass (SurgeryV2's batched step)
must fall back to one pass per task when :func:`is_conditional` holds.

**Storage.** θ0 and θ_s are full models; each mask is bit-packed, 8 entries per byte, most
significant bit first (``numpy.packbits`` layout), one uint8 tensor per parameter tensor, so a
task costs ⌈n/8⌉ bytes per tensor plus one scalar — never a weight copy.
:meth:`TaskConditionalMerge.storage` reports the bytes.

**Switching.** :func:`select` materialises θ_t tensor by tensor (on the encoder's device) and
puts NEW parameter tensors into the encoder's modules; it never writes into the old ones. Two
things follow: an autograd graph built on task s's weights stays valid after task t is loaded
(surgery sums per-task losses before one backward), and hooks registered on the encoder's
modules (surgery sites) keep working, since the modules themselves are untouched. The switch
happens only when the task changes, so evaluation (all batches of a task in a row) pays it
once per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mergelab.errors import CheckpointError, ConfigError

StateDict = dict[str, Tensor]

# Attribute of an encoder that carries its task variants (set by :func:`attach`).
_ATTR = "_mergelab_task_variants"


# -- bit packing ------------------------------------------------------------------------------
def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as bytes, 8 entries per byte, most significant bit first — the layout
    of ``numpy.packbits`` on the flattened mask (zero-padded to a whole byte)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    # each product is 0 or one distinct power of two, so the byte sum never overflows
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat boolean tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def packed_size(numel: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``numel`` entries."""
    return math.ceil(numel / 8)


# -- the result type ------------------------------------------------------------------------
@dataclass
class TaskConditionalMerge:
    """Shared weights + per-task binary masks and rescalers: θ_t = θ0 + λ_t·(M_t ⊙ (θ_s − θ0)).

    Fields:
        pretrained: θ0, every key of the backbone's state dict.
        shared: θ_s = θ0 + τ_s for the float keys the method merged (every other key of a
            task's model is θ0's). Stored as a model rather than as τ_s so that a task whose
            mask is all ones and λ_t = 1 gets θ_s back bit for bit (a single expert merges to
            exactly itself).
        masks: task → key → the packed bits of M_t (:func:`pack_bits`), for every key of
            ``shared``.
        scales: task → λ_t.
        method: the name of the method that produced it (for reports).

    θ_t is computed as ``where(M_t, lerp(θ0, θ_s, λ_t), θ0)`` in the weights' dtype; lerp
    returns θ_s exactly at λ_t = 1 and θ0 at λ_t = 0.
    """

    pretrained: Mapping[str, Tensor]
    shared: Mapping[str, Tensor]
    masks: dict[str, dict[str, Tensor]]
    scales: dict[str, float]
    method: str = "task_conditional"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.masks:
            raise ConfigError(f"{self.method}: a task-conditional merge needs at least one task")
        if set(self.masks) != set(self.scales):
            raise ConfigError(
                f"{self.method}: masks are given for tasks {sorted(self.masks)} but rescalers "
                f"for {sorted(self.scales)}"
            )
        self.scales = {t: float(v) for t, v in self.scales.items()}
        for key, v in self.shared.items():
            if key not in self.pretrained:
                raise CheckpointError(f"{self.method}: shared key {key!r} is not in θ0")
            base = self.pretrained[key]
            if v.shape != base.shape or not base.is_floating_point():
                raise CheckpointError(
                    f"{self.method}: shared key {key!r} has shape {tuple(v.shape)}, θ0 has "
                    f"{tuple(base.shape)} ({base.dtype}); expected a float tensor of θ0's shape"
                )
            for task, masks in self.masks.items():
                m = masks.get(key)
                if m is None or m.dtype != torch.uint8 or m.numel() != packed_size(v.numel()):
                    raise CheckpointError(
                        f"{self.method}: task {task!r} needs a packed mask of "
                        f"{packed_size(v.numel())} uint8 bytes for key {key!r}"
                    )

    @property
    def tasks(self) -> list[str]:
        return list(self.masks)

    def mask(self, task: str, key: str) -> Tensor:
        """M_t of one tensor, unpacked to booleans of the tensor's shape."""
        self._check_task(task)
        shape = self.pretrained[key].shape
        return unpack_bits(self.masks[task][key], math.prod(shape)).view(shape)

    def value(self, task: str, key: str) -> Tensor:
        """θ_t[key], computed on the device the parts live on."""
        self._check_task(task)
        base = self.pretrained[key]
        if key not in self.shared:
            return base.clone()
        theta = torch.lerp(base, self.shared[key].to(base.dtype), self.scales[task])
        return torch.where(self.mask(task, key), theta, base)

    def materialize(self, task: str) -> StateDict:
        """θ_t as a plain state dict (every key of θ0)."""
        return {key: self.value(task, key) for key in self.pretrained}

    def to(self, device: torch.device | str) -> TaskConditionalMerge:
        """A copy whose tensors live on ``device`` (the same object if they already do)."""
        device = torch.device(device)
        first = next(iter(self.pretrained.values()))
        if first.device == device:
            return self
        return TaskConditionalMerge(
            {k: v.to(device) for k, v in self.pretrained.items()},
            {k: v.to(device) for k, v in self.shared.items()},
            {t: {k: m.to(device) for k, m in ms.items()} for t, ms in self.masks.items()},
            dict(self.scales),
            self.method,
            dict(self.meta),
        )

    def storage(self) -> dict:
        """Bytes held: ``shared`` = θ0 + θ_s (what every task needs), ``per_task`` = packed
        masks + one float64 rescaler per task, ``total``; and, for comparison, one plain model
        and the T expert models this replaces."""
        model = sum(v.numel() * v.element_size() for v in self.pretrained.values())
        shared = model + sum(v.numel() * v.element_size() for v in self.shared.values())
        per_task = {t: sum(m.numel() for m in ms.values()) + 8 for t, ms in self.masks.items()}
        n_params = sum(v.numel() for v in self.shared.values())
        return {
            "method": self.method,
            "n_masked_params": n_params,
            "shared_bytes": shared,
            "per_task_bytes": per_task,
            "total_bytes": shared + sum(per_task.values()),
            "one_model_bytes": model,
            "experts_bytes": model * len(self.masks),
        }

    def _check_task(self, task: str) -> None:
        if task not in self.masks:
            raise ConfigError(
                f"task {task!r} has no variant in this {self.method} merge; it has {self.tasks}"
            )


# -- routing: an encoder that carries its task variants ---------------------------------------
class TaskVariants:
    """The per-task weights an encoder carries, and which task's weights it holds now.

    The parts follow the encoder's device lazily: they are moved at the first switch after
    the encoder moved."""

    def __init__(self, merge: TaskConditionalMerge, current: str | None = None):
        self.merge = merge
        self.current = current

    def load(self, encoder: nn.Module, task: str) -> None:
        """Put θ_task into ``encoder`` (new tensors, same dtype, device and requires_grad)."""
        if task == self.current:
            return
        self.merge._check_task(task)
        # Inference tensors (Lightning's test loop) could not be saved for a later backward.
        with torch.inference_mode(False), torch.no_grad():
            device = _device(encoder)
            if device is not None:
                self.merge = self.merge.to(device)
            for key in self.merge.shared:
                owner, name = _owner(encoder, key)
                old = getattr(owner, name)
                new = self.merge.value(task, key).to(device=old.device, dtype=old.dtype)
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                setattr(owner, name, new)
        self.current = task


def attach(encoder: nn.Module, merge: TaskConditionalMerge, task: str | None = None) -> nn.Module:
    """Make ``encoder`` task-conditional: ``task`` (default: the first) is loaded now, and
    :func:`select` switches it later. Returns the encoder."""
    variants = TaskVariants(merge)
    variants.load(encoder, task if task is not None else merge.tasks[0])
    setattr(encoder, _ATTR, variants)
    return encoder


def variants_of(encoder: nn.Module) -> TaskVariants | None:
    return getattr(encoder, _ATTR, None)


def is_conditional(encoder: nn.Module) -> bool:
    """Whether ``encoder``'s weights depend on the task (then one pass runs one task)."""
    return variants_of(encoder) is not None


def select(encoder: nn.Module, task: str) -> None:
    """Load ``task``'s weights into a task-conditional ``encoder``; a no-op for a plain one
    and when the encoder already holds them."""
    variants = variants_of(encoder)
    if variants is not None:
        variants.load(encoder, task)


def _owner(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, name = key.rpartition(".")
    owner = root.get_submodule(prefix) if prefix else root
    if name not in owner._parameters and name not in owner._buffers:
        raise CheckpointError(f"the encoder has no parameter or buffer {key!r}")
    return owner, name


def _device(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    return None
