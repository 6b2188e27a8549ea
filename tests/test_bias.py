"""Representation-bias measurement (Surgery §3 / SurgeryV2 §3) and its plots."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mergelab.analysis.bias import measure_bias, plot_bias, plot_projection
from mergelab.context import RunContext
from mergelab.errors import ConfigError
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.blocks import block_token_means, discover_blocks
from mergelab.surgery.stats import StatsSurgery
from mergelab.zoo.synthetic import synthetic_pool

LAYERS = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return synthetic_pool(
        n_tasks=3, width=32, layers=LAYERS, heads=2, image_size=16, patch_size=4,
        n_images=24, expert_noise=0.2, seed=0,
    )  # fmt: skip


def _averaged(pool: ModelPool) -> MultiTaskModel:
    avg = {
        k: torch.stack([pool.experts[t][k] for t in pool.tasks]).mean(0) for k in pool.pretrained
    }
    return MultiTaskModel(pool.encoder(avg), pool.heads)


def _ctx(tmp_path) -> RunContext:
    return RunContext(out_dir=tmp_path, eval_batch_size=10)  # uneven batches over 24 images


def test_zero_when_the_model_is_the_expert(pool, tmp_path):
    task = pool.tasks[1]
    model = MultiTaskModel(pool.expert_encoder(task), {task: pool.heads[task]})
    bias = measure_bias(model, pool, _ctx(tmp_path), max_images=24)
    names = discover_blocks(model.encoder).names
    assert bias["blocks"] == [*names, "final"]
    assert list(bias["per_task"]) == [task]
    assert bias["per_task"][task] == pytest.approx([0.0] * (LAYERS + 1), abs=1e-6)
    assert json.loads(json.dumps(bias)) == bias  # JSON-serialisable as is


def test_positive_for_weight_averaging(pool, tmp_path):
    bias = measure_bias(_averaged(pool), pool, _ctx(tmp_path), max_images=24)
    assert list(bias["per_task"]) == pool.tasks
    for task, row in bias["per_task"].items():
        assert len(row) == LAYERS + 1
        assert all(v > 0.1 for v in row), (task, row)


def test_stats_surgery_reduces_bias_at_every_block(pool, tmp_path):
    # measure_bias sees the model as routed for each task, i.e. after the surgery hooks
    merged = _averaged(pool)
    before = measure_bias(merged, pool, _ctx(tmp_path), max_images=24)
    # block outputs only: the sites whose statistics the block bias below is measured at
    repaired = StatsSurgery(
        sites=["block"], num_samples=None, batch_size=24, save_stats=False
    ).apply(merged, pool, _ctx(tmp_path))
    after = measure_bias(repaired, pool, _ctx(tmp_path), max_images=24)
    for task in pool.tasks:
        for b, a in zip(before["per_task"][task][:-1], after["per_task"][task][:-1]):
            assert a < 0.8 * b, (task, before["per_task"][task], after["per_task"][task])
    # measuring did not change the models
    assert measure_bias(merged, pool, _ctx(tmp_path), max_images=24) == before


class _Shifted(MultiTaskModel):
    """The expert plus a constant shift at one block's output: the known bias at that block is
    exactly |shift| (0 before it)."""

    def __init__(self, encoder: nn.Module, heads, block: int, shift: float, per_call: bool):
        super().__init__(encoder, heads)
        self.block = discover_blocks(encoder).modules[block]
        self.shift = shift
        self.per_call = per_call
        self.active = False
        if not per_call:  # persistent hook registered at construction (the mergelab way)
            self.block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        return output + self.shift if self.active else None

    def features(self, x, task):
        # per_call: a surgery that registers its hook inside features, right before the
        # forward, i.e. AFTER measure_bias registered its own; bias must still see the shift
        handle = self.block.register_forward_hook(self._hook) if self.per_call else None
        self.active = True
        try:
            return self.encoder(x)
        finally:
            self.active = False
            if handle is not None:
                handle.remove()


@pytest.mark.parametrize("per_call", [False, True], ids=["persistent-hook", "per-call-hook"])
def test_sees_the_output_after_surgery_hooks(pool, tmp_path, per_call):
    task = pool.tasks[0]
    model = _Shifted(
        pool.expert_encoder(task), {task: pool.heads[task]}, block=1, shift=0.5, per_call=per_call
    )
    row = measure_bias(model, pool, _ctx(tmp_path), max_images=12)["per_task"][task]
    assert row[0] == pytest.approx(0.0, abs=1e-6)  # before the shifted block
    assert row[1] == pytest.approx(0.5, abs=1e-5)  # a constant shift of 0.5 in every channel
    assert row[2] > 0  # the shift propagates


def test_bad_max_images(pool, tmp_path):
    with pytest.raises(ConfigError, match="max_images"):
        measure_bias(_averaged(pool), pool, _ctx(tmp_path), max_images=0)


def _fake(tasks, n, offset=0.0):
    return {"blocks": [f"b.{i}" for i in range(n - 1)] + ["final"],
            "per_task": {t: [offset + i + j for j in range(n)] for i, t in enumerate(tasks)}}  # fmt: skip


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_bias_writes_png(tmp_path):
    before, after = _fake(["a", "b"], 4), _fake(["a", "b"], 4, offset=-0.5)
    assert _is_png(plot_bias(before, after, tmp_path / "plots" / "bias.png"))
    assert _is_png(plot_bias(before, None, tmp_path / "bias_before.png"))
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []  # written atomically
    with pytest.raises(ConfigError, match="differ"):
        plot_bias(before, _fake(["a", "b"], 5), tmp_path / "bad.png")
    with pytest.raises(ConfigError, match="no values for task"):
        plot_bias(before, _fake(["a"], 4), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_projection_writes_png(pool, tmp_path):
    model = _averaged(pool)
    path = plot_projection(model, pool, pool.tasks[:2], tmp_path / "proj.png", max_images=12)
    assert _is_png(path)
    assert _is_png(plot_projection(model, pool, None, tmp_path / "proj_all.png", max_images=12))
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        plot_projection(model, pool, ["nope"], tmp_path / "x.png", max_images=12)


def test_block_token_means_sees_the_output_after_later_hooks(pool):
    """The one token-mean capture (blocks.block_token_means): per block, the mean over tokens
    of what the next block receives, even when a hook registered inside the forward (as a
    surgery model does) rewrites the block's output; a block never called is an error."""
    encoder = pool.expert_encoder(pool.tasks[0]).eval()
    blocks = discover_blocks(encoder)
    x = torch.randn(2, 3, 16, 16)
    plain, _ = block_token_means(blocks, lambda: encoder(x))
    # independent computation: run the blocks by hand from the first block's input
    inputs = []
    h = blocks.modules[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        encoder(x)
    h.remove()
    z = inputs[0]
    with torch.no_grad():
        for i, block in enumerate(blocks.modules):
            z = block(z)
            torch.testing.assert_close(plain[i], z.mean(dim=blocks.token_dim))

    def forward_with_late_hook():
        h = blocks.modules[1].register_forward_hook(lambda m, a, out: out + 1.0)
        try:
            return encoder(x)
        finally:
            h.remove()

    shifted, _ = block_token_means(blocks, forward_with_late_hook)
    torch.testing.assert_close(shifted[1], plain[1] + 1.0)
    with pytest.raises(ConfigError, match="not called"):
        block_token_means(blocks, lambda: None)
