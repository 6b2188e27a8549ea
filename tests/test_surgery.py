"""Representation Surgery (v1), SurgeryV2 and online mode on tiny synthetic open_clip pools."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.base import Surgery
from mergelab.surgery.blocks import discover_blocks
from mergelab.surgery.io import SURGERY_FILE, read_surgery
from mergelab.surgery.lit import make_schedule, online_schedule
from mergelab.surgery.modules import (
    FINAL_SITE,
    LowRankAdapter,
    SurgeryModel,
    block_site,
    expert_targets,
)
from mergelab.surgery.none import NoSurgery
from mergelab.surgery.v1 import SurgeryV1
from mergelab.surgery.v2 import SurgeryV2
from mergelab.zoo.synthetic import synthetic_pool

CONF = Path(__file__).resolve().parents[1] / "mergelab" / "conf" / "surgery"
KINDS = [SurgeryV1, SurgeryV2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core box: intra-op threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool(n_tasks=3, width=32, layers=2, n_images=24, expert_noise=0.1, seed=0)


def merged_model(pool) -> MultiTaskModel:
    """Weight averaging of the experts: a merged model that differs from every expert."""
    avg = {
        k: torch.stack([pool.experts[t][k] for t in pool.tasks]).mean(0) for k in pool.pretrained
    }
    return MultiTaskModel(pool.encoder(avg), pool.heads)


def ctx_at(path: Path) -> RunContext:
    return RunContext(out_dir=path, eval_batch_size=64)


def images(pool, task: str = "task0", n: int = 5) -> torch.Tensor:
    return pool.test_sets[task].tensors[0][:n]


# -- the module ------------------------------------------------------------------------
def test_adapter_known_answer():
    a = LowRankAdapter(2, 2)
    with torch.no_grad():
        a.down.weight.copy_(torch.eye(2))
        a.up.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # down f = [1, -2] → ReLU → [1, 0] → up → [1, 3]; f' = f − [1, 3] = [0, -5]
    f = torch.tensor([[1.0, -2.0]])
    assert torch.equal(a(f), torch.tensor([[0.0, -5.0]]))
    # A (B, L, D) token tensor is corrected per token.
    tokens = torch.randn(2, 3, 2)
    assert torch.allclose(a(tokens), torch.stack([a(tokens[:, i]) for i in range(3)], dim=1))


def test_adapter_identity_at_init_and_kaiming_bound():
    a = LowRankAdapter(64, 8)
    f = torch.randn(4, 64)
    assert torch.equal(a(f), f)
    assert torch.count_nonzero(a.up.weight) == 0
    assert a.down.bias is None and a.up.bias is None
    # Kaiming-uniform with a=√5 draws from U(-1/√fan_in, 1/√fan_in).
    assert a.down.weight.abs().max() <= 1 / math.sqrt(64) + 1e-7
    assert a.down.weight.std() > 0.3 / math.sqrt(64)


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_surgery_is_the_merged_model(pool, kind):
    plain = merged_model(pool).requires_grad_(False)
    model = kind(rank=4).build(merged_model(pool))
    with torch.no_grad():
        for t in pool.tasks:
            assert torch.equal(model(images(pool, t), t), plain(images(pool, t), t))


# -- training ------------------------------------------------------------------------------
def test_only_surgery_parameters_receive_gradients(pool, tmp_path):
    model = SurgeryV2(rank=4).build(merged_model(pool))
    x = images(pool, "task1", 6)
    batch = {"images": x, **expert_targets(pool.expert_encoder("task1"), x, with_blocks=True)}
    SurgeryV2(rank=4).loss(model, "task1", batch).backward()
    for name, p in [*model.encoder.named_parameters(), *model.heads.named_parameters()]:
        assert p.grad is None and not p.requires_grad, name
    # Only task1's modules get a signal (up is zero at init, so down's gradient is zero).
    for site, a in model.adapters["task1"].items():
        assert a.up.weight.grad is not None and a.up.weight.grad.abs().sum() > 0, site
    for site, a in model.adapters["task0"].items():
        assert a.up.weight.grad is None, site

    # End to end: training changes the modules and nothing else.
    base = merged_model(pool)
    enc0 = copy.deepcopy(base.encoder.state_dict())
    heads0 = copy.deepcopy(base.heads.state_dict())
    trained = SurgeryV2(rank=4, lr=1e-2, steps=3, batch_size=4, save=False).apply(
        base, pool, ctx_at(tmp_path)
    )
    for k, v in trained.encoder.state_dict().items():
        assert torch.equal(v, enc0[k]), k
    for k, v in trained.heads.state_dict().items():
        assert torch.equal(v, heads0[k]), k
    assert trained.adapters["task0"][FINAL_SITE].up.weight.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_goes_down(pool, tmp_path, kind):
    model = kind(rank=4, lr=1e-2, steps=40, batch_size=8, save=False).apply(
        merged_model(pool), pool, ctx_at(tmp_path)
    )
    h = model.loss_history
    assert len(h) == 40
    first, last = sum(h[:5]) / 5, sum(h[-5:]) / 5
    assert last < 0.9 * first, (first, last)


@pytest.mark.parametrize("kind", KINDS)
def test_each_task_is_routed_through_its_own_modules(pool, tmp_path, kind):
    model = kind(rank=4, lr=5e-2, steps=10, batch_size=8, save=False).apply(
        merged_model(pool), pool, ctx_at(tmp_path)
    )
    x = images(pool, "task0")
    with torch.no_grad():
        out0, out1, out2 = (model.features(x, t) for t in ("task0", "task1", "task2"))
        assert not torch.allclose(out0, out1, atol=1e-4)
        a = model.adapters
        a["task0"], a["task1"] = a["task1"], a["task0"]
        assert torch.allclose(model.features(x, "task0"), out1, atol=1e-6)
        assert torch.allclose(model.features(x, "task1"), out0, atol=1e-6)
        assert torch.allclose(model.features(x, "task2"), out2, atol=1e-6)
        # Outside routing, the shared encoder is the plain merged model (hooks inert).
        assert torch.allclose(model.encoder(x), merged_model(pool).encoder(x), atol=1e-6)


@pytest.mark.parametrize("width,layers,embed_dim", [(32, 2, 16), (48, 3, 24)])
def test_v2_has_one_module_per_discovered_block(tmp_path, width, layers, embed_dim):
    p = synthetic_pool(
        n_tasks=2, width=width, layers=layers, heads=2, embed_dim=embed_dim, n_images=8
    )
    model = SurgeryV2(rank=3, steps=2, batch_size=4, save=False).apply(
        merged_model(p), p, ctx_at(tmp_path)
    )
    blocks = discover_blocks(model.encoder)
    assert len(blocks) == layers and blocks.width == width
    for t in p.tasks:
        sites = model.adapters[t]
        assert sorted(sites) == sorted([block_site(i) for i in range(layers)] + [FINAL_SITE])
        for i in range(layers):
            assert sites[block_site(i)].down.in_features == width
            assert sites[block_site(i)].down.out_features == 3
        assert sites[FINAL_SITE].down.in_features == embed_dim
    assert len(model.loss_history) == 2


@pytest.mark.parametrize(
    "kind,sampling",
    [(SurgeryV1, "all_tasks"), (SurgeryV1, "round_robin"), (SurgeryV2, "all_tasks")],
)
def test_cached_training_equals_the_reference_loop(pool, tmp_path, kind, sampling):
    kw = dict(rank=4, lr=1e-2, steps=12, batch_size=8, sampling=sampling, seed=3, save=False)
    cached = kind(cache=True, **kw).apply(merged_model(pool), pool, ctx_at(tmp_path))
    naive = kind(cache=False, **kw).apply(merged_model(pool), pool, ctx_at(tmp_path))
    assert torch.allclose(
        torch.tensor(cached.loss_history), torch.tensor(naive.loss_history), atol=1e-5
    )
    ref = naive.adapters.state_dict()
    for k, v in cached.adapters.state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-5), k
    # ...and training did move away from the identity init.
    assert cached.adapters["task2"][FINAL_SITE].up.weight.abs().sum() > 0


# -- save / load -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(pool, tmp_path, kind):
    trained = kind(rank=4, lr=1e-2, steps=5, batch_size=8).apply(
        merged_model(pool), pool, ctx_at(tmp_path)
    )
    path = tmp_path / SURGERY_FILE
    _, meta = read_surgery(path)
    assert meta["kind"] == kind.name and meta["rank"] == "4"
    assert OmegaConf.to_object(OmegaConf.create(meta["tasks"])) == pool.tasks

    loaded = kind(rank=4, load_from=str(path)).apply(
        merged_model(pool), pool, ctx_at(tmp_path / "eval")
    )
    assert not (tmp_path / "eval" / SURGERY_FILE).exists()  # evaluation only, nothing trained
    ref = trained.adapters.state_dict()
    for k, v in loaded.adapters.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        for t in pool.tasks:
            x = images(pool, t)
            assert torch.equal(loaded(x, t), trained(x, t))


def test_load_refuses_a_file_that_does_not_fit(pool, tmp_path):
    SurgeryV1(rank=4, steps=2, batch_size=4).apply(merged_model(pool), pool, ctx_at(tmp_path))
    path = str(tmp_path / SURGERY_FILE)
    with pytest.raises(CheckpointError, match="kind"):
        SurgeryV2(rank=4, load_from=path).apply(merged_model(pool), pool, ctx_at(tmp_path))
    with pytest.raises(CheckpointError, match="rank"):
        SurgeryV1(rank=8, load_from=path).apply(merged_model(pool), pool, ctx_at(tmp_path))
    other = synthetic_pool(n_tasks=2, n_images=8)
    with pytest.raises(CheckpointError, match="tasks"):
        SurgeryV1(rank=4, load_from=path).apply(merged_model(other), other, ctx_at(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        SurgeryV1(rank=4, load_from=str(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk"):
        SurgeryV1(rank=4, load_from=str(junk)).apply(merged_model(pool), pool, ctx_at(tmp_path))


# -- schedules and online mode -----------------------------------------------------------------
def test_schedules():
    sizes = {"a": 10, "b": 7}
    s = make_schedule(sizes, steps=4, batch_size=5, sampling="all_tasks", seed=0)
    assert all(sorted(step) == ["a", "b"] and all(len(i) == 5 for i in step.values()) for step in s)
    # The first pass over a task draws without replacement.
    assert sorted(torch.cat([s[0]["a"], s[1]["a"]]).tolist()) == list(range(10))
    assert make_schedule(sizes, 4, 5, "all_tasks", 0)[3]["b"].tolist() == s[3]["b"].tolist()
    rr = make_schedule(sizes, steps=5, batch_size=3, sampling="round_robin", seed=0)
    assert [list(step) for step in rr] == [["a"], ["b"], ["a"], ["b"], ["a"]]
    with pytest.raises(ConfigError, match="sampling"):
        make_schedule(sizes, 4, 5, "random", 0)


@pytest.mark.parametrize("sampling", ["all_tasks", "round_robin"])
def test_online_schedule_sees_every_sample_once(sampling):
    sizes = {"a": 5, "b": 3, "c": 4}
    s = online_schedule(sizes, sampling, seed=1)
    for t, n in sizes.items():
        seen = torch.cat([step[t] for step in s if t in step])
        assert sorted(seen.tolist()) == list(range(n))
    assert all(len(i) == 1 for step in s for i in step.values())
    assert len(s) == (max(sizes.values()) if sampling == "all_tasks" else sum(sizes.values()))


@pytest.mark.parametrize("kind", KINDS)
def test_online_mode_sees_each_sample_once(pool, tmp_path, kind):
    model = kind(rank=4, lr=1e-2, online=True, batch_size=16, steps=500, save=False).apply(
        merged_model(pool), pool, ctx_at(tmp_path)
    )
    n = len(pool.test_sets["task0"])
    assert model.online_counts == {t: n for t in pool.tasks}  # batch_size/steps ignored
    assert len(model.loss_history) == n  # all_tasks: one sample of every task per step
    assert set(model.online_accuracy) == set(pool.tasks)
    assert all(0.0 <= a <= 100.0 for a in model.online_accuracy.values())  # in %


def test_online_v1_adapts_then_predicts(pool, tmp_path):
    """Known answer: a plain-torch replay of adapt-then-predict gives the same accuracy."""
    kw = dict(rank=4, lr=5e-2, online=True, sampling="round_robin", seed=2, save=False)
    got = SurgeryV1(**kw).apply(merged_model(pool), pool, ctx_at(tmp_path))

    ref = SurgeryV1(**kw).build(merged_model(pool))
    opt = torch.optim.Adam(ref.surgery_parameters(), lr=5e-2, betas=(0.9, 0.999))
    experts = {t: pool.expert_encoder(t) for t in pool.tasks}
    hits = dict.fromkeys(pool.tasks, 0)
    for step in online_schedule(
        {t: len(pool.test_sets[t]) for t in pool.tasks}, "round_robin", seed=2
    ):
        ((t, idx),) = step.items()
        x, y = pool.test_sets[t][idx]
        with torch.no_grad():
            f, target = ref.encoder(x), experts[t](x)
        loss = F.l1_loss(ref.adapters[t][FINAL_SITE](f), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            hits[t] += int((ref.heads[t](ref.adapters[t][FINAL_SITE](f)).argmax(-1) == y).sum())
    n = len(pool.test_sets["task0"])
    assert got.online_accuracy == pytest.approx({t: 100.0 * hits[t] / n for t in pool.tasks})
    for k, v in got.adapters.state_dict().items():
        assert torch.allclose(v, ref.adapters.state_dict()[k], atol=1e-5), k


# -- config ----------------------------------------------------------------------------
def test_bad_config_is_one_clear_error(pool, tmp_path):
    with pytest.raises(ConfigError, match="sampling"):
        SurgeryV1(sampling="everything")
    with pytest.raises(ConfigError, match="rank"):
        SurgeryV2(rank=0)
    with pytest.raises(ConfigError, match="betas"):
        SurgeryV1(betas=[0.9])
    partial = copy.copy(pool)
    partial.test_sets = {t: pool.test_sets[t] for t in pool.tasks[:2]}
    with pytest.raises(ConfigError, match="task2"):
        SurgeryV1(steps=1).apply(merged_model(pool), partial, ctx_at(tmp_path))


def test_no_surgery_returns_the_model(pool, tmp_path):
    model = merged_model(pool)
    assert NoSurgery().apply(model, pool, ctx_at(tmp_path)) is model


@pytest.mark.parametrize("name,cls", [("none", NoSurgery), ("v1", SurgeryV1), ("v2", SurgeryV2)])
def test_yaml_instantiates_with_the_paper_defaults(name, cls):
    cfg = OmegaConf.create({"rank": 7, "seed": 5, "surgery": OmegaConf.load(CONF / f"{name}.yaml")})
    s = instantiate(cfg.surgery)
    assert isinstance(s, cls) and isinstance(s, Surgery)
    if cls is NoSurgery:
        return
    assert (s.rank, s.seed) == (7, 5)
    assert (s.lr, s.betas, s.weight_decay, s.steps, s.batch_size) == (
        1e-3,
        (0.9, 0.999),
        0.0,
        500,
        16,
    )
    assert (s.sampling, s.online, s.cache, s.load_from) == ("all_tasks", False, True, None)


def test_surgery_model_is_a_multitask_model(pool):
    model = SurgeryV1(rank=2).build(merged_model(pool))
    assert isinstance(model, MultiTaskModel) and isinstance(model, SurgeryModel)
    assert model(images(pool), "task0").shape == (5, 4)
    with pytest.raises(ConfigError, match="unknown task"):
        model(images(pool), "nope")


def test_losses_known_answer_at_init(pool):
    """Identity modules: v1's loss is L1(merged f, expert f); v2's adds, for every block, the
    L1 between the merged and the expert token means (equal weights)."""
    base = merged_model(pool)
    x = images(pool, "task2", 6)
    expert = expert_targets(pool.expert_encoder("task2"), x, with_blocks=True)
    merged = expert_targets(merged_model(pool).encoder, x, with_blocks=True)
    final = F.l1_loss(merged["target"], expert["target"])
    blocks = [
        F.l1_loss(merged["target_blocks"][:, i], expert["target_blocks"][:, i]) for i in range(2)
    ]
    with torch.no_grad():
        v1 = SurgeryV1(rank=4)
        got1 = v1.loss(v1.build(base), "task2", {"images": x, **expert})
        v2 = SurgeryV2(rank=4)
        got2 = v2.loss(v2.build(merged_model(pool)), "task2", {"images": x, **expert})
    assert got1 == pytest.approx(float(final), rel=1e-5)
    assert got2 == pytest.approx(float(final + blocks[0] + blocks[1]), rel=1e-5)
    assert float(blocks[0]) > 0 and float(blocks[1]) > 0


def test_v2_corrected_stream_feeds_the_next_block(pool):
    model = SurgeryV2(rank=4).build(merged_model(pool))
    plain = expert_targets(merged_model(pool).encoder, images(pool), with_blocks=True)
    with torch.no_grad():
        model.adapters["task0"][block_site(0)].up.weight.normal_()
        with model.route("task0", record=True) as means:
            model.features(images(pool), "task0")
        with model.route("task1", record=True) as other:
            model.features(images(pool), "task1")
    # Only block 0's module changed, yet block 1's output moves: it received the corrected stream.
    assert not torch.allclose(means[1], plain["target_blocks"][:, 1], atol=1e-4)
    assert torch.allclose(other[1], plain["target_blocks"][:, 1], atol=1e-5)


def test_v2_batched_step_loss_equals_per_task_sum(pool):
    """One encoder pass over all tasks' rows (each routed through its own modules) gives the
    per-task loop's loss and gradients."""
    surgery = SurgeryV2(rank=4, seed=1)
    model = surgery.build(merged_model(pool))
    g = torch.Generator().manual_seed(0)
    for p in model.surgery_parameters():  # leave the identity init: make modules differ
        p.data.normal_(0, 0.1, generator=g)
    batches = {}
    for t in pool.tasks:
        x = torch.stack([pool.test_sets[t][i][0] for i in range(5)])
        batches[t] = {"images": x, **expert_targets(pool.expert_encoder(t), x, True)}
    batched = surgery.step_loss(model, batches)
    (gb,) = torch.autograd.grad(batched, [model.adapters["task1"]["block_0"].down.weight])
    per_task = sum(surgery.loss(model, t, b) for t, b in batches.items())
    (gp,) = torch.autograd.grad(per_task, [model.adapters["task1"]["block_0"].down.weight])
    assert torch.allclose(batched, per_task, atol=1e-5)
    assert torch.allclose(gb, gp, atol=1e-5) and gb.abs().sum() > 0
