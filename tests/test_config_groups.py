"""Every yaml of the merge and surgery groups composes and runs on the tiny setup, so a new
method is tested the moment its yaml exists; every other group's yamls compose."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose
from omegaconf import open_dict

import mergelab
from mergelab.pipeline import run

CONF = Path(mergelab.__file__).parent / "conf"


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def shrink(section) -> None:
    """Cut any training loop in a method's config to a few steps."""
    with open_dict(section):
        for key in ("steps", "num_samples"):
            if key in section and isinstance(section[key], int):
                section[key] = min(section[key], 4 if key == "steps" else 32)
        if "batch_size" in section and isinstance(section["batch_size"], int):
            section["batch_size"] = min(section["batch_size"], 8)


@pytest.mark.parametrize("name", names("merge"))
def test_every_merge_yaml_runs(name, tiny_cache, tmp_path):
    cfg = compose([f"merge={name}"], tiny_cache)
    shrink(cfg.merge)
    res = run(cfg, tmp_path)
    assert set(res["accuracy"]) == set(cfg.tasks.names)
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize("name", names("surgery"))
def test_every_surgery_yaml_runs(name, tiny_cache, tmp_path):
    cfg = compose([f"surgery={name}", "merge=task_arithmetic"], tiny_cache)
    shrink(cfg.surgery)
    res = run(cfg, tmp_path)
    assert res["surgery"] == name
    assert set(res["accuracy"]) == set(cfg.tasks.names)


@pytest.mark.parametrize("group", ["model", "tasks", "trainer", "logger"])
def test_every_yaml_composes(group, tiny_cache):
    for name in names(group):
        cfg = compose([f"{group}={name}"], tiny_cache)
        assert cfg[group] is not None or group == "logger"


def test_experiment_presets_compose(tiny_cache):
    cfg = compose(["experiment=adamerging_surgery"], tiny_cache)
    assert cfg.merge._target_.endswith("AdaMerging") and cfg.merge.granularity == "layer"
    assert cfg.surgery._target_.endswith("SurgeryV1") and cfg.surgery.rank == cfg.rank
    assert names("experiment") == ["adamerging_surgery", "surgery_sweep"]
    compose(["experiment=surgery_sweep"], tiny_cache)


@pytest.mark.parametrize(
    "tasks,status", [("[mnist,gtsrb,dtd]", "success"), ("[mnist,bogus]", "failed")]
)
def test_loggers_receive_metrics_and_are_finalized_even_on_failure(
    tiny_cache, tmp_path, tasks, status
):
    from conftest import RecordingLogger

    from mergelab.errors import ConfigError

    RecordingLogger.instances.clear()
    cfg = compose(
        [f"tasks.names={tasks}", "+logger.rec._target_=conftest.RecordingLogger"], tiny_cache
    )
    if status == "failed":
        with pytest.raises(ConfigError, match="bogus"):
            run(cfg, tmp_path)
        assert not (tmp_path / "results.json").exists()
    else:
        res = run(cfg, tmp_path)
        assert RecordingLogger.instances[0].metrics["acc/avg"] == pytest.approx(
            res["table"][-1]["avg"]
        )
    (lg,) = RecordingLogger.instances
    assert lg.finalized == status
