"""The model pool (θ0, experts θt, frozen heads, per-task data) and the multi-task model
that routes each batch through its task's head (and, after surgery, its task's modules)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils.data import Dataset

from mergelab.merge.conditional import TaskConditionalMerge, attach, is_conditional, select
from mergelab.pool.state import check_finite, load_into


@dataclass
class ModelPool:
    """Everything a merge run needs.

    - ``encoder_factory()`` builds a fresh image encoder (architecture only); images
      ``(B, 3, H, W)`` → features ``(B, d)``. Its ``state_dict()`` keys are the keys merges see.
    - ``pretrained``: θ0 as a (possibly lazy) state dict.
    - ``experts``: task → (possibly lazy) state dict θt; read when indexed.
    - ``heads``: task → frozen head, features → logits.
    - ``test_sets``: task → labelled test split; used unlabeled for adaptation (as in the
      papers) and labelled for evaluation. Items are ``(image, label)``.
    - ``bases`` / ``expert_base`` (non-local pools only): foundation name → that foundation's
      θ0, and task → the name of the foundation its expert was fine-tuned from. Empty when
      every expert shares ``pretrained`` (the local regime). In a non-local pool
      ``pretrained`` is the one reference θ0 that merges use (the average of the bases —
      after alignment when an ``align`` method ran).
    """

    family: str
    backbone: str
    tasks: list[str]
    encoder_factory: Callable[[], nn.Module]
    pretrained: Mapping[str, Tensor]
    experts: Mapping[str, Mapping[str, Tensor]]
    heads: dict[str, nn.Module]
    test_sets: dict[str, Dataset]
    meta: dict = field(default_factory=dict)
    bases: dict[str, Mapping[str, Tensor]] = field(default_factory=dict)
    expert_base: dict[str, str] = field(default_factory=dict)

    @property
    def nonlocal_(self) -> bool:
        """True when experts were fine-tuned from different foundations."""
        return bool(self.bases)

    def base_of(self, task: str) -> Mapping[str, Tensor]:
        """The θ0 that ``task``'s expert was fine-tuned from (``pretrained`` in local pools)."""
        if not self.bases:
            return self.pretrained
        return self.bases[self.expert_base[task]]

    def encoder(
        self,
        state: Mapping[str, Tensor] | TaskConditionalMerge | None = None,
        what: str = "state",
    ) -> nn.Module:
        """A fresh encoder, strictly loaded with ``state`` (keys/shapes/finiteness checked).

        A :class:`~mergelab.merge.conditional.TaskConditionalMerge` gives an encoder that
        carries every task's variant and switches to task t's weights when
        :meth:`MultiTaskModel.encode` runs a task-t batch."""
        enc = self.encoder_factory()
        if isinstance(state, TaskConditionalMerge):
            load_into(enc, state.pretrained, what)
            check_finite(state.shared, what)
            attach(enc, state)
        elif state is not None:
            load_into(enc, state, what)
        return enc.eval()

    def expert_encoder(self, task: str) -> nn.Module:
        return self.encoder(self.experts[task], f"expert {task!r}")

    def pretrained_encoder(self) -> nn.Module:
        return self.encoder(self.pretrained, "pretrained")


class MultiTaskModel(nn.Module):
    """A shared encoder plus one frozen head per task: ``forward(x, task) -> logits``.

    Surgery kinds subclass this and override :meth:`features` to route the batch through the
    task's own modules; evaluation only ever calls ``forward(x, task)``.

    Every encoder pass for a task goes through :meth:`encode` (or follows :meth:`use_task`):
    when the merge was task-conditional (TALL masks, EMR-merging) the encoder then holds that
    task's weights; for a plain merge both are free no-ops.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.heads.requires_grad_(False)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def task_conditional(self) -> bool:
        """Whether the encoder's weights depend on the task (one encoder pass = one task)."""
        return is_conditional(self.encoder)

    def use_task(self, task: str) -> None:
        """Load ``task``'s weights into a task-conditional encoder (kept until another task's
        are loaded); no-op otherwise."""
        select(self.encoder, task)

    def encode(self, x: Tensor, task: str) -> Tensor:
        """The encoder's output for a batch of task ``task``."""
        self.use_task(task)
        return self.encoder(x)

    def features(self, x: Tensor, task: str) -> Tensor:
        return self.encode(x, task)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.features(x, task))
