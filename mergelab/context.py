"""What every pipeline stage gets besides the pool: where to write, how to build a
Lightning Trainer, the loggers, the seed and the top-level ``rank``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    out_dir: Path
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "cpu", "devices": 1})
    loggers: list = field(default_factory=list)
    seed: int = 0
    rank: int = 16
    eval_batch_size: int = 256
    num_workers: int = 0

    @property
    def device(self):
        """Where one-off passes (feature caching, statistics, bias) run: this process's GPU
        when the trainer config asks for one and one is visible (LOCAL_RANK under DDP),
        else the CPU."""
        import torch

        acc = str(self.trainer.get("accelerator", "cpu")).lower()
        if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def make_trainer(self, **overrides: Any):
        """A Lightning Trainer from the ``trainer`` config group, quiet by default.

        Stages pass their own ``max_steps`` etc. as overrides; the config's accelerator,
        devices, precision, strategy and num_nodes always apply.
        """
        import lightning as L

        kw = {
            "logger": self.loggers or False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "default_root_dir": str(self.out_dir),
        }
        kw.update(self.trainer)
        kw.update(overrides)
        return L.Trainer(**kw)
