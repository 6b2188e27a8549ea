"""Shared fixtures: a tiny embedded zoo built once per session, and Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription

TINY = ["model=embedded-tiny", "tasks=embedded3", "logger=none"]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache dir holding the tiny embedded zoo (built on first use by whoever asks)."""
    return tmp_path_factory.mktemp("mergelab_cache")


def compose(overrides: list[str], cache: Path):
    """The real config, composed as the CLI would, with HydraConfig set (as in a run)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_module(config_module="mergelab.conf", version_base="1.3"):
        cfg = hcompose(
            config_name="config",
            overrides=[*TINY, f"paths.cache_dir={cache}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def run_cli(tiny_cache):
    """Run ``python -m mergelab`` in a subprocess on the tiny setup; returns the result."""

    def _run(
        *overrides: str, run_dir: Path | None = None, multirun: bool = False, tiny: bool = True
    ):
        args = [sys.executable, "-m", "mergelab"]
        if multirun:
            args.append("--multirun")
        args += (TINY if tiny else []) + [f"paths.cache_dir={tiny_cache}", *overrides]
        if run_dir is not None:
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            args.append(f"{key}={run_dir}")
        env = {**os.environ, "MERGELAB_CACHE": str(tiny_cache), "HYDRA_FULL_ERROR": "0"}
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)

    return _run


class RecordingLogger:
    """A minimal Lightning-logger stand-in that records what the pipeline did with it."""

    instances: list = []

    def __init__(self):
        self.metrics, self.finalized = {}, None
        RecordingLogger.instances.append(self)

    def log_hyperparams(self, params):
        self.params = params

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def save(self):
        pass

    def finalize(self, status):
        self.finalized = status


@pytest.fixture(scope="module")
def fb(tmp_path_factory):
    """A FusionBench-format miniature (tiny HF CLIP base + experts + tokenizer) for MNIST and
    EuroSAT, with matching image folders: ``(root, reference models)``."""
    pytest.importorskip("transformers")
    import miniatures as M

    root = tmp_path_factory.mktemp("fb")
    tasks = ["MNIST", "EuroSAT"]
    ref = M.make_fusionbench_root(root / "ck", tasks)
    M.make_image_folders(root / "data", tasks)
    return root, ref
