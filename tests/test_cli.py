"""End-to-end CLI runs on the tiny embedded setup: outputs, sweeps and bad input."""

from __future__ import annotations

import csv
import json

from mergelab.pool.state import LazyStateDict, save_state_dict


def test_main_job_writes_results(run_cli, tmp_path):
    out = tmp_path / "run"
    r = run_cli("merge=ties", "logger=csv", run_dir=out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["family"] == "embedded" and res["backbone"] == "embedded-vit-mini"
    assert res["merge"] == "ties" and res["surgery"] == "none"
    assert res["tasks"] == ["mnist", "gtsrb", "dtd"]
    methods = [row["method"] for row in res["table"]]
    assert methods == ["pretrained", "individual experts", "ties"]
    for row in res["table"]:
        for t in res["tasks"]:
            assert 0.0 <= row[t] <= 100.0
    assert abs(res["avg"] - sum(res["accuracy"].values()) / 3) < 1e-6
    assert set(res["timings"]) >= {"pool_s", "merge_s", "eval_s", "total_s"}
    assert res["config"]["merge"]["k"] == 0.2
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == methods and rows[0]["family"] == "embedded"
    assert list((out / "csv").rglob("metrics.csv")), "CSV logger wrote nothing"
    assert "individual experts" in r.stdout


def test_multirun_writes_comparison_table(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("merge=weight_average,task_arithmetic,ties", run_dir=sweep, multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 3
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    methods = [row["method"] for row in rows]
    assert methods[:2] == ["pretrained", "individual experts"]
    assert set(methods[2:]) == {"weight_average", "task_arithmetic", "ties"}


def test_unknown_merge_method_lists_choices(run_cli, tmp_path):
    r = run_cli("merge=nonexistent", run_dir=tmp_path / "r")
    assert r.returncode != 0
    assert "nonexistent" in r.stderr and "ties" in r.stderr and "weight_average" in r.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_unknown_task_fails_before_work(run_cli, tmp_path):
    r = run_cli("tasks.names=[mnist,imagenet]", run_dir=tmp_path / "r")
    assert r.returncode == 2
    assert "'imagenet'" in r.stderr and "valid tasks" in r.stderr and "gtsrb" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_unknown_model_lists_choices(run_cli, tmp_path):
    r = run_cli("model=resnet9000", run_dir=tmp_path / "r", tiny=False)
    assert r.returncode != 0 and "resnet9000" in r.stderr and "embedded" in r.stderr


def test_mismatched_checkpoint_names_first_offending_key(run_cli, tmp_path, tiny_cache):
    ok = run_cli(run_dir=tmp_path / "ok")  # make sure the tiny zoo exists
    assert ok.returncode == 0, ok.stderr[-3000:]
    zoo = next((tiny_cache / "zoo").rglob("expert_gtsrb.safetensors")).parent
    path = zoo / "expert_gtsrb.safetensors"
    sd = dict(LazyStateDict(path).items())
    backup = dict(sd)
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    sd[key] = sd[key][:, :-1].contiguous()
    save_state_dict(sd, path)
    try:
        r = run_cli(run_dir=tmp_path / "bad")
    finally:
        save_state_dict(backup, path)
    assert r.returncode == 2
    assert "gtsrb" in r.stderr and key in r.stderr and "shape" in r.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_wandb_logger_runs_offline_without_account(run_cli, tmp_path, monkeypatch):
    """No API key, no network: the run succeeds and W&B writes an offline run."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    out = tmp_path / "run"
    r = run_cli("logger=wandb", run_dir=out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "results.json").exists()
    runs = list((tmp_path / "wb").rglob("offline-run-*")) + list(out.rglob("offline-run-*"))
    assert runs, "no offline W&B run was written"
