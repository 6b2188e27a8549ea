"""Training machinery shared by Surgery (v1) and SurgeryV2: the sampling schedule, the
step dataset (cached features or images), feature caching, and the LightningModule.

Representation Surgery (Yang et al., ICML 2024, §4.2) trains the task modules with Adam on the
unlabeled test split of every task; one optimisation step in the authors' code takes one batch
of every task and sums the per-task losses. mergelab fixes the whole sampling schedule up
front from the seed, so a cached run and the reference loop (which re-runs the models every
step) see exactly the same samples, and caching only has to cover the indices actually drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mergelab.engine import loss_scale, rank_rows
from mergelab.errors import ConfigError
from mergelab.surgery.modules import FINAL_SITE, SurgeryModel, expert_targets

SAMPLINGS = ("all_tasks", "round_robin")

# One step of the schedule: task → test-split indices of that task's batch.
Step = dict[str, Tensor]


# -- schedules -------------------------------------------------------------------------------
def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ConfigError(
            f"unknown surgery sampling {sampling!r}; expected one of {list(SAMPLINGS)}"
        )


def _check_sizes(sizes: Mapping[str, int]) -> None:
    if not sizes:
        raise ConfigError("surgery needs at least one task, got none")
    for t, n in sizes.items():
        if int(n) < 1:
            raise ConfigError(
                f"task {t!r} has an empty test split; surgery needs unlabeled test data"
            )


def make_schedule(
    sizes: Mapping[str, int], steps: int, batch_size: int, sampling: str, seed: int
) -> list[Step]:
    """The offline schedule: ``steps`` steps; ``all_tasks`` gives every task a batch at every
    step (the authors' loop), ``round_robin`` gives one task a batch per step, cycling.

    Each task's indices come from successive seeded random permutations of its test split
    (without replacement within a pass, like a shuffled DataLoader; a batch may span passes).
    """
    _check_sampling(sampling)
    _check_sizes(sizes)
    if int(steps) < 1 or int(batch_size) < 1:
        raise ConfigError(
            f"surgery needs steps >= 1 and batch_size >= 1, got steps={steps}, batch_size={batch_size}"
        )
    g = torch.Generator().manual_seed(int(seed))
    tasks = list(sizes)
    pending: dict[str, Tensor] = {t: torch.empty(0, dtype=torch.long) for t in tasks}

    def draw(t: str) -> Tensor:
        while pending[t].numel() < batch_size:
            pending[t] = torch.cat([pending[t], torch.randperm(int(sizes[t]), generator=g)])
        out, pending[t] = pending[t][:batch_size], pending[t][batch_size:]
        return out

    schedule: list[Step] = []
    for s in range(int(steps)):
        chosen = tasks if sampling == "all_tasks" else [tasks[s % len(tasks)]]
        schedule.append({t: draw(t) for t in chosen})
    return schedule


def online_schedule(sizes: Mapping[str, int], sampling: str, seed: int) -> list[Step]:
    """The online schedule (Surgery, online variant): batch size 1 and every test sample of
    every task exactly once, each task's stream in a seeded random order. ``all_tasks``: one
    sample of every unfinished task per step; ``round_robin``: one sample of one task per step,
    cycling over the unfinished tasks."""
    _check_sampling(sampling)
    _check_sizes(sizes)
    g = torch.Generator().manual_seed(int(seed))
    streams = {t: torch.randperm(int(n), generator=g) for t, n in sizes.items()}
    pos = dict.fromkeys(streams, 0)
    schedule: list[Step] = []
    while True:
        live = [t for t in streams if pos[t] < streams[t].numel()]
        if not live:
            return schedule
        if sampling == "all_tasks":
            step = {t: streams[t][pos[t] : pos[t] + 1] for t in live}
            schedule.append(step)
            for t in live:
                pos[t] += 1
        else:
            for t in live:  # one pass over the live tasks = len(live) steps
                schedule.append({t: streams[t][pos[t] : pos[t] + 1]})
                pos[t] += 1


def used_indices(schedule: Sequence[Step], task: str) -> Tensor:
    """The sorted distinct test indices of ``task`` that the schedule draws."""
    idx = [s[task] for s in schedule if task in s]
    return torch.unique(torch.cat(idx)) if idx else torch.empty(0, dtype=torch.long)


# -- data --------------------------------------------------------------------------------------
@dataclass
class TaskSource:
    """Builds one task's batch for given test indices: cached rows (``cached[k][row_of[i]]``)
    and, when ``dataset`` is set, the images and labels read from the test split."""

    dataset: Dataset | None = None
    cached: dict[str, Tensor] = field(default_factory=dict)
    row_of: Tensor | None = None

    def __call__(self, idx: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.cached:
            rows = self.row_of[idx]
            out.update({k: v[rows] for k, v in self.cached.items()})
        if self.dataset is not None:
            items = [self.dataset[int(i)] for i in idx]
            out["images"] = torch.stack([torch.as_tensor(x) for x, _ in items])
            out["label"] = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
        return out


class StepDataset(Dataset):
    """Item ``s`` is this process's share of step ``s`` of the schedule (load with
    ``batch_size=None``): ``{"rows": global rows per task, "tasks": task → batch dict of the
    local rows, "idle": tasks of the step with no local rows}``.

    Under DDP every process walks the whole schedule and takes rows ``rank::world_size`` of
    every task's batch (the global batch is split, not multiplied); one process takes all."""

    def __init__(
        self,
        schedule: Sequence[Step],
        sources: Mapping[str, TaskSource],
        rank: int = 0,
        world_size: int = 1,
    ):
        self.schedule = list(schedule)
        self.sources = dict(sources)
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, s: int) -> dict[str, Any]:
        step = self.schedule[s]
        local = {t: rank_rows(idx, self.rank, self.world_size) for t, idx in step.items()}
        return {
            "rows": max(int(idx.numel()) for idx in step.values()),
            "tasks": {t: self.sources[t](idx) for t, idx in local.items() if idx.numel()},
            "idle": [t for t, idx in local.items() if not idx.numel()],
        }


# -- the LightningModule ------------------------------------------------------------------
LossFn = Callable[[SurgeryModel, str, dict[str, Tensor]], Tensor]


class SurgeryLit(L.LightningModule):
    """Trains only the surgery modules of ``model`` (Adam, Surgery §4.2); the merged backbone
    and the heads are frozen.

    A step's batch is a :class:`StepDataset` item; ``loss_fn(model, batches)`` returns the
    step's loss, the sum of the task losses. When a task's batch carries no ``"target"`` (the
    reference loop, ``cache: false``), the expert in ``experts[task]`` is re-run on the batch's
    images to produce it. With ``online``, after each optimiser step every sample of the step
    is predicted with the updated modules (adapt, then predict) and scored against its label.

    Under DDP each process holds a share of the step's global batch; its loss is scaled so
    that DDP's gradient average is the gradient of the single-device loss, and the loss
    history and online counts are summed over the processes when training ends.
    """

    def __init__(
        self,
        model: SurgeryModel,
        loss_fn: LossFn,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        experts: Mapping[str, nn.Module] | None = None,
        with_blocks: bool = False,
        online: bool = False,
    ):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.experts = nn.ModuleDict(dict(experts or {}))
        self.experts.requires_grad_(False)
        self.with_blocks = bool(with_blocks)
        self.online = bool(online)
        self._history: list[Tensor] = []
        # per task: (correct, seen) of the online predictions, this process's rows
        self._counts = torch.zeros(len(model.tasks), 2, dtype=torch.float64)
        self._slot = {t: i for i, t in enumerate(model.tasks)}
        self.history: list[float] = []
        self.counts: dict[str, tuple[int, int]] = {}

    def train(self, mode: bool = True) -> SurgeryLit:
        super().train(mode)
        self.experts.eval()  # frozen references, never in train mode
        return self

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.model.surgery_parameters(),
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
        )

    def _with_targets(self, task: str, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "target" in batch:
            return batch
        if task not in self.experts:
            raise ConfigError(f"no cached targets and no expert for task {task!r}")
        return {**batch, **expert_targets(self.experts[task], batch["images"], self.with_blocks)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        tasks: dict[str, dict[str, Tensor]] = batch["tasks"]
        local = max((int(b["label"].numel()) for b in tasks.values()), default=0)
        # A task of the step with no rows here still joins the graph (zero gradient), so the
        # loss is defined on every process and DDP sees its modules used.
        loss = sum(
            (p.sum() * 0.0 for t in batch["idle"] for p in self.model.adapters[t].parameters()),
            start=torch.zeros((), device=self.device),
        )
        if tasks:
            step = self.loss_fn(self.model, {t: self._with_targets(t, b) for t, b in tasks.items()})
            loss = loss + step * loss_scale(local, int(batch["rows"]), self.trainer.world_size)
        self._history.append(loss.detach())
        if self.loggers:  # Lightning's logging costs ~1 ms a step: skip it when nobody listens
            self.log("surgery/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=local)
        return loss

    @torch.no_grad()
    def _logits(self, task: str, batch: dict[str, Tensor]) -> Tensor:
        if "feature" in batch:  # v1 on cached merged features
            return self.model.heads[task](self.model.adapters[task][FINAL_SITE](batch["feature"]))
        return self.model(batch["images"], task)

    def on_train_batch_end(self, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        # Lightning calls this after the optimiser step: online predictions use adapted modules.
        if not self.online:
            return
        with self.trainer.precision_plugin.forward_context():
            for t, b in batch["tasks"].items():
                hit = (self._logits(t, b).argmax(dim=-1) == b["label"]).sum()
                self._counts[self._slot[t]] += torch.tensor([float(hit), b["label"].numel()])

    def on_train_end(self) -> None:
        """Sum the per-process loss shares and online counts over the processes."""
        strategy = self.trainer.strategy
        if self._history:
            hist = strategy.reduce(torch.stack(self._history).double(), reduce_op="sum")
            self.history = (hist / self.trainer.world_size).cpu().tolist()
        counts = strategy.reduce(self._counts.to(self.device), reduce_op="sum").cpu()
        self.counts = {t: (int(counts[i, 0]), int(counts[i, 1])) for t, i in self._slot.items()}

    def loss_history(self) -> list[float]:
        """The single-device loss of every step (the sum of the processes' scaled shares)."""
        return [float(x) for x in self.history]

    def online_results(self) -> tuple[dict[str, float], dict[str, int]]:
        """Per task: the online accuracy in % (as evaluation reports it) and samples seen."""
        seen = {t: n for t, (_, n) in self.counts.items() if n}
        acc = {t: 100.0 * self.counts[t][0] / n for t, n in seen.items()}
        return acc, seen
