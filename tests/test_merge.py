"""Known-answer and contract tests for the training-free merges."""

from __future__ import annotations

import copy

import pytest
import torch

from mergelab.errors import CheckpointError, ConfigError
from mergelab.merge import ops
from mergelab.merge.task_arithmetic import TaskArithmetic
from mergelab.merge.ties import Ties, ties_task_vectors
from mergelab.merge.weight_average import WeightAverage
from mergelab.pool.state import LazyStateDict, save_state_dict


def hand_case():
    """θ0 = 0; three experts on a 2×3 tensor with hand-chosen values."""
    p = {"w": torch.zeros(2, 3), "step": torch.tensor(7)}
    e = {
        "a": {"w": torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]]), "step": torch.tensor(7)},
        "b": {"w": torch.tensor([[3.0, 1.0, -0.5], [2.0, -1.0, -3.0]]), "step": torch.tensor(7)},
        "c": {"w": torch.tensor([[-1.0, -1.0, 0.25], [1.0, 1.0, 6.0]]), "step": torch.tensor(7)},
    }
    return p, e


def test_weight_average_known_answer():
    p, e = hand_case()
    out = WeightAverage().merge(p, e)
    want = torch.tensor([[1.0, -2.0 / 3, 0.25 / 3], [1.0, 4.0 / 3, 2.0 / 3]])
    torch.testing.assert_close(out["w"], want)
    assert out["step"].item() == 7  # integer buffers pass through


def test_task_arithmetic_known_answer():
    p = {"w": torch.ones(2)}
    e = {"a": {"w": torch.tensor([2.0, 1.0])}, "b": {"w": torch.tensor([1.0, 3.0])}}
    out = TaskArithmetic(scaling=0.5).merge(p, e)
    # τa = [1, 0], τb = [0, 2] → θ = 1 + 0.5·[1, 2]
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 2.0]))


def test_ties_known_answer_global_sum_and_mean():
    p, e = hand_case()
    # 18 task-vector entries; k = 0.5 of each task's 6 entries → keep top-3 per task.
    # a: |1,2,.5,0,4,1| → keep 4, -2, and one of the 1s (ties at threshold 1 keep both): 1, -2, 4, -1
    # b: |3,1,.5,2,1,3| → keep 3, 2, -3 (threshold 2)
    # c: |1,1,.25,1,1,6| → threshold 1 → keep -1, -1, 1, 1, 6
    m = Ties(k=0.5, scaling=1.0, reduce="sum", mode="mergelab").merge(p, e)
    ta = torch.tensor([[1.0, -2.0, 0.0], [0.0, 4.0, -1.0]])
    tb = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, -3.0]])
    tc = torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 6.0]])
    stack = torch.stack([ta, tb, tc])
    sign = torch.sign(stack.sum(0))
    sign[sign == 0] = 1
    agree = (torch.sign(stack) == sign) & (stack != 0)
    want_sum = (stack * agree).sum(0)
    torch.testing.assert_close(m["w"], want_sum)
    # spot check by hand: entry (0,0): 1+3-1=3>0 → keep 1 and 3 → 4; (1,2): -1-3+6=2>0 → 6
    assert m["w"][0, 0].item() == 4.0 and m["w"][1, 2].item() == 6.0
    mm = Ties(k=0.5, scaling=1.0, reduce="mean", mode="mergelab").merge(p, e)
    assert mm["w"][0, 0].item() == 2.0 and mm["w"][1, 2].item() == 6.0
    torch.testing.assert_close(mm["w"], want_sum / agree.sum(0).clamp(min=1))


def test_ties_density_one_no_conflict_equals_task_arithmetic():
    """k = 1 keeps everything; with no sign conflicts TIES-sum is task arithmetic."""
    p = {"w": torch.zeros(4)}
    e = {
        "a": {"w": torch.tensor([1.0, 2.0, 0.0, 3.0])},
        "b": {"w": torch.tensor([2.0, 0.5, 1.0, 0.0])},
    }
    torch.testing.assert_close(
        Ties(k=1.0, scaling=0.3).merge(p, e)["w"], TaskArithmetic(0.3).merge(p, e)["w"]
    )


def test_ties_trim_keeps_requested_fraction():
    g = torch.Generator().manual_seed(0)
    p = {"a": torch.zeros(100), "b": torch.zeros(50, 2)}
    e = {"t": {"a": torch.randn(100, generator=g), "b": torch.randn(50, 2, generator=g)}}
    v = ties_task_vectors(p, e, k=0.3, scope="global", mode="mergelab")["t"]
    assert sum(int((x != 0).sum()) for x in v.values()) == 60  # 30% of 200, counted globally
    v = ties_task_vectors(p, e, k=0.5, scope="per_tensor", mode="mergelab")["t"]
    assert int((v["a"] != 0).sum()) == 50 and int((v["b"] != 0).sum()) == 50


def test_ties_global_differs_from_per_tensor():
    """Global trim is over the whole flattened vector: a tensor of small values loses all."""
    p = {"big": torch.zeros(4), "small": torch.zeros(4)}
    e = {
        "t": {
            "big": torch.tensor([5.0, 6.0, 7.0, 8.0]),
            "small": torch.tensor([0.1, 0.2, 0.3, 0.4]),
        }
    }
    g = ties_task_vectors(p, e, k=0.5, scope="global", mode="mergelab")["t"]
    assert torch.count_nonzero(g["small"]) == 0 and torch.count_nonzero(g["big"]) == 4
    pt = ties_task_vectors(p, e, k=0.5, scope="per_tensor", mode="mergelab")["t"]
    assert torch.count_nonzero(pt["small"]) == 2


@pytest.mark.parametrize("method", [WeightAverage(), TaskArithmetic(0.3), Ties(k=1.0, scaling=0.3)])
def test_every_expert_contributes(method):
    """Changing any single expert (including the LAST one) changes the merge."""
    g = torch.Generator().manual_seed(1)
    p = {"w": torch.randn(8, generator=g)}
    e = {t: {"w": p["w"] + torch.randn(8, generator=g)} for t in "abcd"}
    base = method.merge(p, e)["w"]
    for t in e:
        e2 = copy.deepcopy(e)
        e2[t]["w"] = e2[t]["w"] + 10.0
        assert not torch.allclose(method.merge(p, e2)["w"], base), f"expert {t} ignored"


def test_merges_do_not_mutate_inputs_and_report_keys():
    p, e = hand_case()
    p0, e0 = copy.deepcopy(p), copy.deepcopy(e)
    for m in (WeightAverage(), TaskArithmetic(), Ties()):
        m.merge(p, e)
        assert m.merged_keys == ["w"]
    for k in p:
        assert torch.equal(p[k], p0[k])
        for t in e:
            assert torch.equal(e[t][k], e0[t][k])


def test_mismatched_expert_names_first_offending_key():
    p, e = hand_case()
    e["b"] = {"w": torch.zeros(3, 2), "step": torch.tensor(7)}
    with pytest.raises(CheckpointError, match=r"expert 'b'.*'w'.*shape"):
        TaskArithmetic().merge(p, e)
    e["b"] = {"v": torch.zeros(2, 3), "step": torch.tensor(7)}
    with pytest.raises(CheckpointError, match="expert 'b'.*missing key 'w'"):
        Ties().merge(p, e)


def test_non_finite_expert_is_an_error():
    p, e = hand_case()
    e["c"]["w"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="expert 'c'.*non-finite"):
        WeightAverage().merge(p, e)


def test_bad_hyperparameters():
    with pytest.raises(ConfigError, match="k must be a fraction"):
        Ties(k=1.5)
    with pytest.raises(ConfigError, match="reduce"):
        Ties(reduce="max")
    with pytest.raises(ConfigError, match="scope"):
        Ties(scope="layer")


def test_streaming_merge_on_lazy_experts_matches_eager(tmp_path):
    from mergelab.zoo.synthetic import synthetic_pool

    pool = synthetic_pool(n_tasks=3)
    lazy = {}
    for t, sd in pool.experts.items():
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
        lazy[t] = LazyStateDict(tmp_path / f"{t}.safetensors")
    for m in (TaskArithmetic(), Ties()):
        a, b = m.merge(pool.pretrained, pool.experts), m.merge(pool.pretrained, lazy)
        for k in a:
            torch.testing.assert_close(a[k], b[k])


def test_magnitude_threshold_edges():
    v = torch.tensor([1.0, -3.0, 2.0, 0.5])
    assert ops.magnitude_threshold(v, 0.0) == float("inf")
    assert ops.magnitude_threshold(v, 1.0) == 0.0
    assert ops.magnitude_threshold(v, 0.5) == 2.0
