"""DDP gives the single-process answer: 2 CPU processes (gloo, ``trainer=ddp
trainer.accelerator=cpu trainer.devices=2``) against 1 process on the tiny zoo, for
evaluation (+ bias analysis), Surgery v1 (offline and online), SurgeryV2 (round_robin: tasks
absent from steps), statistics surgery and AdaMerging (task- and layer-wise).

Both runs go through tests/ddp_driver.py, which walks every configuration in one process
group. The engine gives each process whole batches of the single-process batching and splits
each training step's global batch, so the only differences are floating-point: gradients
summed in another order (DDP's all-reduce), moments added up per process. Tolerances:

- accuracies: equal up to one test sample per task (a prediction whose top two logits tie
  within rounding could flip; measured: identical);
- trained surgery modules, AdaMerging coefficients, statistics, losses, bias: 1e-5 (fp32
  rounding after a few Adam steps; measured ≲ 1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from ddp_driver import COMMON, CONFIGS  # noqa: E402

DRIVER = Path(__file__).parent / "ddp_driver.py"
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
ATOL = 1e-5
STATE_FILES = {  # what each configuration trains or measures, compared tensor by tensor
    "v1": "surgery.safetensors",
    "v1_online": "surgery.safetensors",
    "v2": "surgery.safetensors",
    "stats": "stats_surgery.safetensors",
}


def _env(cache: Path) -> dict[str, str]:
    # one intra-op thread per process: 2 processes on a 2-core machine, no oversubscription
    return {**os.environ, "MERGELAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _drive(out: Path, cache: Path, trainer: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, str(DRIVER), str(out), str(cache), *trainer],
        capture_output=True,
        text=True,
        env=_env(cache),
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory) -> tuple[Path, Path]:
    """(1-process run dir, 2-process run dir), one subdir per configuration."""
    root = tmp_path_factory.mktemp("ddp")
    _drive(root / "one", tiny_cache, [])  # first: builds the tiny zoo if nobody has
    _drive(root / "two", tiny_cache, DDP)
    return root / "one", root / "two"


def _results(run: Path, name: str) -> dict:
    return json.loads((run / name / "results.json").read_text())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_give_the_one_process_accuracies(runs, name):
    one, two = (_results(r, name) for r in runs)
    assert one["provenance"]["world_size"] == 1 and two["provenance"]["world_size"] == 2
    sample = 100.0 / 64  # one test image of the tiny zoo, in %
    for row_one, row_two in zip(one["table"], two["table"], strict=True):
        assert row_one["method"] == row_two["method"]
        for t in one["tasks"]:
            assert abs(row_one[t] - row_two[t]) <= sample + 1e-9, (name, row_one, row_two)


@pytest.mark.parametrize("name", list(STATE_FILES))
def test_two_processes_train_and_measure_the_same_state(runs, name):
    one, two = (load_file(r / name / STATE_FILES[name]) for r in runs)
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=ATOL, atol=ATOL, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", ["ada_task", "ada_layer"])
def test_adamerging_learns_the_same_coefficients(runs, name):
    one, two = (json.loads((r / name / "adamerging_coefficients.json").read_text()) for r in runs)
    torch.testing.assert_close(
        torch.tensor(two["coefficients"]), torch.tensor(one["coefficients"]), rtol=0, atol=ATOL
    )
    torch.testing.assert_close(
        torch.tensor(two["entropy_history"]),
        torch.tensor(one["entropy_history"]),
        rtol=ATOL,
        atol=0,
    )


def test_online_counts_every_sample_once_across_processes(runs):
    one, two = (_results(r, "v1_online") for r in runs)
    online = [row for row in two["table"] if row["method"].endswith("[online]")]
    assert len(online) == 1 and online == [
        row for row in one["table"] if row["method"].endswith("[online]")
    ]


def test_bias_analysis_is_the_same(runs):
    one, two = (_results(r, "eval")["representation_bias"]["before"] for r in runs)
    assert one["blocks"] == two["blocks"]
    for t in one["per_task"]:
        torch.testing.assert_close(
            torch.tensor(two["per_task"][t]), torch.tensor(one["per_task"][t]), rtol=ATOL, atol=0
        )
    for name in ("bias.png", "projection.png"):
        assert (runs[1] / "eval" / name).is_file()


def test_cli_ddp_writes_once_and_matches_one_process(runs, tiny_cache, tmp_path):
    """``python -m mergelab trainer=ddp trainer.accelerator=cpu trainer.devices=2``: both
    ranks run, rank 0 alone prints the table and writes the results, which match the
    one-process run of the same configuration."""
    from conftest import TINY

    out = tmp_path / "cli"
    args = [*TINY, f"paths.cache_dir={tiny_cache}", *COMMON, *CONFIGS["v1"], *DDP]
    r = subprocess.run(
        [sys.executable, "-m", "mergelab", *args, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        env=_env(tiny_cache),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("individual experts") == 1  # one table, from rank 0
    got = json.loads((out / "results.json").read_text())
    assert got["provenance"]["world_size"] == 2
    want = _results(runs[0], "v1")["accuracy"]
    assert all(abs(got["accuracy"][t] - want[t]) <= 100.0 / 64 + 1e-9 for t in want)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_loss_scale_makes_the_process_average_the_global_mean():
    """A step's global batch of 5 rows split over 2 processes as rows 0::2 and 1::2: DDP
    averages the processes' gradients, so scaled local means must average to the global mean
    (and the scale is exactly 1 on one process)."""
    from mergelab.engine import loss_scale, rank_rows

    rows = torch.tensor([0.5, 2.0, -1.0, 4.0, 3.5])
    shares = [rank_rows(rows, r, 2) for r in range(2)]
    assert [s.tolist() for s in shares] == [[0.5, -1.0, 3.5], [2.0, 4.0]]
    scaled = [s.mean() * loss_scale(len(s), len(rows), 2) for s in shares]
    assert float(sum(scaled) / 2) == pytest.approx(float(rows.mean()))
    assert loss_scale(5, 5, 1) == 1.0 and loss_scale(0, 1, 2) == 0.0


def test_engine_refuses_spawning_strategies_and_resolves_the_device():
    from mergelab.engine import Engine
    from mergelab.errors import ConfigError

    with pytest.raises(ConfigError, match="ddp_spawn"):
        Engine({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    engine = Engine({"accelerator": "cpu", "devices": 1})
    assert engine.device == torch.device("cpu") and engine.world_size == 1
    assert engine.is_global_zero and engine.precision == "32-true"
