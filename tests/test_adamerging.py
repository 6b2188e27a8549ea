"""AdaMerging / AdaMerging++ on a tiny synthetic open_clip ViT pool.

Expected merged weights are computed here from the raw state dicts, independently of the
implementation (stack the experts, average / subtract θ0 by hand).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mergelab
from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge.adamerging import COEFFICIENTS_JSON, COEFFICIENTS_PNG, AdaMerging
from mergelab.pool.base import MultiTaskModel
from mergelab.zoo.synthetic import synthetic_pool

YAML = Path(mergelab.__file__).parent / "conf" / "merge" / "adamerging.yaml"
ATOL = 1e-6


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool(n_tasks=3, width=32, layers=2, n_images=32, expert_noise=0.05, seed=0)


def batch_of(pool, n: int = 16) -> dict:
    return {t: pool.test_sets[t][:n] for t in pool.tasks}


def float_keys(pool) -> list[str]:
    return [k for k, v in pool.pretrained.items() if v.is_floating_point()]


def set_coefficients(module, values) -> None:
    with torch.no_grad():
        module.coefficients.copy_(torch.as_tensor(values, dtype=torch.float32))


def mean_entropy_of(state, pool) -> float:
    """Σ over tasks of the mean entropy of the head's softmax on the WHOLE test split."""
    model = MultiTaskModel(pool.encoder(state), pool.heads).eval()
    total = 0.0
    with torch.no_grad():
        for task in pool.tasks:
            x = torch.stack([pool.test_sets[task][i][0] for i in range(len(pool.test_sets[task]))])
            p = torch.softmax(model(x, task), dim=-1)
            total += float(-(p * p.log()).sum(-1).mean())
    return total


def ctx_for(tmp_path, **trainer) -> RunContext:
    return RunContext(out_dir=tmp_path, trainer={"accelerator": "cpu", "devices": 1, **trainer})


# --- the merge formula -----------------------------------------------------------------------


def test_task_wise_at_one_over_t_is_weight_averaging(pool):
    module = AdaMerging(granularity="task").build_module(pool)
    T = len(pool.tasks)
    set_coefficients(module, torch.full((T, 1), 1.0 / T))
    merged = module.merged_params()
    for key in float_keys(pool):
        expected = torch.stack([pool.experts[t][key] for t in pool.tasks]).mean(0)
        torch.testing.assert_close(merged[key], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_constant_coefficient_is_task_arithmetic(pool, granularity):
    c = 0.3
    module = AdaMerging(granularity=granularity, init=c).build_module(pool)  # λ = init = 0.3
    merged = module.merged_params()
    for key in float_keys(pool):
        base = pool.pretrained[key]
        expected = base + c * sum(pool.experts[t][key] - base for t in pool.tasks)
        torch.testing.assert_close(merged[key], expected, atol=ATOL, rtol=0)


def test_every_expert_contributes_with_its_own_coefficient(pool):
    # Distinct λ per task catch a dropped or permuted task vector (REFERENCE.md's WA bug).
    lams = [0.1, 0.5, 0.9]
    module = AdaMerging(granularity="task").build_module(pool)
    set_coefficients(module, torch.tensor(lams).unsqueeze(1))
    merged = module.merged_params()
    for key in float_keys(pool):
        base = pool.pretrained[key]
        expected = base + sum(
            lam * (pool.experts[t][key] - base) for lam, t in zip(lams, pool.tasks)
        )
        torch.testing.assert_close(merged[key], expected, atol=ATOL, rtol=0)


def test_clamping_holds_where_coefficients_are_used(pool):
    module = AdaMerging(granularity="task").build_module(pool)
    set_coefficients(module, [[1.7], [-0.4], [0.5]])
    torch.testing.assert_close(module.effective_coefficients()[:, 0], torch.tensor([1.0, 0.0, 0.5]))
    merged = module.merged_params()
    t0, t1, t2 = pool.tasks
    for key in float_keys(pool):
        base = pool.pretrained[key]
        expected = (
            base + 1.0 * (pool.experts[t0][key] - base) + 0.5 * (pool.experts[t2][key] - base)
        )
        torch.testing.assert_close(merged[key], expected, atol=ATOL, rtol=0)
    # A clamped coefficient gets no gradient (it is constant there); the free one does.
    module.entropy_loss(batch_of(pool)).backward()
    grad = module.coefficients.grad[:, 0]
    assert grad[0] == 0 and grad[1] == 0
    assert grad[2] != 0


def test_layer_wise_clamps_each_coefficient(pool):
    module = AdaMerging(granularity="layer").build_module(pool)
    keys = float_keys(pool)
    raw = torch.full((len(pool.tasks), len(keys)), 0.3)
    raw[0, 0], raw[1, 0] = 3.0, -2.0
    set_coefficients(module, raw)
    merged = module.merged_params()
    key = keys[0]
    base = pool.pretrained[key]
    t0, t1, t2 = pool.tasks
    expected = base + 1.0 * (pool.experts[t0][key] - base) + 0.3 * (pool.experts[t2][key] - base)
    torch.testing.assert_close(merged[key], expected, atol=ATOL, rtol=0)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradients_reach_coefficients_and_only_them(pool, granularity):
    module = AdaMerging(granularity=granularity).build_module(pool)
    assert [p for p in module.parameters() if p.requires_grad] == [module.coefficients]
    loss = module.entropy_loss(batch_of(pool))
    loss.backward()
    g = module.coefficients.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    for name, p in module.named_parameters():
        if p is not module.coefficients:
            assert p.grad is None, f"{name} received a gradient"
    for name, b in module.named_buffers():
        assert b.grad is None, name
    tv = module._vectors.flat
    assert not tv.requires_grad and tv.grad is None


def test_layer_wise_has_one_coefficient_per_task_and_float_tensor(pool):
    module = AdaMerging(granularity="layer").build_module(pool)
    assert tuple(module.coefficients.shape) == (len(pool.tasks), len(float_keys(pool)))
    assert module._vectors.keys == float_keys(pool)


# --- training ------------------------------------------------------------------------------


def test_fit_lowers_entropy_and_returns_the_learned_merge(pool, tmp_path):
    method = AdaMerging(granularity="task", steps=30, lr=1e-2, batch_size=16)
    merged = method.fit(pool, ctx_for(tmp_path))
    # the returned dict is the pretrained checkpoint's layout, loadable strictly
    assert list(merged) == list(pool.pretrained)
    assert all(merged[k].dtype == pool.pretrained[k].dtype for k in merged)
    pool.encoder(merged)
    # and it is θ0 + Σ λ*t τt with the coefficients the method reports
    lam = method.coefficients_[:, 0]
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))
    for key in float_keys(pool):
        base = pool.pretrained[key]
        expected = base + sum(c * (pool.experts[t][key] - base) for c, t in zip(lam, pool.tasks))
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0)
    # entropy over the whole unlabeled test data went down from the λ = 0.3 start
    start = {k: v.clone() for k, v in pool.pretrained.items()}
    for key in float_keys(pool):
        start[key] = start[key] + 0.3 * sum(pool.experts[t][key] - start[key] for t in pool.tasks)
    before, after = mean_entropy_of(start, pool), mean_entropy_of(merged, pool)
    assert after < before - 0.05, (before, after)
    assert method.entropy_history_[-1] < method.entropy_history_[0]


def test_layer_wise_coefficients_differ_after_training_and_are_saved(pool, tmp_path):
    method = AdaMerging(granularity="layer", steps=10, lr=1e-2)
    method.fit(pool, ctx_for(tmp_path))
    lam = method.coefficients_
    keys = float_keys(pool)
    assert tuple(lam.shape) == (len(pool.tasks), len(keys))
    assert lam.std() > 1e-3  # no longer all equal to init
    assert ((lam >= 0) & (lam <= 1)).all()

    record = json.loads((tmp_path / COEFFICIENTS_JSON).read_text())
    assert record["granularity"] == "layer" and record["tasks"] == pool.tasks
    assert record["columns"] == keys
    torch.testing.assert_close(torch.tensor(record["coefficients"]), lam)
    assert len(record["entropy_history"]) == 10
    png = (tmp_path / COEFFICIENTS_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_task_wise_json_has_one_column(pool, tmp_path):
    method = AdaMerging(granularity="task", steps=2)
    method.fit(pool, ctx_for(tmp_path))
    record = json.loads((tmp_path / COEFFICIENTS_JSON).read_text())
    assert len(record["coefficients"]) == len(pool.tasks)
    assert all(len(row) == 1 for row in record["coefficients"])
    assert (tmp_path / COEFFICIENTS_PNG).is_file()


def test_bf16_mixed_runs_and_returns_float32_weights(pool, tmp_path):
    method = AdaMerging(granularity="layer", steps=3, save_coefficients=False, plot=False)
    merged = method.fit(pool, ctx_for(tmp_path, precision="bf16-mixed"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in merged.values())
    assert not (tmp_path / COEFFICIENTS_JSON).exists()


def pool_with_int_buffer(pool, expert_value: int = 7):
    """The pool with an integer buffer in the encoder (like a step counter or position ids)."""

    def factory():
        enc = pool.encoder_factory()
        enc.register_buffer("counter", torch.tensor([7, 8, 9]))
        return enc

    counter = torch.tensor([7, 8, 9])
    experts = {t: {**sd, "counter": counter.clone()} for t, sd in pool.experts.items()}
    first = pool.tasks[0]
    experts[first]["counter"] = torch.tensor([expert_value, 8, 9])
    return dataclasses.replace(
        pool,
        encoder_factory=factory,
        pretrained={**pool.pretrained, "counter": counter},
        experts=experts,
    )


def test_integer_buffers_stay_pretrained(pool, tmp_path):
    ipool = pool_with_int_buffer(pool)
    method = AdaMerging(granularity="layer", steps=2, save_coefficients=False, plot=False)
    merged = method.fit(ipool, ctx_for(tmp_path))
    assert merged["counter"].dtype == torch.int64
    assert torch.equal(merged["counter"], torch.tensor([7, 8, 9]))
    assert "counter" not in method.keys_  # no coefficient for a non-float tensor
    # an expert whose integer buffer differs cannot be merged arithmetically: clear error
    with pytest.raises(CheckpointError, match="counter"):
        AdaMerging().build_module(pool_with_int_buffer(pool, expert_value=3))


# --- AdaMerging++ ----------------------------------------------------------------------------


def test_ties_vectors_are_the_ties_processed_task_vectors(pool):
    from mergelab.merge.ties import ties_task_vectors

    k = 0.2
    module = AdaMerging(granularity="task", vectors="ties", ties_k=k).build_module(pool)
    lams = [0.2, 0.6, 1.0]
    set_coefficients(module, torch.tensor(lams).unsqueeze(1))
    merged = module.merged_params()
    vecs = ties_task_vectors(pool.pretrained, pool.experts, k=k, scope="global")
    kept = 0
    total = 0
    for key in float_keys(pool):
        expected = pool.pretrained[key] + sum(c * vecs[t][key] for c, t in zip(lams, pool.tasks))
        torch.testing.assert_close(merged[key], expected, atol=ATOL, rtol=0)
        kept += sum(int((vecs[t][key] != 0).sum()) for t in pool.tasks)
        total += len(pool.tasks) * pool.pretrained[key].numel()
    # trimmed to at most k of each vector, and not plain τ
    assert 0 < kept <= k * total + len(pool.tasks)


def test_ties_adamerging_fits(pool, tmp_path):
    method = AdaMerging(granularity="layer", vectors="ties", steps=3)
    merged = method.fit(pool, ctx_for(tmp_path))
    assert set(merged) == set(pool.pretrained)
    assert json.loads((tmp_path / COEFFICIENTS_JSON).read_text())["vectors"] == "ties"


# --- config ----------------------------------------------------------------------------------


def test_yaml_composes_with_the_paper_hyperparameters(tiny_cache):
    cfg = compose(["merge=adamerging", "merge.granularity=task", "seed=7"], tiny_cache)
    method = instantiate(cfg.merge)
    assert isinstance(method, AdaMerging)
    assert method.granularity == "task" and method.vectors == "task_arithmetic"
    assert method.init == 0.3 and (method.clamp_min, method.clamp_max) == (0.0, 1.0)
    assert method.lr == 1e-3 and method.betas == (0.9, 0.999)
    assert method.steps == 500 and method.batch_size == 16 and method.seed == 7
    # every key of the yaml is an __init__ argument (instantiate would fail otherwise) and
    # every __init__ argument is in the yaml
    import inspect

    params = set(inspect.signature(AdaMerging.__init__).parameters) - {"self"}
    assert params == set(OmegaConf.load(YAML)) - {"_target_"}


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"granularity": "block"}, "granularity"),
        ({"vectors": "dare"}, "vectors"),
        ({"init": 1.5}, "init"),
        ({"clamp_min": 1.0, "clamp_max": 0.0}, "clamp_min"),
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"betas": [0.9]}, "betas"),
        ({"vectors": "ties", "ties_k": 0.0}, "ties_k"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        AdaMerging(**kwargs)
