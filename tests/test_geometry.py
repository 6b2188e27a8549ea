"""Task-vector geometry: known answers on hand-built task vectors, streaming over lazy experts,
the heatmap, the per-pool cache, and its place in a run's outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose

from mergelab.analysis import geometry as geometry_module
from mergelab.analysis.geometry import (
    cached_geometry,
    plot_cosine,
    task_vector_geometry,
    write_geometry,
)
from mergelab.errors import CheckpointError
from mergelab.pool.state import LazyStateDict, save_state_dict
from mergelab.zoo.synthetic import synthetic_pool


def hand_pool():
    """θ0 = [0, 6 | 8, 0] (‖θ0‖ = 10) over two tensors plus an integer buffer.
    τa = 3·e0, τb = 4·e3 (orthogonal to τa), τc = τa (identical), τd = −2·τa (opposite)."""
    p = {"w": torch.tensor([0.0, 6.0]), "v": torch.tensor([8.0, 0.0]), "n": torch.tensor(3)}

    def expert(tau):
        return {"w": p["w"] + tau[:2], "v": p["v"] + tau[2:], "n": torch.tensor(3)}

    e0, e3 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0, 1.0])
    return p, {"a": expert(3 * e0), "b": expert(4 * e3), "c": expert(3 * e0), "d": expert(-6 * e0)}


def test_known_answer():
    p, e = hand_pool()
    g = task_vector_geometry(p, e)
    assert g["tasks"] == ["a", "b", "c", "d"] and g["n_params"] == 4
    assert g["pretrained_norm"] == pytest.approx(10.0)
    assert g["norms"] == pytest.approx({"a": 3.0, "b": 4.0, "c": 3.0, "d": 6.0})
    assert g["ratios"] == pytest.approx({"a": 0.3, "b": 0.4, "c": 0.3, "d": 0.6})
    cos = torch.tensor(g["cosine"], dtype=torch.float64)
    want = torch.tensor(
        [
            [1.0, 0.0, 1.0, -1.0],
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 1.0, -1.0],
            [-1.0, 0.0, -1.0, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(cos, want)
    assert g["median_ratio"] == pytest.approx(0.35)
    # pairs: ab 0, ac 1, ad −1, bc 0, bd 0, cd −1 → mean −1/6
    assert g["mean_cosine"] == pytest.approx(-1 / 6)


def test_zero_task_vector_and_single_task():
    p, e = hand_pool()
    e["z"] = {k: v.clone() for k, v in p.items()}  # τ = 0: cosine 0 with everything, not NaN
    g = task_vector_geometry(p, e)
    assert g["norms"]["z"] == 0.0 and all(not math.isnan(c) for row in g["cosine"] for c in row)
    one = task_vector_geometry(p, {"a": e["a"]})
    assert one["mean_cosine"] is None and one["cosine"] == [[1.0]]


def test_streams_over_lazy_experts(tmp_path):
    pool = synthetic_pool(n_tasks=3)
    lazy = {}
    for t, sd in pool.experts.items():
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
        lazy[t] = LazyStateDict(tmp_path / f"{t}.safetensors")
    a, b = (
        task_vector_geometry(pool.pretrained, pool.experts),
        task_vector_geometry(pool.pretrained, lazy),
    )
    assert a == b
    # an independent computation on the flattened vectors
    keys = [k for k in pool.pretrained if pool.pretrained[k].is_floating_point()]
    flat = torch.stack(
        [
            torch.cat([(pool.experts[t][k] - pool.pretrained[k]).reshape(-1) for k in keys])
            for t in lazy
        ]
    ).double()
    cos = torch.nn.functional.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=-1)
    torch.testing.assert_close(
        torch.tensor(a["cosine"], dtype=torch.float64), cos, atol=1e-6, rtol=0
    )


def test_shape_mismatch_is_named():
    p, e = hand_pool()
    e["b"]["v"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"expert 'b'.*'v'.*shape"):
        task_vector_geometry(p, e)


def test_heatmap_and_json(tmp_path):
    p, e = hand_pool()
    g = task_vector_geometry(p, e)
    write_geometry(g, tmp_path, "hand-built")
    assert json.loads((tmp_path / "task_vectors.json").read_text())["cosine"] == g["cosine"]
    png = (tmp_path / "task_vectors.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    texts = []
    import matplotlib.pyplot as plt

    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        texts.extend(t.get_text() for t in fig.axes[0].texts)
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        plot_cosine(g, tmp_path / "again.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert len(texts) == 16 and texts.count("-1.00") == 4 and texts.count("1.00") == 6


def test_cached_once_per_pool(tmp_path, monkeypatch):
    pool = synthetic_pool(n_tasks=2)
    first = cached_geometry(pool, tmp_path)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(geometry_module, "task_vector_geometry", boom)
    assert cached_geometry(synthetic_pool(n_tasks=2), tmp_path) == first
    with pytest.raises(AssertionError, match="recomputed"):  # other experts: computed again
        cached_geometry(synthetic_pool(n_tasks=2, seed=1), tmp_path)


class ImageLogger:
    """A logger stand-in that records the images and metrics it is given."""

    last = None

    def __init__(self):
        self.images, self.metrics = {}, {}
        ImageLogger.last = self

    def log_hyperparams(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_image(self, key, images):
        self.images[key] = images

    def save(self):
        pass

    def finalize(self, status):
        pass


def test_the_heatmap_and_summary_go_to_the_loggers(tiny_cache, tmp_path):
    from mergelab.pipeline import run

    cfg = compose(
        ["analysis.bias=false", "+logger.img._target_=test_geometry.ImageLogger"], tiny_cache
    )
    res = run(cfg, tmp_path)
    lg = ImageLogger.last
    assert lg.images["task_vectors"] == [str(tmp_path / "task_vectors.png")]
    assert lg.metrics["task_vectors/mean_cosine"] == res["task_vectors"]["mean_cosine"]
