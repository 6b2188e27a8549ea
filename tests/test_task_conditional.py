"""Task-conditional merges (TALL masks, EMR-merging): known answers for the methods, the
bit-packed storage, and per-task routing through evaluation, surgery (v1/v2/stats) and the bias
analysis — task t must always run θ_t = θ0 + λt·(Mt ⊙ (θ_s − θ0))."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergelab.analysis.bias import measure_bias
from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.eval.evaluator import evaluate
from mergelab.merge.conditional import (
    TaskConditionalMerge,
    is_conditional,
    pack_bits,
    packed_size,
    unpack_bits,
)
from mergelab.merge.emr import EMR
from mergelab.merge.tall_masks import TallMasks
from mergelab.merge.ties import Ties
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.stats import StatsSurgery
from mergelab.surgery.v1 import SurgeryV1
from mergelab.surgery.v2 import SurgeryV2
from mergelab.zoo.synthetic import synthetic_pool

METHODS = [EMR, TallMasks]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool(n_tasks=3, width=32, layers=2, n_images=24, expert_noise=0.1, seed=0)


def ctx_at(path) -> RunContext:
    return RunContext(out_dir=path, eval_batch_size=64)


def plain(pool, state) -> MultiTaskModel:
    return MultiTaskModel(pool.encoder(state), pool.heads)


def images(pool, task: str, n: int = 6) -> torch.Tensor:
    return pool.test_sets[task].tensors[0][:n]


# -- bit packing -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 8, 9, 37, 64])
def test_pack_bits_is_numpy_packbits_and_round_trips(n):
    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n) == -(-n // 8)
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy()))
    assert torch.equal(unpack_bits(packed, n), m)


@pytest.mark.parametrize("method", METHODS)
def test_masks_are_stored_as_bits(pool, method):
    r = method().merge(pool.pretrained, pool.experts)
    n_params = sum(v.numel() for v in pool.pretrained.values() if v.is_floating_point())
    n_keys = len(r.shared)
    for t in pool.tasks:
        assert all(m.dtype == torch.uint8 for m in r.masks[t].values())
        mask_bytes = sum(m.numel() * m.element_size() for m in r.masks[t].values())
        # ⌈n/8⌉ per tensor: at most one padding byte per tensor over n/8
        assert n_params / 8 <= mask_bytes < n_params / 8 + n_keys
        assert r.storage()["per_task_bytes"][t] == mask_bytes + 8
    s = r.storage()
    model_bytes = sum(v.numel() * v.element_size() for v in pool.pretrained.values())
    assert s["shared_bytes"] == 2 * model_bytes  # θ0 and θ_s (every key is float here)
    assert s["total_bytes"] < s["experts_bytes"] + model_bytes


# -- known answers -----------------------------------------------------------------------------
def _tiny(experts_w, experts_b, w0=(1.0, 1.0, 1.0, 1.0), b0=(0.5, 0.5)):
    """θ0 and experts of a 2-tensor 'model' (plus an integer buffer), given task vectors."""
    w0, b0 = torch.tensor(w0), torch.tensor(b0)
    pre = {"w": w0, "b": b0, "n": torch.tensor([3])}
    experts = {
        f"t{i}": {"w": w0 + torch.tensor(w), "b": b0 + torch.tensor(b), "n": torch.tensor([3])}
        for i, (w, b) in enumerate(zip(experts_w, experts_b), start=1)
    }
    return pre, experts


def test_emr_known_answer():
    # τ1 = w [2, -1, .5, 0], b [1, 0];  τ2 = w [-1, -3, 1, 0], b [1, 2]
    pre, experts = _tiny([[2.0, -1.0, 0.5, 0.0], [-1.0, -3.0, 1.0, 0.0]], [[1.0, 0.0], [1.0, 2.0]])
    r = EMR().merge(pre, experts)
    # Σ τ: w [1, -4, 1.5, 0] → γ [+, -, +, -] (0 elects -1); b [2, 2] → γ [+, +]
    # τuni = γ · max of the agreeing |τt|: w [2, -3, 1, 0] (no task agrees at the last), b [1, 2]
    assert torch.equal(r.shared["w"] - pre["w"], torch.tensor([2.0, -3.0, 1.0, 0.0]))
    assert torch.equal(r.shared["b"] - pre["b"], torch.tensor([1.0, 2.0]))
    assert torch.equal(r.mask("t1", "w"), torch.tensor([True, True, True, False]))
    assert torch.equal(r.mask("t2", "w"), torch.tensor([False, True, True, False]))
    assert torch.equal(r.mask("t1", "b"), torch.tensor([True, False]))
    assert torch.equal(r.mask("t2", "b"), torch.tensor([True, True]))
    # λt = Σn mean|τt,n| / Σn mean|Mt,n ⊙ τuni,n|, each tensor's mean counting equally:
    # t1: (3.5/4 + 1/2) / (6/4 + 1/2) = 1.375 / 2 ;  t2: (5/4 + 3/2) / (4/4 + 3/2) = 2.75 / 2.5
    # (pooling all entries instead would give t1 4.5 / 7)
    assert r.scales == {"t1": pytest.approx(0.6875, abs=1e-12), "t2": pytest.approx(1.1, abs=1e-12)}
    t1, t2 = r.materialize("t1"), r.materialize("t2")
    assert torch.allclose(t1["w"], pre["w"] + 0.6875 * torch.tensor([2.0, -3.0, 1.0, 0.0]))
    assert torch.allclose(t1["b"], pre["b"] + 0.6875 * torch.tensor([1.0, 0.0]))
    assert torch.allclose(t2["w"], pre["w"] + 1.1 * torch.tensor([0.0, -3.0, 1.0, 0.0]))
    assert torch.allclose(t2["b"], pre["b"] + 1.1 * torch.tensor([1.0, 2.0]))
    assert torch.equal(t1["n"], pre["n"]) and torch.equal(t2["n"], pre["n"])
    assert EMR().merge(pre, experts).scales == r.scales  # deterministic


def test_tall_masks_known_answer_strict():
    # τ1 = [1, 2, -1, .5], τ2 = [1, -1, -1, 1] → τMTL = [2, 1, -2, 1.5]
    # |τMTL − τ1| = [1, 1, 1, 1]: with λ = .5, |τ1| > .5 fails only at .5 (strict >)
    # |τMTL − τ2| = [1, 2, 1, .5]: |τ2| > .5·[1, 2, 1, .5] fails only at 1 > 1 (strict >)
    pre, experts = _tiny(
        [[1.0, 2.0, -1.0, 0.5], [1.0, -1.0, -1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], w0=(0.0,) * 4
    )
    r = TallMasks(tall_lambda=0.5).merge(pre, experts)
    assert torch.equal(r.shared["w"], torch.tensor([2.0, 1.0, -2.0, 1.5]))
    assert torch.equal(r.mask("t1", "w"), torch.tensor([True, True, True, False]))
    assert torch.equal(r.mask("t2", "w"), torch.tensor([True, False, True, True]))
    assert torch.equal(r.materialize("t1")["w"], torch.tensor([2.0, 1.0, -2.0, 0.0]))
    assert torch.equal(r.materialize("t2")["w"], torch.tensor([2.0, 0.0, -2.0, 1.5]))
    # b: every τ is 0, so no mask keeps anything (|0| > 0 is false) and b stays θ0
    assert not r.mask("t1", "b").any() and torch.equal(r.materialize("t1")["b"], pre["b"])
    # α scales every task's masked vector; per-task λ as a mapping
    half = TallMasks(tall_lambda={"t1": 0.5, "t2": 0.5}, scaling=0.5).merge(pre, experts)
    assert torch.equal(half.materialize("t2")["w"], torch.tensor([1.0, 0.0, -1.0, 0.75]))


def test_tall_masks_over_ties_masks_the_ties_merge(pool):
    r = TallMasks(base="ties", tall_lambda=0.6).merge(pool.pretrained, pool.experts)
    ties = Ties(k=0.2, scaling=1.0, reduce="sum").merge(pool.pretrained, pool.experts)
    for key, theta in r.shared.items():
        assert torch.allclose(theta, ties[key], atol=1e-6), key
        tau_mtl = ties[key].double() - pool.pretrained[key].double()
        for t in pool.tasks:
            tau = pool.experts[t][key].double() - pool.pretrained[key].double()
            want = tau.abs() > 0.6 * (tau_mtl - tau).abs()
            assert torch.equal(r.mask(t, key), want), (t, key)


@pytest.mark.parametrize("method", METHODS)
def test_a_single_expert_comes_back_exactly(pool, method):
    one = {"task1": pool.experts["task1"]}
    r = method().merge(pool.pretrained, one)
    sd = r.materialize("task1")
    for k, v in pool.experts["task1"].items():
        assert torch.equal(sd[k], v), k
    # and as a routed model: the same outputs as the expert, bit for bit
    model = MultiTaskModel(pool.encoder(r), {"task1": pool.heads["task1"]})
    expert = plain(pool, pool.experts["task1"])
    x = images(pool, "task1")
    with torch.no_grad():
        assert torch.equal(model(x, "task1"), expert(x, "task1"))


def test_emr_with_identical_experts_is_that_expert(pool):
    same = {t: pool.experts["task0"] for t in pool.tasks}
    r = EMR().merge(pool.pretrained, same)
    assert r.scales == dict.fromkeys(pool.tasks, 1.0)
    model = MultiTaskModel(pool.encoder(r), pool.heads)
    expert = plain(pool, pool.experts["task0"])
    for t in pool.tasks:
        sd = r.materialize(t)
        assert all(torch.equal(sd[k], v) for k, v in pool.experts["task0"].items())
        with torch.no_grad():
            assert torch.equal(model(images(pool, t), t), expert(images(pool, t), t))


@pytest.mark.parametrize("n_tasks,lam", [(2, 0.6), (3, 0.5), (3, 0.6)])
def test_tall_masks_with_identical_experts(pool, n_tasks, lam):
    """Not the expert (unlike EMR): τMTL = Tτ and mt = 1{|τ| > λ(T−1)|τ|} for every entry, so
    task t runs θ0 + Tτ when λ(T−1) < 1 and θ0 when λ(T−1) ≥ 1 (strict >)."""
    tasks = [f"t{i}" for i in range(n_tasks)]
    r = TallMasks(tall_lambda=lam).merge(pool.pretrained, {t: pool.experts["task0"] for t in tasks})
    keep = lam * (n_tasks - 1) < 1
    for k, base in pool.pretrained.items():
        tau = pool.experts["task0"][k].double() - base.double()
        want = (base.double() + n_tasks * tau).float() if keep else base
        assert torch.allclose(r.materialize("t1")[k], want, atol=1e-6), k
        if not keep:
            assert torch.equal(r.materialize("t1")[k], base)


def test_bad_parts_are_clear_errors(pool):
    r = EMR().merge(pool.pretrained, pool.experts)
    with pytest.raises(ConfigError, match="'nope'"):
        r.materialize("nope")
    key = next(iter(r.shared))
    bad = {t: dict(m) for t, m in r.masks.items()}
    bad["task0"][key] = bad["task0"][key][:-1]
    with pytest.raises(CheckpointError, match=key):
        TaskConditionalMerge(r.pretrained, r.shared, bad, r.scales)
    with pytest.raises(ConfigError, match="rescalers"):
        TaskConditionalMerge(r.pretrained, r.shared, r.masks, {"task0": 1.0})
    with pytest.raises(ConfigError, match="'task9'"):
        MultiTaskModel(pool.encoder(r), pool.heads).use_task("task9")


# -- routing -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emr(pool):
    return EMR().merge(pool.pretrained, pool.experts)


def test_variants_differ(pool, emr):
    """The routing tests below could not fail if every task's weights were the same."""
    a, b = emr.materialize("task0"), emr.materialize("task1")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_each_task_runs_its_own_weights_whatever_the_order(pool, emr):
    model = MultiTaskModel(pool.encoder(emr), pool.heads)
    assert model.task_conditional and is_conditional(model.encoder)
    with torch.no_grad():
        for t in [*pool.tasks, *reversed(pool.tasks), pool.tasks[0]]:
            ref = plain(pool, emr.materialize(t))
            x = images(pool, t)
            assert torch.equal(model(x, t), ref(x, t))
            assert torch.equal(model.encode(x, t), ref.encoder(x))


def test_evaluation_gives_each_task_its_materialised_accuracy(pool, emr, tmp_path):
    ctx = ctx_at(tmp_path)
    model = MultiTaskModel(pool.encoder(emr), pool.heads)
    acc = evaluate(model, pool.test_sets, pool.heads, ctx, pool.tasks)
    for t in pool.tasks:
        ref = evaluate(plain(pool, emr.materialize(t)), pool.test_sets, pool.heads, ctx, [t])
        assert acc[t] == ref[t]
    # Lightning evaluates under inference mode: the weights it loaded must still train
    x = images(pool, "task2")
    model.use_task("task2")
    assert not any(p.is_inference() for p in model.encoder.parameters())
    model.encoder(x).sum().backward()


def _adapters(smodel, task):
    return {k: v.detach().clone() for k, v in smodel.adapters[task].state_dict().items()}


@pytest.mark.parametrize(
    "kind,cache", [(SurgeryV1, True), (SurgeryV1, False), (SurgeryV2, True), (SurgeryV2, False)]
)
def test_surgery_on_emr_trains_each_task_on_its_own_weights(pool, emr, tmp_path, kind, cache):
    """Task t's modules after surgery on the task-conditional model equal those trained on a
    plain model holding θ_t: the loss of task t only involves its modules, so this holds iff
    task t's forward (and backward) ran θ_t, even with all tasks summed into one loss."""
    cfg = dict(rank=4, steps=3, batch_size=4, seed=0, save=False, cache=cache)
    ctx = ctx_at(tmp_path)
    snapshot = {k: v.clone() for k, v in emr.shared.items()}
    routed = kind(**cfg).apply(MultiTaskModel(pool.encoder(emr), pool.heads), pool, ctx)
    for t in pool.tasks:
        ref = kind(**cfg).apply(plain(pool, emr.materialize(t)), pool, ctx)
        got, want = _adapters(routed, t), _adapters(ref, t)
        assert any(v.abs().sum() > 0 for k, v in got.items() if "up" in k)  # it trained
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (t, k)
        with torch.no_grad():  # and at inference, task t's modules on θ_t
            x = images(pool, t)
            assert torch.allclose(routed(x, t), ref(x, t), rtol=1e-5, atol=1e-6)
    # gradients reached the surgery modules only; the merge itself is untouched
    assert all(not p.requires_grad and p.grad is None for p in routed.encoder.parameters())
    assert all(torch.equal(emr.shared[k], v) for k, v in snapshot.items())


def test_v2_never_batches_several_tasks_through_a_conditional_encoder(pool, emr):
    smodel = SurgeryV2(rank=4).build(MultiTaskModel(pool.encoder(emr), pool.heads))
    with pytest.raises(ConfigError, match="one task per encoder pass"):
        with smodel.route_segments([("task0", 0, 2), ("task1", 2, 4)]):
            pass
    with smodel.route_segments([("task1", 0, 2)]):  # one task is fine
        pass


def test_stats_surgery_on_emr_uses_each_tasks_weights(pool, emr, tmp_path):
    cfg = dict(sites=["block"], num_samples=16, batch_size=8, save_stats=False)
    routed = StatsSurgery(**cfg).apply(
        MultiTaskModel(pool.encoder(emr), pool.heads), pool, ctx_at(tmp_path)
    )
    got = routed.stats_state()
    for t in pool.tasks:
        ref = StatsSurgery(**cfg).apply(plain(pool, emr.materialize(t)), pool, ctx_at(tmp_path))
        want = ref.stats_state()
        keys = [k for k in want if k.startswith(f"{t}/")]
        assert keys and all(torch.allclose(got[k], want[k], atol=1e-5) for k in keys)
        with torch.no_grad():
            assert torch.allclose(
                routed(images(pool, t), t), ref(images(pool, t), t), rtol=1e-5, atol=1e-6
            )


def test_bias_analysis_routes_each_task(pool, emr, tmp_path):
    ctx = ctx_at(tmp_path)
    got = measure_bias(MultiTaskModel(pool.encoder(emr), pool.heads), pool, ctx, 16)
    for t in pool.tasks:
        want = measure_bias(plain(pool, emr.materialize(t)), pool, ctx, 16)
        assert json.dumps(got["per_task"][t]) == json.dumps(want["per_task"][t])


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "surgery", ["v1 surgery.steps=3", "v2 surgery.steps=3", "stats surgery.num_samples=32"]
)
def test_cli_emr_with_surgery(run_cli, tmp_path, surgery):
    kind, *extra = surgery.split()
    out = tmp_path / "run"
    r = run_cli("merge=emr", f"surgery={kind}", *extra, "analysis.max_images=32", run_dir=out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["merge"] == "emr" and res["surgery"] == kind
    assert set(res["accuracy"]) == set(res["tasks"])
    storage = res["merge_storage"]
    assert storage["method"] == "emr" and set(storage["per_task_bytes"]) == set(res["tasks"])
    n = storage["n_masked_params"]
    assert all(n / 8 <= b < n / 8 + 200 for b in storage["per_task_bytes"].values())
