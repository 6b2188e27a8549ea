"""The embedded zoo is built through the run's engine (issue #10): its Trainer is the engine's,
on this process's device alone, in the configured precision.

- an fp32 CPU engine builds exactly the zoo of a plain one-device CPU Trainer (the build
  before the engine: same cache key, same weights bit for bit);
- a bf16-mixed engine trains under bf16 autocast and so builds another zoo, under another
  cache key;
- under ``trainer=ddp`` with an empty cache, rank 0 builds the zoo once and both ranks use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from mergelab.engine import Engine
from mergelab.zoo import data as zdata
from mergelab.zoo.embedded import EmbeddedZoo, config_hash

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY, compose  # noqa: E402

FP32 = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
BF16 = {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}


def _tiny(tmp: Path) -> tuple[dict, list[str]]:
    """The ``model=embedded-tiny`` zoo arguments and the ``tasks=embedded3`` names."""
    cfg = compose([], tmp)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for k in ("_target_", "family"):
        model.pop(k, None)
    return model, list(cfg.tasks.names)


def _record_fits(monkeypatch) -> list[tuple[str, int, str]]:
    """Every ``Engine.fit`` call as (precision, world size, device type)."""
    calls: list[tuple[str, int, str]] = []
    fit = Engine.fit

    def spy(self, *args, **kw):
        calls.append((self.precision, self.world_size, self.device.type))
        return fit(self, *args, **kw)

    monkeypatch.setattr(Engine, "fit", spy)
    return calls


def _plain_fit(module, loader, steps, desc, progress, engine) -> None:
    """The zoo build's fit before the engine: a hand-written one-device CPU fp32 Trainer."""
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    ).fit(module, train_dataloaders=loader)


@pytest.fixture(scope="module")
def fp32_zoo(tmp_path_factory) -> tuple[EmbeddedZoo, list[str]]:
    """The tiny zoo built through an fp32 CPU engine (foundation and the 3 experts)."""
    root = tmp_path_factory.mktemp("zoo_engine")
    model, tasks = _tiny(root)
    mp = pytest.MonkeyPatch()
    calls = _record_fits(mp)
    try:
        zoo = EmbeddedZoo(cache_dir=root, engine=Engine(FP32), **model)
        zoo.ensure(tasks)
    finally:
        mp.undo()
    assert calls == [("32-true", 1, "cpu")] * (1 + len(tasks))  # θ0, then each expert
    return zoo, tasks


def test_single_device_engine_keeps_accelerator_and_precision():
    ddp = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "strategy": "ddp"}
    one = Engine({**ddp, "precision": "bf16-mixed"}).single_device()
    assert one.config == {"accelerator": "cpu", "precision": "bf16-mixed", "devices": 1}
    assert one.world_size == 1 and one.precision == "bf16-mixed"
    assert one.device == torch.device("cpu") and not one.distributed
    plain = Engine().single_device()  # the fallback without a run: the CPU in fp32
    assert plain.config == {"accelerator": "cpu", "devices": 1} and plain.precision == "32-true"


def test_fp32_engine_builds_the_pre_engine_zoo_bit_for_bit(fp32_zoo, tmp_path, monkeypatch):
    zoo, tasks = fp32_zoo
    f = zoo.foundations[0]
    # the fp32 key is the key from before the engine (no precision entry) plus the build's
    # thread count: the same cache dirs for the same recipe
    old_key = {
        "vision": zoo.vision,
        "embed_dim": zoo.embed_dim,
        "data": zoo.data_cfg,
        "data_version": zdata.DATA_VERSION,
        "pretrain": zoo.pretrain_cfg,
        "mixture": zoo.mixture,
        "seed": f.seed,
        "build_threads": zoo.build_threads,
    }
    assert f.dir.name == f"foundation-{config_hash(old_key)}"
    # the same zoo built by the old hand-written Trainer, no engine given
    shutil.copytree(zoo.cache.parent / "data", tmp_path / "data")  # skip regenerating images
    monkeypatch.setattr("mergelab.zoo.train.fit", _plain_fit)
    model, _ = _tiny(tmp_path)
    ref = EmbeddedZoo(cache_dir=tmp_path, **model)
    ref.ensure(tasks)
    assert ref.root.name == zoo.root.name
    theirs = sorted(p.relative_to(ref.cache) for p in ref.foundations[0].dir.rglob("*.*"))
    ours = sorted(p.relative_to(zoo.cache) for p in f.dir.rglob("*.*"))
    assert theirs == ours and any(p.suffix == ".safetensors" for p in ours)
    for rel in ours:  # θ0, text tower, zero-shot heads, experts, logit scale, config
        assert (ref.cache / rel).read_bytes() == (zoo.cache / rel).read_bytes(), rel


def test_bf16_engine_builds_another_zoo(fp32_zoo, monkeypatch):
    zoo, tasks = fp32_zoo
    model, _ = _tiny(zoo.cache.parent)
    calls = _record_fits(monkeypatch)
    bf16 = EmbeddedZoo(cache_dir=zoo.cache.parent, engine=Engine(BF16), **model)
    f, f32 = bf16.foundations[0], zoo.foundations[0]
    assert f.key == {**f32.key, "precision": "bf16-mixed"}
    assert f.dir != f32.dir and bf16.root != zoo.root
    bf16.ensure(tasks)
    assert calls == [("bf16-mixed", 1, "cpu")] * (1 + len(tasks))
    # trained under autocast: other weights, from the same recipe (close to the fp32 ones:
    # measured ‖Δ‖/‖θ‖ ≈ 7e-4 for this matrix of θ0 and of every expert)
    for a, b in [(f.theta0(), f32.theta0())] + [(f.expert(t), f32.expert(t)) for t in tasks]:
        k = "transformer.resblocks.0.mlp.c_fc.weight"
        assert not torch.equal(a[k], b[k])
        assert float((a[k] - b[k]).norm() / b[k].norm()) < 1e-2


def test_ddp_run_with_an_empty_cache_builds_the_zoo_once(tmp_path):
    """``trainer=ddp trainer.accelerator=cpu trainer.devices=2`` on an empty cache: rank 0
    builds the zoo (one pretraining, one fine-tuning per task) while rank 1 waits, then both
    ranks load it and evaluate together; nothing of Lightning's start-up chatter appears."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = [
        *TINY,
        f"paths.cache_dir={cache}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "analysis.bias=false",
        "analysis.task_vectors=false",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "MERGELAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mergelab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    assert text.count("pretraining foundation") == 1, text
    assert text.count("fine-tuning expert") == 3 and text.count("built in") == 1, text
    assert text.count("regime of") == 1 and r.stdout.count("individual experts") == 1, text
    assert "GPU available" not in text and "Tip:" not in text, text
    foundations = list((cache / "zoo").glob("foundation-*"))
    assert len(foundations) == 1
    assert len(list(foundations[0].glob("experts-*/expert_*.safetensors"))) == 3
    assert OmegaConf.load(out / "results.json").provenance.world_size == 2
