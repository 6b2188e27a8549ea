"""Command line: ``python -m mergelab [overrides]`` / ``mergelab [overrides]`` (Hydra)."""

from __future__ import annotations

import gc
import logging
import sys
import traceback
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
    except Exception as e:
        # A --multirun keeps every failed job's exception until the sweep ends; its
        # traceback's frames would keep that job's pool and models alive until then.
        release_frames(e)
        raise
    finally:
        release_job_memory()
    return float(results["avg"])  # the metric a Hydra sweeper optimises


def release_job_memory() -> None:
    """Free what a finished job left in reference cycles, before the next job of a
    --multirun starts.

    Every Lightning pass leaves its Trainer and LightningModule referring to each other
    (trainer → strategy → module → trainer), and the module holds the job's models (the
    merged encoder, the experts, surgery modules). Only the cyclic collector frees them, and
    its full collections are rare in a process holding torch's and Lightning's ~10⁶
    long-lived objects: without this, each job's models stayed alive for many jobs after it.
    """
    gc.collect()


def release_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in ``exc``'s tracebacks (and its
    causes'); the traceback still prints (files, lines, code)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips frames still executing
        todo += [e.__cause__, e.__context__]


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
