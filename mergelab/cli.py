"""Command line: ``python -m mergelab [overrides]`` / ``mergelab [overrides]`` (Hydra)."""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from mergelab.errors import MergelabError

log = logging.getLogger("mergelab")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _app(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from mergelab.pipeline import run

    quiet_lightning()
    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except MergelabError as e:
        # One clear line, a non-zero exit, no traceback: this is the user's input, not a bug.
        print(f"mergelab: error: {e}", file=sys.stderr)
        sys.exit(2)
    return float(results["avg"])  # the metric a Hydra sweeper optimises


def quiet_lightning() -> None:
    """Lightning announces accelerators and tips at INFO for every Trainer; a run builds
    several Trainers, so keep the terminal for mergelab's own output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
