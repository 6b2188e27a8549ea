"""Hydra callback: after a ``--multirun``, gather every job's results.json into one
comparison (``comparison.csv`` / ``comparison.json`` in the sweep dir, printed too).

- Jobs are grouped into *sections* by what they were evaluated on — family, backbone, task
  list, model config and precision — and every section shows its OWN baseline rows
  (pretrained, individual experts): a sweep over ``model=`` or ``tasks=`` never mixes them.
- Within a section, jobs that differ only in ``seed`` form one row: per task, average and
  normalised average, the mean ± sample standard deviation (n − 1) over the seeds, with the
  number of seeds (``--multirun seed=0,1,2 merge=ta,ties``: one row per method, n = 3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mergelab.eval import report
from mergelab.files import atomic_write

BASELINE_ROWS = ("pretrained", "individual experts")
STAT_KEYS = ("avg", "normalized")


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's results.json under ``sweep_dir`` (in job order), with its ``job`` name."""
    paths = sorted(
        sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    )
    return [{**json.loads(p.read_text()), "job": p.parent.name} for p in paths]


def without_seeds(node: Any) -> Any:
    """A config with every ``seed`` entry removed (``seed`` and the ``${seed}`` copies in
    the groups), so that jobs differing only in their seed compare equal."""
    if isinstance(node, Mapping):
        return {k: without_seeds(v) for k, v in node.items() if k != "seed"}
    if isinstance(node, list):
        return [without_seeds(v) for v in node]
    return node


def _canon(node: Any) -> str:
    return json.dumps(node, sort_keys=True, default=str)


def _seed(job: Mapping[str, Any]) -> Any:
    return (job.get("config") or {}).get("seed")


def _section_key(job: Mapping[str, Any]) -> tuple:
    cfg = job.get("config") or {}
    return (
        job.get("family"),
        job.get("backbone"),
        tuple(job["tasks"]),
        _canon(without_seeds(cfg.get("model"))),
        _canon((cfg.get("trainer") or {}).get("precision")),
    )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(method: str, samples: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """One comparison row from the per-seed rows of one method: mean and std per column."""
    row: dict[str, Any] = {
        "method": method,
        "n_seeds": len(samples),
        "seeds": [s["seed"] for s in samples],
        "jobs": [s["job"] for s in samples],
    }
    for col in [*tasks, *STAT_KEYS]:
        vals = [s["row"][col] for s in samples if s["row"].get(col) is not None]
        if len(vals) != len(samples):
            row[col], row[f"{col}_std"] = None, None
            continue
        mean, std = _mean_std([float(v) for v in vals])
        row[col], row[f"{col}_std"] = round(mean, 2), None if std is None else round(std, 2)
    return row


def sections(jobs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group the jobs into sections (see the module docstring); each with its baseline rows
    first, then one row per method (seeds aggregated), in order of first appearance."""
    grouped: dict[tuple, list[Mapping[str, Any]]] = {}
    for job in jobs:
        grouped.setdefault(_section_key(job), []).append(job)
    out = []
    for key, members in grouped.items():
        family, backbone, tasks = key[0], key[1], list(key[2])
        baseline: dict[str, dict[Any, dict]] = {name: {} for name in BASELINE_ROWS}
        methods: dict[tuple, list[dict[str, Any]]] = {}
        configs: dict[tuple, dict[str, Any]] = {}
        for job in members:
            seed = _seed(job)
            for row in job["table"]:
                if row["method"] in BASELINE_ROWS:  # one sample per seed (shared rows)
                    baseline[row["method"]].setdefault(
                        seed, {"seed": seed, "job": job["job"], "row": row}
                    )
                    continue
                gkey = (row["method"], _canon(without_seeds(job.get("config"))))
                methods.setdefault(gkey, []).append({"seed": seed, "job": job["job"], "row": row})
                configs[gkey] = without_seeds(job.get("config") or {})
        rows = [
            aggregate(name, list(samples.values()), tasks)
            for name, samples in baseline.items()
            if samples
        ]
        names = _distinct_names(list(methods), configs)
        rows += [aggregate(names[g], samples, tasks) for g, samples in methods.items()]
        out.append({"family": family, "backbone": backbone, "tasks": tasks, "rows": rows})
    return out


def _distinct_names(keys: list[tuple], configs: Mapping[tuple, Mapping[str, Any]]) -> dict:
    """Row names: the method label, plus the config entries that tell apart groups sharing
    a label (e.g. a sweep over ``trainer.precision``, which labels do not show)."""
    names = {}
    for key in keys:
        same = [k for k in keys if k[0] == key[0]]
        if len(same) == 1:
            names[key] = key[0]
            continue
        flat = {k: _flatten(configs[k]) for k in same}
        paths = sorted({p for f in flat.values() for p in f})
        differ = [p for p in paths if len({_canon(f.get(p)) for f in flat.values()}) > 1]
        names[key] = f"{key[0]} [{', '.join(f'{p}={flat[key].get(p)}' for p in differ)}]"
    return names


def write_comparison(sweep_dir: Path, secs: list[dict[str, Any]]) -> None:
    """``comparison.json`` (the sections, and every row flat with its section) and
    ``comparison.csv`` (one line per row: mean columns, ``<col>_std`` columns, n_seeds)."""
    all_tasks = list(dict.fromkeys(t for s in secs for t in s["tasks"]))
    flat_rows = [
        {"family": s["family"], "backbone": s["backbone"], "section_tasks": s["tasks"], **r}
        for s in secs
        for r in s["rows"]
    ]
    atomic_write(
        sweep_dir / "comparison.json",
        json.dumps({"tasks": all_tasks, "sections": secs, "rows": flat_rows}, indent=2),
    )
    cols = ["family", "backbone", "tasks", "method", "n_seeds", "seeds"]
    for c in [*all_tasks, *STAT_KEYS]:
        cols += [c, f"{c}_std"]
    lines = []
    for s in secs:
        for r in s["rows"]:
            line = {c: r.get(c) for c in cols}
            line.update(
                family=s["family"],
                backbone=s["backbone"],
                tasks="+".join(s["tasks"]),
                seeds=" ".join(str(x) for x in r["seeds"]),
            )
            lines.append(line)
    atomic_write(sweep_dir / "comparison.csv", report.csv_text(cols, lines))


def print_comparison(sweep_dir: Path, secs: list[dict[str, Any]]) -> None:
    for s in secs:
        seeds = sorted({n for r in s["rows"] for n in [r["n_seeds"]]})
        n = f" · mean ± std over {'/'.join(map(str, seeds))} seeds" if max(seeds) > 1 else ""
        title = f"mergelab sweep · {s['family']}/{s['backbone']} · {len(s['tasks'])} tasks{n}"
        report.print_table(title, s["tasks"], s["rows"], spread=True)
    print(f"comparison table: {sweep_dir / 'comparison.csv'}")


class ComparisonTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = load_jobs(sweep_dir)
        if not jobs:
            return
        secs = sections(jobs)
        write_comparison(sweep_dir, secs)
        print_comparison(sweep_dir, secs)
