"""The run's report: a rich table on the terminal, ``results.json`` + ``results.csv`` in the
run dir (written atomically), and the same numbers sent to every configured logger."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mergelab.files import atomic_write


def average(row: dict[str, float]) -> float:
    return sum(row.values()) / len(row) if row else float("nan")


def normalized(row: dict[str, float], experts: dict[str, float]) -> float:
    """Mean over tasks of acc_merged / acc_expert (×100), as in the merging papers."""
    vals = [row[t] / experts[t] for t in row if t in experts and experts[t] > 0]
    return 100.0 * sum(vals) / len(vals) if vals else float("nan")


def build_rows(tasks: list[str], rows: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Table rows: one per method label with per-task accuracy, average and normalised avg."""
    experts = rows.get("individual experts", {})
    out = []
    for label, accs in rows.items():
        out.append(
            {
                "method": label,
                **{t: round(accs[t], 2) for t in tasks if t in accs},
                "avg": round(average({t: accs[t] for t in tasks if t in accs}), 2),
                "normalized": round(normalized(accs, experts), 2) if experts else None,
            }
        )
    return out


def to_csv(
    tasks: list[str], table: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> str:
    extra = extra or {}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*extra.keys(), "method", *tasks, "avg", "normalized"])
    w.writeheader()
    for row in table:
        w.writerow({**extra, **row})
    return buf.getvalue()


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    return buf.getvalue()


def _cell(row: dict[str, Any], key: str, spread: bool) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    std = row.get(f"{key}_std") if spread else None
    return f"{value:.1f} ± {std:.1f}" if std is not None else f"{value:.1f}"


def print_table(
    title: str, tasks: list[str], table: list[dict[str, Any]], spread: bool = False
) -> None:
    """The results table on the terminal. ``spread``: rows aggregated over seeds show
    "mean ± std" and a column with the number of seeds."""
    from rich.console import Console
    from rich.table import Table

    seeds = spread and any(row.get("n_seeds", 1) > 1 for row in table)
    t = Table(title=title, show_lines=False)
    t.add_column("method", style="bold")
    if seeds:
        t.add_column("n", justify="right")
    for task in tasks:
        t.add_column(task, justify="right")
    t.add_column("avg", justify="right", style="bold")
    t.add_column("norm.", justify="right")
    for row in table:
        cells = [_cell(row, k, spread) for k in [*tasks, "avg", "normalized"]]
        t.add_row(row["method"], *([str(row.get("n_seeds", 1))] if seeds else []), *cells)
    width = (22 if seeds else 14) * (len(tasks) + 3)
    Console(width=max(120, width)).print(t)


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """``results.json`` and ``results.csv``, each written atomically."""
    tasks = results["tasks"]
    atomic_write(out_dir / "results.json", json.dumps(results, indent=2, default=str))
    extra = {
        "family": results["family"],
        "backbone": results["backbone"],
        "merge": results["merge"],
        "surgery": results["surgery"],
    }
    atomic_write(out_dir / "results.csv", to_csv(tasks, results["table"], extra))


def log_to_loggers(
    loggers: list, results: dict[str, Any], config: dict, images: dict[str, Path]
) -> None:
    """Metrics, config, the results table and plots to every logger that supports them."""
    merged = results["table"][-1]
    metrics = {f"acc/{t}": merged[t] for t in results["tasks"] if t in merged}
    metrics["acc/avg"] = merged["avg"]
    if merged.get("normalized") is not None:
        metrics["acc/normalized"] = merged["normalized"]
    geometry = results.get("task_vectors") or {}
    for name in ("median_ratio", "mean_cosine"):
        if geometry.get(name) is not None:
            metrics[f"task_vectors/{name}"] = geometry[name]
    columns = ["method", *results["tasks"], "avg", "normalized"]
    data = [[row.get(c) for c in columns] for row in results["table"]]
    for lg in loggers:
        lg.log_hyperparams(config)
        lg.log_metrics(metrics)
        if hasattr(lg, "log_table"):
            lg.log_table(key="results", columns=columns, data=data)
        if hasattr(lg, "log_image"):
            for key, path in images.items():
                if Path(path).exists():
                    lg.log_image(key=key, images=[str(path)])
        lg.save()
