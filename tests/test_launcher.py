"""Hydra's submitit launcher configs (hydra/launcher=local | slurm): a 2-job --multirun
through the local submitit launcher gives the comparison table, each job in its own process,
with the numbers a direct run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import TINY, compose

from mergelab.pipeline import run

FAST = ["analysis.bias=false", "analysis.task_vectors=false"]
MERGES = ("task_arithmetic", "weight_average")
TIMEOUT_S = 1200


def _multirun(cache, sweep, *overrides: str) -> subprocess.CompletedProcess:
    """``mergelab --multirun`` in its own process group: on a timeout the submitit job
    processes are killed with the launcher (they outlive a plain kill of the launcher)."""
    args = [sys.executable, "-m", "mergelab", "--multirun", *TINY, f"paths.cache_dir={cache}"]
    args += [*overrides, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "MERGELAB_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_slurm_and_local_launchers_compose():
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="mergelab.conf", version_base="1.3"):
        for choice, target, extra in (
            ("slurm", "SlurmLauncher", ["hydra.launcher.partition=gpu"]),
            ("local", "LocalLauncher", []),
        ):
            cfg = hcompose(
                "config", [*TINY, f"hydra/launcher={choice}", *extra], return_hydra_config=True
            )
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith(target)
            assert launcher.nodes == 1 and launcher.tasks_per_node == 1
            # per-job logs inside the sweep dir, next to the jobs' own output dirs
            assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
            if choice == "slurm":
                assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
            else:
                assert launcher.gpus_per_node == 0  # CPU jobs unless asked


def test_local_submitit_multirun_gives_the_comparison_table(tiny_cache, tmp_path):
    # A direct run first: builds the tiny zoo once (two jobs must not build it at once) and
    # gives the numbers the submitted job must reproduce.
    direct = run(compose([f"merge={MERGES[0]}", *FAST], tiny_cache), tmp_path / "direct")

    sweep = tmp_path / "sweep"
    r = _multirun(tiny_cache, sweep, "hydra/launcher=local", f"merge={','.join(MERGES)}", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr
    jobs = {json.loads(p.read_text())["merge"]: p for p in sweep.glob("*/results.json")}
    assert set(jobs) == set(MERGES)

    # each job ran in its own submitit process, which logged the job's own table
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2
    assert all("individual experts" in p.read_text() for p in logs)

    ta = json.loads(jobs[MERGES[0]].read_text())
    assert ta["accuracy"] == direct["accuracy"]
    assert ta["baselines"] == direct["baselines"]

    comparison = json.loads((sweep / "comparison.json").read_text())
    (section,) = comparison["sections"]
    rows = {row["method"]: row for row in section["rows"]}
    assert set(rows) == {"pretrained", "individual experts", *MERGES}
    for task, acc in direct["accuracy"].items():
        assert rows[MERGES[0]][task] == round(acc, 2)
    assert "comparison table" in r.stdout and all(m in r.stdout for m in MERGES)
