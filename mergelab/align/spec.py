"""Permutation specs: which permutation acts on which axis of which tensor.

Permuting the hidden units of a network (and the weights that read and write them
consistently) never changes the function it computes; Git Re-Basin (Ainsworth et al.,
ICLR 2023, arXiv 2209.04836, §2) aligns two models by choosing such permutations. A spec
lists, for every tensor of a backbone's state dict, the action on each of its axes:

- :class:`Units` — the axis is permuted by one unit permutation (the residual stream, the
  hidden units of one MLP);
- :class:`Heads` — the axis is ``n_heads × head_dim`` channels: whole heads move together,
  and the channels inside each head move by a within-head permutation that q and k share
  (``"qk"``, the attention logits are Σ_j q_j k_j) or that v shares with the output
  projection's input (``"v"``);
- :class:`Concat` — the axis is a concatenation of such parts (open_clip's fused q | k | v);
- ``None`` — the axis is not permuted (image channels, the output projection's columns).

A permutation is stored as an index: ``permuted[..., i, ...] = original[..., idx[i], ...]``
(new unit i is old unit ``idx[i]``). Specs for concrete architectures are in
:mod:`mergelab.align.archs`.

One symmetry is not a permutation: the output embedding space. When the encoder's output is
read by linear heads (CLIP's zero-shot heads are cosine classifiers, ``W f/‖f‖``), rotating
the embedding by any orthogonal Q (``f → f Q``) and every head with it (``W → W Q``) leaves
every logit unchanged, and contrastive pretraining — which only ever sees cosines — fixes no
particular rotation. ``PermutationSpec.embedding`` names the (key, axis) that writes the
embedding (open_clip's ``proj`` columns); ``Perms.embedding`` holds Q (None = no rotation),
applied after the permutations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mergelab.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Units:
    """The axis is permuted by the unit permutation named ``perm``."""

    perm: str


@dataclass(frozen=True)
class Heads:
    """The axis is ``n_heads × head_dim`` channels of head group ``group``; ``within`` names
    the within-head permutation that applies ("qk" for queries and keys, "v" for values and
    the output projection's input)."""

    group: str
    within: str


@dataclass(frozen=True)
class Concat:
    """The axis is the concatenation of ``parts`` of lengths ``sizes`` (q | k | v)."""

    parts: tuple[Heads, ...]
    sizes: tuple[int, ...]


Action = Units | Heads | Concat
WITHIN = ("qk", "v")


@dataclass(frozen=True)
class HeadGroup:
    """One attention layer's heads."""

    n_heads: int
    head_dim: int


@dataclass(frozen=True)
class Site:
    """Where activation matching reads a permuted unit's activations: the input (``io="in"``,
    first positional argument) or output of module ``module``; optionally mapped through rows
    ``rows`` of the model's own linear weight ``weight`` (+ ``bias``), e.g. queries computed
    from the attention input when the attention module exposes no q/k/v submodules; with
    ``normalize`` each vector is scaled to unit norm. ``module=""`` is the model's output."""

    module: str
    io: str = "out"
    weight: str | None = None
    bias: str | None = None
    rows: tuple[int, int] | None = None
    normalize: bool = False  # read unit-norm vectors (what a cosine head sees)


@dataclass(frozen=True)
class Embedding:
    """The tensor axis that writes the encoder's output embedding: axis ``axis`` (of width
    ``dim``) of state-dict tensor ``key``."""

    key: str
    axis: int
    dim: int


@dataclass
class HeadPerm:
    """A head group's permutation: new head h is old head ``order[h]``; inside it, q/k
    channel j is old channel ``qk[h, j]`` and v channel j is old channel ``v[h, j]``."""

    order: Tensor
    qk: Tensor
    v: Tensor

    def within(self, which: str) -> Tensor:
        return self.qk if which == "qk" else self.v


@dataclass
class Perms:
    """One permutation of every unit perm and head group of a spec."""

    units: dict[str, Tensor] = field(default_factory=dict)
    heads: dict[str, HeadPerm] = field(default_factory=dict)
    embedding: Tensor | None = None  # orthogonal d × d Q: embedding f → f Q (None: unrotated)

    def is_identity(self) -> bool:
        def ident(t: Tensor) -> bool:
            return bool((t == torch.arange(t.shape[-1]).expand_as(t)).all())

        Q = self.embedding
        return (
            (Q is None or torch.equal(Q, torch.eye(len(Q), dtype=Q.dtype)))
            and all(ident(p) for p in self.units.values())
            and all(ident(h.order) and ident(h.qk) and ident(h.v) for h in self.heads.values())
        )

    def moved(self) -> dict[str, float]:
        """Fraction of units / heads that left their place, per kind (a diagnostic)."""

        def frac(ts: list[Tensor]) -> float:
            n = sum(t.numel() for t in ts)
            moved = sum(int((t != torch.arange(t.shape[-1]).expand_as(t)).sum()) for t in ts)
            return moved / n if n else 0.0

        out = {"units": frac(list(self.units.values()))}
        if self.heads:
            out["heads"] = frac([h.order for h in self.heads.values()])
            out["within_head"] = frac(
                [h.qk for h in self.heads.values()] + [h.v for h in self.heads.values()]
            )
        if self.embedding is not None:
            # ‖Q − I‖_F / √(2d): 0 for no rotation, 1 for a random one (E‖Q − I‖² = 2d)
            Q = self.embedding.double()
            eye = torch.eye(len(Q), dtype=Q.dtype)
            out["embedding_rotation"] = float((Q - eye).norm() / (2 * len(Q)) ** 0.5)
        return out


@dataclass
class PermutationSpec:
    """The permutation symmetries of one architecture.

    ``units``: unit permutation name → size. ``heads``: head group name → shape.
    ``axes``: every state-dict key → one action (or None) per axis.
    ``sites``: coordinate (unit perm or head group) → part ("" for units, "qk" / "v" for
    heads) → where activation matching reads that part's activations.
    ``embedding``: the tensor axis that writes the output embedding, which
    ``Perms.embedding`` rotates; None when the architecture exposes no such tensor in its
    state dict (then no embedding rotation is possible).
    """

    arch: str
    units: dict[str, int]
    heads: dict[str, HeadGroup]
    axes: dict[str, tuple[Action | None, ...]]
    sites: dict[str, dict[str, list[Site]]] = field(default_factory=dict)
    embedding: Embedding | None = None

    def __post_init__(self) -> None:
        e = self.embedding
        if e is not None:
            if e.key not in self.axes or not 0 <= e.axis < len(self.axes[e.key]):
                raise ConfigError(f"spec {self.arch}: embedding axis {e} is not in the spec")
            if self.axes[e.key][e.axis] is not None:
                # a rotation after a permutation of the same axis would not commute with it
                raise ConfigError(f"spec {self.arch}: embedding axis {e} is also permuted")
        self._touch: dict[str, list[tuple[str, int]]] = {c: [] for c in self.coordinates}
        for key, actions in self.axes.items():
            seen: set[str] = set()
            for ax, a in enumerate(actions):
                if a is None:
                    continue
                for c in _coords(a):
                    if c not in self._touch:
                        raise ConfigError(f"spec {self.arch}: {key!r} uses undeclared {c!r}")
                    if c in seen:
                        # the weight-matching objective is linear in each permutation only
                        # when no tensor carries the same one on two axes
                        raise ConfigError(f"spec {self.arch}: {key!r} has {c!r} on two axes")
                    seen.add(c)
                    self._touch[c].append((key, ax))

    @property
    def coordinates(self) -> list[str]:
        """The blocks of coordinate descent: every unit permutation and every head group."""
        return [*self.units, *self.heads]

    def touching(self, coord: str) -> list[tuple[str, int]]:
        """(key, axis) of every tensor axis that ``coord`` permutes."""
        return self._touch[coord]

    def neighbours(self, coord: str) -> set[str]:
        """The other coordinates on any axis of the tensors ``coord`` permutes: the ones its
        weight-matching score matrix depends on."""
        out: set[str] = set()
        for key, _ in self._touch[coord]:
            for a in self.axes[key]:
                if a is not None:
                    out.update(_coords(a))
        out.discard(coord)
        return out

    def size(self, action: Action) -> int:
        if isinstance(action, Units):
            return self.units[action.perm]
        if isinstance(action, Heads):
            g = self.heads[action.group]
            return g.n_heads * g.head_dim
        return sum(action.sizes)

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
        """Raise CheckpointError unless ``shapes`` has exactly this spec's keys and sizes."""
        missing = [k for k in self.axes if k not in shapes]
        extra = [k for k in shapes if k not in self.axes]
        if missing or extra:
            k = (missing or extra)[0]
            raise CheckpointError(
                f"{what}: {'missing' if missing else 'unexpected'} key {k!r} for the "
                f"{self.arch} permutation spec"
            )
        for key, actions in self.axes.items():
            shape = tuple(shapes[key])
            if len(shape) != len(actions):
                raise CheckpointError(
                    f"{what}: {key!r} has shape {shape}, spec expects rank {len(actions)}"
                )
            for ax, a in enumerate(actions):
                if a is not None and shape[ax] != self.size(a):
                    raise CheckpointError(
                        f"{what}: {key!r} axis {ax} has {shape[ax]} channels, the spec "
                        f"expects {self.size(a)}"
                    )
        e = self.embedding
        if e is not None and tuple(shapes[e.key])[e.axis] != e.dim:
            raise CheckpointError(
                f"{what}: {e.key!r} axis {e.axis} has {tuple(shapes[e.key])[e.axis]} embedding "
                f"channels, the spec expects {e.dim}"
            )

    def identity(self) -> Perms:
        return Perms(
            {p: torch.arange(n) for p, n in self.units.items()},
            {
                g: HeadPerm(
                    torch.arange(h.n_heads),
                    torch.arange(h.head_dim).repeat(h.n_heads, 1),
                    torch.arange(h.head_dim).repeat(h.n_heads, 1),
                )
                for g, h in self.heads.items()
            },
        )

    def random(
        self, generator: torch.Generator, within_head: bool = True, rotate: bool = False
    ) -> Perms:
        """Uniformly random permutations (for tests and benchmarks); with ``rotate``, also a
        random orthogonal embedding rotation (QR of a Gaussian matrix, signs fixed so it is
        Haar-distributed; needs the spec's ``embedding``)."""

        def rp(n: int) -> Tensor:
            return torch.randperm(n, generator=generator)

        def within(h: HeadGroup) -> Tensor:
            if not within_head:
                return torch.arange(h.head_dim).repeat(h.n_heads, 1)
            return torch.stack([rp(h.head_dim) for _ in range(h.n_heads)])

        perms = Perms(
            {p: rp(n) for p, n in self.units.items()},
            {g: HeadPerm(rp(h.n_heads), within(h), within(h)) for g, h in self.heads.items()},
        )
        if rotate:
            if self.embedding is None:
                raise ConfigError(f"spec {self.arch} has no embedding axis to rotate")
            d = self.embedding.dim
            q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
            perms.embedding = q * torch.sign(torch.diagonal(r))[None, :]
        return perms

    # -------------------------------------------------------------- applying
    def index(self, action: Action, perms: Perms, skip: str | None = None) -> Tensor | None:
        """The index that ``perms`` puts on an axis with ``action`` (None = unchanged).
        Parts belonging to coordinate ``skip`` are left unpermuted."""
        if isinstance(action, Units):
            return None if action.perm == skip else perms.units[action.perm]
        if isinstance(action, Heads):
            if action.group == skip:
                return None
            hp, hd = perms.heads[action.group], self.heads[action.group].head_dim
            return (hp.order[:, None] * hd + hp.within(action.within)).reshape(-1)
        out, off, moved = [], 0, False
        for part, size in zip(action.parts, action.sizes):
            idx = self.index(part, perms, skip)
            moved |= idx is not None
            out.append((torch.arange(size) if idx is None else idx) + off)
            off += size
        return torch.cat(out) if moved else None

    def permute(self, key: str, tensor: Tensor, perms: Perms, skip: str | None = None) -> Tensor:
        """``tensor`` (the value of ``key``) with every axis permuted by ``perms`` (and the
        embedding axis rotated by ``perms.embedding``, unless ``skip == "embedding"``)."""
        for ax, action in enumerate(self.axes[key]):
            if action is None:
                continue
            idx = self.index(action, perms, skip)
            if idx is not None:
                tensor = tensor.index_select(ax, idx.to(tensor.device))
        Q, e = perms.embedding, self.embedding
        if Q is not None and skip != "embedding" and e is not None and key == e.key:
            ax = e.axis
            # in float64, then back: a rotation there and back again returns the tensor to
            # rounding of its own dtype
            t = tensor.movedim(ax, -1).double() @ Q.to(tensor.device, torch.float64)
            tensor = t.to(tensor.dtype).movedim(-1, ax).contiguous()
        return tensor

    def apply(self, state: Mapping[str, Tensor], perms: Perms) -> dict[str, Tensor]:
        """A new state dict: ``state`` permuted by ``perms`` (the input is not modified)."""
        return {k: self.permute(k, state[k], perms) for k in state}


def _coords(action: Action) -> list[str]:
    if isinstance(action, Units):
        return [action.perm]
    if isinstance(action, Heads):
        return [action.group]
    return sorted({p.group for p in action.parts})


def head_parts(action: Action) -> Iterator[tuple[Heads, int, int | None]]:
    """(part, start, stop) of every head part of an axis action (stop None = to the end)."""
    if isinstance(action, Heads):
        yield action, 0, None
    elif isinstance(action, Concat):
        off = 0
        for part, size in zip(action.parts, action.sizes):
            yield part, off, off + size
            off += size


class PermutedStateDict(Mapping[str, Tensor]):
    """A read-only view of ``source`` permuted by ``perms``, permuted tensor by tensor on
    access — lazy sources (safetensors experts) stay lazy, so merges still stream."""

    def __init__(self, source: Mapping[str, Tensor], spec: PermutationSpec, perms: Perms):
        self.source, self.spec, self.perms = source, spec, perms

    def __getitem__(self, key: str) -> Tensor:
        return self.spec.permute(key, self.source[key], self.perms)

    def shape(self, key: str) -> tuple[int, ...]:
        """Permutations keep shapes (lets strict loading check a lazy source cheaply)."""
        src = self.source
        return tuple(src.shape(key)) if hasattr(src, "shape") else tuple(src[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """Permutations keep dtypes."""
        src = self.source
        return src.dtype(key) if callable(getattr(src, "dtype", None)) else src[key].dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"PermutedStateDict({self.source!r}, {self.spec.arch})"
