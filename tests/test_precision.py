"""``trainer.precision=bf16-mixed`` for evaluation, Surgery (v1, v2) and AdaMerging, against
fp32 on the tiny zoo, and cached features computed in the precision used at inference.

bf16 keeps 8 mantissa bits (relative rounding 2^-8 ≈ 0.4%), so the bound is loose on purpose:
per task at most ``MAX_FLIPS`` test images may change their prediction, trained surgery
modules stay within ``MODULE_RTOL`` (relative) of fp32's and AdaMerging's entropy within
``ENTROPY_RTOL`` per step. The tests print the measured differences (pytest -s).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file

from mergelab.engine import Engine
from mergelab.pipeline import run

N_TEST = 64  # test images per task in the tiny zoo
MAX_FLIPS = 4  # per task: bf16 may move a near-tie prediction, not the model
MODULE_RTOL = 0.05  # relative distance of the trained surgery modules (measured 3e-3, 4e-3)
ENTROPY_RTOL = 0.05  # AdaMerging's objective in bf16 vs fp32, per step (measured 1.4e-2)
FAST = ["eval.batch_size=32", "analysis.bias=false", "analysis.task_vectors=false"]
CONFIGS = {
    "eval": [],
    "v1": ["surgery=v1", "surgery.steps=5", "surgery.batch_size=8"],
    "v2": ["surgery=v2", "surgery.steps=3", "surgery.batch_size=8"],
    "ada_layer": ["merge=adamerging", "merge.steps=3", "merge.batch_size=8"],
}


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        for name, overrides in CONFIGS.items():
            cfg = compose([*FAST, *overrides, f"trainer.precision={precision}"], tiny_cache)
            out[precision, name] = (run(cfg, root / precision / name), root / precision / name)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_mixed_stays_close_to_fp32(runs, name):
    (fp32, _), (bf16, _) = runs["32-true", name], runs["bf16-mixed", name]
    assert bf16["provenance"]["precision"] == "bf16-mixed"
    diff = {t: bf16["accuracy"][t] - fp32["accuracy"][t] for t in fp32["tasks"]}
    print(f"\n{name}: fp32 {fp32['accuracy']} bf16 {bf16['accuracy']} diff {diff}")
    assert all(abs(d) <= MAX_FLIPS * 100.0 / N_TEST + 1e-9 for d in diff.values()), diff


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_bf16_surgery_modules_stay_close(runs, name):
    """Adam moves every weight by about lr per step whatever the gradient's size, so a
    rounding-level gradient can move an entry the other way: compare the modules as a whole
    (relative Frobenius distance), not entry by entry."""
    a = load_file(runs["32-true", name][1] / "surgery.safetensors")
    b = load_file(runs["bf16-mixed", name][1] / "surgery.safetensors")
    dist = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(a[k].float().pow(2).sum()) for k in a) ** 0.5
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"\n{name}: modules bf16 vs fp32: relative {dist / norm:.2e}, max |Δ| {worst:.2e}")
    assert dist <= MODULE_RTOL * norm


def test_bf16_adamerging_objective_and_coefficients_stay_close(runs):
    a, b = (
        json.loads((runs[p, "ada_layer"][1] / "adamerging_coefficients.json").read_text())
        for p in ("32-true", "bf16-mixed")
    )
    ha, hb = torch.tensor(a["entropy_history"]), torch.tensor(b["entropy_history"])
    lam = float((torch.tensor(a["coefficients"]) - torch.tensor(b["coefficients"])).abs().max())
    rel = float(((ha - hb).abs() / ha.abs()).max())
    print(f"\nada_layer: entropy bf16 vs fp32: relative {rel:.2e}; max |Δλ| {lam:.2e}")
    assert rel <= ENTROPY_RTOL
    # λ starts at `init` and moves about lr per step: the two runs stay within that budget
    assert lam <= 2 * 1e-3 * len(ha)


def test_cached_features_are_computed_in_the_inference_precision():
    """The engine's measuring pass runs under the configured autocast, so a feature cache
    holds what inference in that precision computes (bf16 values), not fp32 ones."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 4))
    data = torch.utils.data.TensorDataset(torch.randn(9, 6), torch.zeros(9, dtype=torch.long))
    idx = torch.tensor([7, 1, 4, 0])
    engine = Engine({"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"})
    got = engine.compute(lambda m, x: {"f": m(x)}, encoder, data, idx, batch_size=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = encoder(data.tensors[0][idx])
    assert got["f"].dtype == torch.bfloat16
    assert torch.equal(got["f"], want) and torch.equal(got["label"], torch.zeros(4).long())
    fp32 = Engine({"accelerator": "cpu", "devices": 1}).compute(
        lambda m, x: {"f": m(x)}, encoder, data, idx, batch_size=4
    )
    assert fp32["f"].dtype == torch.float32 and not torch.equal(fp32["f"], want.float())
