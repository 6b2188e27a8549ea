"""What every pipeline stage gets besides the pool: where to write, the execution engine
(device, precision, rank and every Trainer, from the ``trainer`` config), the loggers, the
seed and the top-level ``rank``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.engine import Engine


@dataclass
class RunContext:
    out_dir: Path
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "cpu", "devices": 1})
    loggers: list = field(default_factory=list)
    seed: int = 0
    rank: int = 16
    eval_batch_size: int = 256
    num_workers: int = 0
    engine: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.engine = Engine(self.trainer, self.loggers, self.out_dir)

    @property
    def device(self):
        """This process's device, as Lightning resolves the trainer config (the engine's)."""
        return self.engine.device

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes the run's files (rank 0, or the only process)."""
        return self.engine.is_global_zero

    def make_trainer(self, **overrides: Any):
        """A quiet Lightning Trainer from the ``trainer`` config group (see
        :meth:`Engine.trainer`); stages pass their own ``max_steps`` etc. as overrides."""
        return self.engine.trainer(**overrides)
