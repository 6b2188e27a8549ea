"""Hydra callback: after a ``--multirun``, gather every job's results.json into one
comparison table (``comparison.csv`` / ``comparison.json`` in the sweep dir, printed too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mergelab.eval import report


def collect(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows, tasks = [], []
    for path in sorted(
        sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        res = json.loads(path.read_text())
        tasks = tasks or res["tasks"]
        # the run's own rows (merged, and online when present), after its two baseline rows
        for row in res["table"][2:]:
            rows.append({**row, "job": path.parent.name})
        if not any(r["method"] == "individual experts" for r in rows):
            rows[:0] = [{**base, "job": "-"} for base in res["table"][:2]]
    return tasks, rows


class ComparisonTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        tasks, rows = collect(sweep_dir)
        if not rows:
            return
        report.atomic_write(
            sweep_dir / "comparison.json", json.dumps({"tasks": tasks, "rows": rows}, indent=2)
        )
        report.atomic_write(
            sweep_dir / "comparison.csv",
            report.to_csv(tasks, [{k: v for k, v in r.items() if k != "job"} for r in rows]),
        )
        report.print_table(f"mergelab sweep · {sweep_dir}", tasks, rows)
        print(f"comparison table: {sweep_dir / 'comparison.csv'}")
