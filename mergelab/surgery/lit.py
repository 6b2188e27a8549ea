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

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

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
    """Item ``s`` is step ``s`` of the schedule: task → batch dict (load with batch_size=None)."""

    def __init__(self, schedule: Sequence[Step], sources: Mapping[str, TaskSource]):
        self.schedule = list(schedule)
        self.sources = dict(sources)

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, s: int) -> dict[str, dict[str, Tensor]]:
        return {t: self.sources[t](idx) for t, idx in self.schedule[s].items()}


@torch.no_grad()
def extract(
    encoder: nn.Module,
    fn: Callable[[nn.Module, Tensor], dict[str, Tensor]],
    dataset: Dataset,
    indices: Tensor,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """Run ``fn(encoder, images)`` once over ``dataset[indices]`` (no grad, large batches) and
    return its outputs and the labels, concatenated in ``indices`` order, on the CPU."""
    home = next(encoder.parameters()).device
    encoder.to(device)
    parts: dict[str, list[Tensor]] = {}
    try:
        loader = DataLoader(
            Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=num_workers
        )
        for x, y in loader:
            outs = fn(encoder, x.to(device))
            outs["label"] = torch.as_tensor(y, dtype=torch.long)
            for k, v in outs.items():
                parts.setdefault(k, []).append(
                    v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                )
    finally:
        encoder.to(home)
    return {k: torch.cat(v) for k, v in parts.items()}


# -- the LightningModule ------------------------------------------------------------------
LossFn = Callable[[SurgeryModel, str, dict[str, Tensor]], Tensor]


class SurgeryLit(L.LightningModule):
    """Trains only the surgery modules of ``model`` (Adam, Surgery §4.2); the merged backbone
    and the heads are frozen.

    A step's batch is ``task → dict``; ``loss_fn(model, batches)`` returns the step's loss,
    the sum of the task losses. When a task's batch carries no ``"target"`` (the reference loop, ``cache: false``),
    the expert in ``experts[task]`` is re-run on the batch's images to produce it. With
    ``online``, after each optimiser step every sample of the step is predicted with the
    updated modules (adapt, then predict) and scored against its label.
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
        self._correct: dict[str, Tensor] = {}
        self._seen: dict[str, int] = {}

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

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.model, {t: self._with_targets(t, b) for t, b in batch.items()})
        self._history.append(loss.detach())
        if self.loggers:  # Lightning's logging costs ~1 ms a step: skip it when nobody listens
            n = sum(int(b["label"].numel()) for b in batch.values())
            self.log("surgery/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=n)
        return loss

    @torch.no_grad()
    def _logits(self, task: str, batch: dict[str, Tensor]) -> Tensor:
        if "feature" in batch:  # v1 on cached merged features
            return self.model.heads[task](self.model.adapters[task][FINAL_SITE](batch["feature"]))
        return self.model(batch["images"], task)

    def on_train_batch_end(
        self, outputs, batch: dict[str, dict[str, Tensor]], batch_idx: int
    ) -> None:
        # Lightning calls this after the optimiser step: online predictions use adapted modules.
        if not self.online:
            return
        for t, b in batch.items():
            pred = self._logits(t, b).argmax(dim=-1)
            hit = (pred == b["label"]).sum()
            self._correct[t] = self._correct.get(t, 0) + hit
            self._seen[t] = self._seen.get(t, 0) + int(b["label"].numel())

    def loss_history(self) -> list[float]:
        return torch.stack(self._history).float().cpu().tolist() if self._history else []

    def online_results(self) -> tuple[dict[str, float], dict[str, int]]:
        acc = {t: float(self._correct[t]) / self._seen[t] for t in self._seen}
        return acc, dict(self._seen)
