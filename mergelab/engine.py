"""The execution engine: the one place that decides device, precision and process rank.

Every compute pass of a run — the embedded zoo's build, feature and target caching,
statistics, the representation-bias analysis, surgery and AdaMerging training, evaluation —
builds its Lightning Trainer here from the user's ``trainer`` config (accelerator, devices,
num_nodes, strategy, precision) and runs through ``Trainer.predict`` (measuring passes:
:meth:`Engine.run`) or ``Trainer.fit`` (training: :meth:`Engine.fit`). No other module picks a
device or a precision; Lightning resolves them (``devices=[2]`` is ``cuda:2``) and applies the
precision's autocast.

Under DDP every process runs the same pipeline. The rules that make N processes give the
one-process answer:

- A measuring pass gives each process whole batches of the single-process batching
  (:class:`TaskBatches`, :meth:`Engine.shard`: batch k goes to rank k mod N, no padding), so a
  sample is seen exactly once and in the same batch as on one device; per-rank results are
  summed (:meth:`Engine.sum`) or gathered back into their single-process order
  (:meth:`Engine.gather_rows`).
- A training step's global batch is split across the processes (:func:`rank_rows`), not
  multiplied, and the local loss is scaled (:func:`loss_scale`) so that DDP's gradient
  average equals the gradient of the single-device loss.
- Only rank 0 writes files (:attr:`Engine.is_global_zero`); caches that rank 0 writes are read
  by the others after it (:meth:`Engine.rank_zero_first`) or sent to them
  (:meth:`Engine.broadcast`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from mergelab.errors import ConfigError

# Lightning warnings that mergelab's passes trigger on purpose: frozen models stay in eval
# mode, measuring passes return nothing (they accumulate in their module), and tiny
# in-memory datasets need no loader workers.
_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode.*",
    r".*predict returned None.*",
    r".*does not have many workers.*",
    r".*Total length of .* across ranks is zero.*",
)
# Lightning's start-up banners ("GPU available: ...", "TPU available: ...") on every Trainer:
# a run builds several Trainers, so they would repeat; provenance records the same facts.
_BANNER_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

# Launchers that start new processes for every Trainer call (results stay in the children).
_SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# Strategy names whose DDP wrapper must tolerate parameters that get no gradient in a step.
_FIND_UNUSED = {"ddp": "ddp_find_unused_parameters_true"}


class Engine:
    """Builds every Trainer of a run from one ``trainer`` config and answers where and how the
    run computes: :attr:`device`, :attr:`precision`, :attr:`global_rank`, :attr:`world_size`.

    Args:
        trainer: the ``trainer`` config group as a dict (any ``lightning.Trainer`` argument).
        loggers: Lightning loggers for training passes (measuring passes log nothing).
        out_dir: the run dir (Lightning's ``default_root_dir``).
    """

    def __init__(
        self,
        trainer: Mapping[str, Any] | None = None,
        loggers: Sequence[Any] = (),
        out_dir: str | Path = ".",
    ):
        self.config = dict(trainer or {"accelerator": "cpu", "devices": 1})
        strategy = self.config.get("strategy")
        if isinstance(strategy, str) and strategy.startswith(_SPAWNING):
            raise ConfigError(
                f"trainer.strategy={strategy!r} runs each pass in fresh processes, but mergelab "
                "runs the whole pipeline in every process; use trainer.strategy=ddp"
            )
        self.loggers = list(loggers)
        self.out_dir = Path(out_dir)
        for name in _BANNER_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    # -- Trainers ------------------------------------------------------------------------------
    def trainer(self, **overrides: Any) -> L.Trainer:
        """A quiet Lightning Trainer from the config; a pass adds its own ``max_steps`` etc.
        The config's accelerator, devices, num_nodes, strategy and precision always apply."""
        kw: dict[str, Any] = {
            "logger": self.loggers or False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "default_root_dir": str(self.out_dir),
        }
        kw.update(self.config)
        kw.update(overrides)
        return L.Trainer(**kw)

    def single_device(self) -> Engine:
        """The engine for a pass that this process runs alone while the others wait (what
        rank 0 builds and caches inside :meth:`rank_zero_first`, e.g. the embedded zoo): the
        configured accelerator, precision and other settings on this process's device only —
        one device, one node, Lightning's default strategy (no process group), no loggers."""
        config = {
            k: v for k, v in self.config.items() if k not in ("devices", "num_nodes", "strategy")
        }
        index = self.device.index  # None on the CPU
        config["devices"] = 1 if index is None else [index]
        return Engine(config, (), self.out_dir)

    @cached_property
    def _probe(self) -> L.Trainer:
        # Constructing a Trainer resolves accelerator, devices, strategy, precision and this
        # process's rank (from the launcher's environment) without starting anything.
        return self.trainer(logger=False)

    @property
    def device(self) -> torch.device:
        """This process's device as Lightning resolves the config."""
        return self._probe.strategy.root_device

    @property
    def precision(self) -> str:
        """The precision as Lightning resolves it (``"32-true"``, ``"bf16-mixed"``, ...)."""
        return str(self._probe.precision)

    @property
    def global_rank(self) -> int:
        return int(self._probe.global_rank)

    @property
    def world_size(self) -> int:
        return int(self._probe.world_size)

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- processes -----------------------------------------------------------------------------
    def start(self) -> None:
        """Bring up every process of a multi-process config and its process group now (a
        no-op pass), so that what follows runs in lockstep and collectives are always safe.
        One process: nothing to do."""
        if not self.distributed:
            return
        self.run(lambda batch: None, {}, list(range(self.world_size)))
        if not dist.is_initialized():  # pragma: no cover - a strategy without a process group
            raise RuntimeError(f"trainer strategy {self.config.get('strategy')!r} started no group")

    def barrier(self) -> None:
        if self._group_up():
            dist.barrier()

    @contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the others: what rank 0 builds and caches
        on disk (a zoo, a converted checkpoint), the others read instead of rebuilding."""
        if not self.is_global_zero:
            self.barrier()
        yield
        if self.is_global_zero:
            self.barrier()

    def _group_up(self) -> bool:
        return self.distributed and dist.is_available() and dist.is_initialized()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- collectives (identity on one process) -------------------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (a new tensor on ``tensor``'s device)."""
        if not self._group_up():
            return tensor.clone()
        x = tensor.detach().to(self._comm_device()).clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(tensor.device)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (picklable objects)."""
        if not self._group_up():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather_rows(self, parts: Mapping[str, Tensor], rows: Tensor, total: int) -> dict:
        """Reassemble per-process rows: this process holds ``parts[k][i]`` for global row
        ``rows[i]``; every process returns ``{k: tensor with all `total` rows}`` in row order
        (on the CPU). Each row must be held by exactly one process."""
        local = {k: v.detach().cpu() for k, v in parts.items()}
        pieces = [(rows.cpu(), local)]
        if self._group_up():
            pieces = [None] * self.world_size
            dist.all_gather_object(pieces, (rows.cpu(), local))
        seen = torch.zeros(int(total), dtype=torch.long)
        out: dict[str, Tensor] = {}
        for idx, part in pieces:
            seen.index_add_(0, idx, torch.ones_like(idx))
            for k, v in part.items():
                if k not in out:
                    out[k] = v.new_empty((int(total), *v.shape[1:]))
                out[k][idx] = v
        if not bool((seen == 1).all()):
            raise RuntimeError("gather_rows: every row must come from exactly one process")
        return out

    # -- passes --------------------------------------------------------------------------------
    def shard(self, items: Sequence[Any] | Dataset) -> Dataset:
        """This process's share of a sequence of batches: items ``rank, rank + N, ...`` (no
        padding, so nothing is seen twice; ranks may get one item fewer)."""
        n = len(items)  # type: ignore[arg-type]
        return Subset(items, list(range(self.global_rank, n, self.world_size)))

    def run(
        self,
        step: Callable[[Any], None],
        modules: Mapping[str, nn.Module],
        batches: Sequence[Any] | Dataset,
        num_workers: int = 0,
        shard: bool = True,
    ) -> None:
        """A measuring pass: ``Trainer.predict`` calls ``step(batch)`` (no grad, in the
        configured precision, ``modules`` and the batch on this process's device) on this
        process's share of ``batches`` (``shard=False``: ``batches`` is already this
        process's). ``step`` accumulates what it measures itself."""
        data = self.shard(batches) if shard else batches
        loader = DataLoader(data, batch_size=None, num_workers=num_workers)  # type: ignore[arg-type]
        module = _Pass(step, modules)
        trainer = self.trainer(logger=False, use_distributed_sampler=False, inference_mode=False)
        with warnings.catch_warnings():
            for pattern in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.predict(module, dataloaders=loader, return_predictions=False)

    @torch.no_grad()
    def compute(
        self,
        fn: Callable[[nn.Module, Tensor], Mapping[str, Tensor]],
        module: nn.Module,
        dataset: Dataset,
        indices: Tensor,
        batch_size: int,
        num_workers: int = 0,
    ) -> dict[str, Tensor]:
        """``fn(module, images)`` (tensors with one row per image) over ``dataset[indices]``
        as a measuring pass, plus ``"label"`` when the dataset has labels: every row in
        ``indices`` order, on the CPU, on every process. Values keep the dtype the pass
        computed them in (cached features are what inference in this precision sees)."""
        parts: dict[str, list[Tensor]] = {}
        rows: list[Tensor] = []

        def step(batch: dict[str, Any]) -> None:
            outs = dict(fn(module, batch["images"]))
            if "label" in batch:
                outs["label"] = batch["label"]
            for k, v in outs.items():
                parts.setdefault(k, []).append(v.detach().cpu())
            rows.append(batch["rows"].cpu())

        indices = torch.as_tensor(indices, dtype=torch.long)
        batches = TaskBatches({"task": (dataset, indices)}, batch_size)
        self.run(step, {"module": module}, batches, num_workers)
        local = {k: torch.cat(v) for k, v in parts.items()}
        mine = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
        return self.gather_rows(local, mine, int(indices.numel()))

    def fit(
        self,
        module: L.LightningModule,
        loader: DataLoader,
        max_steps: int,
        find_unused_parameters: bool = False,
        **overrides: Any,
    ) -> L.Trainer:
        """A training pass: ``Trainer.fit`` for ``max_steps`` steps on ``loader``, which already
        holds this process's share of every step (see :func:`rank_rows`). With
        ``find_unused_parameters``, a DDP strategy tolerates parameters that get no gradient in
        a step (tasks absent from a step)."""
        kw: dict[str, Any] = {"max_steps": int(max_steps), "use_distributed_sampler": False}
        if find_unused_parameters and self.distributed:
            strategy = self.config.get("strategy", "auto")
            if strategy == "auto":
                strategy = "ddp"
            if isinstance(strategy, str):
                kw["strategy"] = _FIND_UNUSED.get(strategy, strategy)
        kw.update(overrides)
        trainer = self.trainer(**kw)
        with warnings.catch_warnings():
            for pattern in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(module, loader)
        return trainer


def loss_scale(local_rows: int, global_rows: int, world_size: int) -> float:
    """Factor for a loss averaged over this process's ``local_rows`` of a step whose global
    batch has ``global_rows``: DDP averages gradients over the N processes, so
    ``mean_local · local/global · N`` averaged over them is the gradient of the global mean.
    Exactly 1 on one process."""
    return local_rows * world_size / global_rows if global_rows > 0 else 0.0


def rank_rows(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This process's rows of one step's global batch: ``indices[rank::world_size]``."""
    return indices[rank::world_size]


class _Pass(L.LightningModule):
    """Wraps a measuring step for ``Trainer.predict``; ``modules`` ride along so that Lightning
    moves them to the device."""

    def __init__(self, step: Callable[[Any], None], modules: Mapping[str, nn.Module]):
        super().__init__()
        self._step = step
        self.held = nn.ModuleDict(dict(modules))
        # fewer batches than processes leaves some with none: they just measure nothing
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch)


class TaskBatches(Dataset):
    """The single-process batching of per-task samples: for each task in order, its
    ``indices`` in consecutive chunks of ``batch_size``. Item k is batch k as a dict:
    ``task`` (name), ``rows`` (positions within the task's ``indices``), ``index`` (dataset
    indices), ``images`` and, when the dataset has them, ``label``.

    Sharded with :meth:`Engine.shard`, every batch keeps its single-process composition, so a
    sample's output does not depend on the number of processes."""

    def __init__(
        self,
        parts: Mapping[str, tuple[Dataset, Tensor | Sequence[int] | None]],
        batch_size: int,
    ):
        self.datasets = {t: ds for t, (ds, _) in parts.items()}
        self.items: list[tuple[str, Tensor, Tensor]] = []
        for task, (ds, idx) in parts.items():
            idx = torch.arange(len(ds)) if idx is None else torch.as_tensor(idx, dtype=torch.long)
            rows = torch.arange(idx.numel())
            for a in range(0, idx.numel(), int(batch_size)):
                self.items.append((task, rows[a : a + batch_size], idx[a : a + batch_size]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        task, rows, idx = self.items[k]
        samples = [self.datasets[task][int(i)] for i in idx]
        out: dict[str, Any] = {"task": task, "rows": rows, "index": idx}
        first = samples[0]
        if not isinstance(first, (tuple, list)):
            out["images"] = default_collate(samples)
        elif len(first) == 1:  # an images-only dataset (e.g. a 1-tensor TensorDataset)
            out["images"] = default_collate([s[0] for s in samples])
        else:
            images, labels = default_collate([(s[0], s[1]) for s in samples])
            out["images"], out["label"] = images, torch.as_tensor(labels, dtype=torch.long)
        return out
