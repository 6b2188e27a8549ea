"""DARE: Drop And REscale (Yu et al., "Language Models are Super Mario", ICML 2024,
arXiv 2311.03099), applied before task arithmetic or TIES.

Each entry of every task vector τt = θt − θ0 is dropped with probability p and the survivors
are rescaled so that the expectation is unchanged::

    τ̃t = (mt ⊙ τt) / (1 − p),   mt ~ Bernoulli(1 − p) entrywise

then the base merge runs on θ0 + τ̃t: task arithmetic θ = θ0 + λ Σt τ̃t, or TIES (trim, elect,
disjoint merge) on the τ̃t. FusionBench's vision defaults: p = 0.5 on every parameter;
TA λ = 0.3; TIES k = 0.2, sum, λ = 0.5.

Reproducible and streaming: the mask of (task, key) is drawn from its own generator seeded by
hash(seed, task name, key), so it does not depend on the order keys are visited or on the
other tasks, and re-reading a key (TIES reads each expert twice: global thresholds, then the
merge) gives the same drop. The dropped experts are a lazy view; the base method streams over
them exactly as over the experts themselves. p = 0 hands the experts through untouched, so
DARE(p=0) is its base method bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from mergelab import validate
from mergelab.merge.base import MergeMethod, StateDict, check_experts, tensor_meta
from mergelab.merge.masks import check_shapes
from mergelab.merge.task_arithmetic import TaskArithmetic
from mergelab.merge.ties import Ties

BASES = ("task_arithmetic", "ties")


def drop_seed(seed: int, task: str, key: str) -> int:
    """A stable 63-bit seed for one (task, key) mask (Python's hash() is salted per process)."""
    h = hashlib.blake2b(f"{seed}\0{task}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def drop_and_rescale(
    tau: Tensor, p: float, generator: torch.Generator, rescale: bool = True
) -> Tensor:
    """Keep each entry of ``tau`` with probability 1 − p, scale survivors by 1/(1 − p)."""
    keep = torch.rand(tau.shape, generator=generator) >= p
    out = tau * keep
    return out / (1.0 - p) if rescale else out


class DroppedExperts(Mapping[str, Tensor]):
    """Lazy view of one expert as θ0 + DARE(τt): ``view[key]`` reads the expert's tensor, drops
    and rescales its task vector, and returns it in fp32 (float keys; others as stored)."""

    def __init__(
        self,
        base_of: Callable[[str], Tensor],
        expert: Mapping[str, Tensor],
        task: str,
        p: float,
        seed: int,
        rescale: bool,
    ):
        self.base_of, self.expert, self.task = base_of, expert, task
        self.p, self.seed, self.rescale = p, seed, rescale

    def __getitem__(self, key: str) -> Tensor:
        v = self.expert[key]
        if self.p == 0.0 or not v.is_floating_point():
            return v
        b = self.base_of(key)
        if v.shape != b.shape:
            return v  # left for the base method's check to report with the expert's name
        g = torch.Generator().manual_seed(drop_seed(self.seed, self.task, key))
        # Dropped entries come back as exactly θ0, so the base method sees τ̃ = 0 there.
        return b + drop_and_rescale(v.float() - b, self.p, g, self.rescale)

    def __iter__(self) -> Iterator[str]:
        return iter(self.expert)

    def __len__(self) -> int:
        return len(self.expert)

    def shape(self, key: str) -> tuple[int, ...]:
        return tensor_meta(self.expert, key)[0]

    def dtype(self, key: str) -> torch.dtype:
        """float32 for a dropped float key (θ0 + τ̃ is computed in float32), else as stored."""
        dtype = tensor_meta(self.expert, key)[1]
        return dtype if self.p == 0.0 or not dtype.is_floating_point else torch.float32


class Dare(MergeMethod):
    """DARE with drop rate ``p`` over ``base`` = task_arithmetic | ties (λ = ``scaling``);
    the ``ties_*`` settings are :class:`~mergelab.merge.ties.Ties`' own (``ties_mode``:
    reference | mergelab trim counting, ``ties_extra_zeros``: τ = 0 entries counted in d)."""

    name = "dare"

    def __init__(
        self,
        p: float = 0.5,
        base: str = "task_arithmetic",
        scaling: float = 0.3,
        rescale: bool = True,
        ties_k: float = 0.2,
        ties_reduce: str = "sum",
        ties_scope: str = "global",
        ties_mode: str = "reference",
        ties_extra_zeros: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.p = validate.fraction("dare p (drop rate)", p, open_high=True)
        self.base = validate.choice("dare base", base, BASES)
        self.scaling = validate.number("dare scaling", scaling)
        self.rescale = bool(rescale)
        self.ties_k = float(ties_k)
        self.ties_reduce = ties_reduce
        self.ties_scope = ties_scope
        self.ties_mode = ties_mode
        self.ties_extra_zeros = ties_extra_zeros
        self.seed = int(seed)
        # Built now so that bad TIES settings fail at config time, not mid-merge.
        self._method = (
            TaskArithmetic(self.scaling)
            if base == "task_arithmetic"
            else Ties(
                k=ties_k,
                scaling=self.scaling,
                reduce=ties_reduce,
                scope=ties_scope,
                mode=ties_mode,
                extra_zeros=ties_extra_zeros,
            )
        )

    def dropped(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> dict[str, DroppedExperts]:
        """The experts as θ0 + DARE(τt) lazy views (what the base method merges)."""
        check_experts(pretrained, experts)
        last: dict[str, Tensor] = {}

        def base_of(key: str) -> Tensor:
            # Base methods visit one key for every expert in turn: keep θ0[key] (fp32) for the
            # current key only, so a lazy θ0 is read once per key, not once per expert.
            if key not in last:
                last.clear()
                last[key] = pretrained[key].float()
            return last[key]

        return {
            t: DroppedExperts(base_of, sd, t, self.p, self.seed, self.rescale)
            for t, sd in experts.items()
        }

    def merge(
        self, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
    ) -> StateDict:
        dropped = self.dropped(pretrained, experts)
        if self.base == "ties" and self.ties_scope == "global":
            check_shapes(pretrained, experts)
        out = self._method.merge(pretrained, dropped)
        self.merged_keys = list(self._method.merged_keys)
        return out

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if k not in ("merged_keys", "_method")
        )
        return f"{type(self).__name__}({args})"
