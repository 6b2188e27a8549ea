"""The pipeline reads surgery through the Surgery interface only: ``rank``, ``identity``
(no second bias measurement for no surgery) and ``extra_rows`` (online surgery's row)."""

from __future__ import annotations

import pytest
from conftest import compose

from mergelab.errors import ConfigError
from mergelab.pipeline import run
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.none import NoSurgery
from mergelab.surgery.stats import StatsSurgery
from mergelab.surgery.v1 import SurgeryV1

FAST = ["analysis.task_vectors=false"]


def test_the_interface_defaults():
    assert NoSurgery().identity and NoSurgery().rank is None
    assert not SurgeryV1().identity and SurgeryV1(rank=4).rank == 4
    assert StatsSurgery().rank is None
    model = MultiTaskModel(None, {})
    model.online_accuracy = {"a": 50.0}
    assert NoSurgery().extra_rows(model) == {}
    assert SurgeryV1(online=False).extra_rows(model) == {}  # a stale attribute is not a row
    assert SurgeryV1(online=True).extra_rows(model) == {"online": {"a": 50.0}}


def test_online_surgery_adds_its_row(tiny_cache, tmp_path):
    cfg = compose(["surgery=v1", "surgery.online=true", "analysis.bias=false", *FAST], tiny_cache)
    res = run(cfg, tmp_path / "online")
    rows = {r["method"]: r for r in res["table"]}
    online = rows.pop(f"{res['label']} [online]")
    assert set(rows) == {"pretrained", "individual experts", res["label"]}
    assert all(0.0 <= online[t] <= 100.0 for t in res["tasks"])


def test_no_surgery_measures_bias_once(tiny_cache, tmp_path):
    cfg = compose(["analysis.bias=true", "analysis.max_images=8", *FAST], tiny_cache)
    bias = run(cfg, tmp_path / "none")["representation_bias"]
    assert bias["after"] == bias["before"]
    assert (tmp_path / "none" / "bias.png").is_file()


def test_a_surgery_config_must_build_a_surgery(tiny_cache, tmp_path):
    cfg = compose(["surgery._target_=mergelab.merge.weight_average.WeightAverage"], tiny_cache)
    with pytest.raises(ConfigError, match="expected a Surgery"):
        run(cfg, tmp_path / "bad")
