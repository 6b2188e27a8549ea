"""The sweep comparison: each job's own tasks and baseline rows, mean ± std over seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mergelab.eval.sweep import load_jobs, print_comparison, sections, write_comparison


def fake_job(
    sweep: Path,
    job: int,
    *,
    seed: int = 0,
    tasks=("a", "b"),
    family: str = "embedded",
    backbone: str = "vit",
    pretrained=(40.0, 50.0),
    experts=(90.0, 100.0),
    label: str = "ties",
    merged=(60.0, 70.0),
    model: dict | None = None,
    precision: str = "32-true",
    extra_rows: dict | None = None,
) -> None:
    def row(method, accs):
        accs = dict(zip(tasks, accs))
        avg = sum(accs.values()) / len(accs)
        norm = 100 * sum(accs[t] / e for t, e in zip(tasks, experts)) / len(tasks)
        return {"method": method, **accs, "avg": avg, "normalized": norm}

    table = [row("pretrained", pretrained), row("individual experts", experts), row(label, merged)]
    for name, accs in (extra_rows or {}).items():
        table.append(row(name, accs))
    res = {
        "family": family,
        "backbone": backbone,
        "tasks": list(tasks),
        "label": label,
        "table": table,
        "config": {
            "seed": seed,
            "model": {"name": backbone, "seed": seed, **(model or {})},
            "merge": {"k": 0.2},
            "surgery": {"seed": seed},
            "trainer": {"precision": precision},
        },
    }
    d = sweep / str(job)
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))


def rows_by_method(section):
    return {r["method"]: r for r in section["rows"]}


def test_each_model_keeps_its_own_baselines(tmp_path):
    fake_job(tmp_path, 0, family="embedded", backbone="vit-a", pretrained=(40, 50))
    fake_job(tmp_path, 1, family="task_vectors", backbone="ViT-B-32", pretrained=(10, 20))
    secs = sections(load_jobs(tmp_path))
    assert [(s["family"], s["backbone"]) for s in secs] == [
        ("embedded", "vit-a"),
        ("task_vectors", "ViT-B-32"),
    ]
    assert rows_by_method(secs[0])["pretrained"]["a"] == 40.0
    assert rows_by_method(secs[1])["pretrained"]["a"] == 10.0
    assert [r["method"] for r in secs[1]["rows"]] == ["pretrained", "individual experts", "ties"]


def test_each_task_list_keeps_its_own_tasks_and_baselines(tmp_path):
    fake_job(tmp_path, 0, tasks=("a", "b"), pretrained=(40, 50), experts=(90, 100))
    fake_job(tmp_path, 1, tasks=("c",), pretrained=(33,), experts=(66,), merged=(44,))
    secs = sections(load_jobs(tmp_path))
    assert [s["tasks"] for s in secs] == [["a", "b"], ["c"]]
    c = rows_by_method(secs[1])
    assert c["pretrained"]["c"] == 33.0 and "a" not in c["pretrained"]
    assert c["ties"]["normalized"] == pytest.approx(100 * 44 / 66, abs=0.01)


def test_a_changed_zoo_config_is_its_own_section(tmp_path):
    fake_job(tmp_path, 0, model={"pretrain": {"steps": 10}}, pretrained=(40, 50))
    fake_job(tmp_path, 1, model={"pretrain": {"steps": 99}}, pretrained=(45, 55))
    secs = sections(load_jobs(tmp_path))
    assert [rows_by_method(s)["pretrained"]["a"] for s in secs] == [40.0, 45.0]


def test_seeds_give_mean_and_sample_std(tmp_path):
    job = 0
    for seed, merged in zip((0, 1, 2), ((60, 70), (62, 70), (64, 70))):
        fake_job(tmp_path, job, seed=seed, label="ties", merged=merged)
        fake_job(tmp_path, job + 1, seed=seed, label="task_arithmetic", merged=(50, 52 + seed))
        job += 2
    secs = sections(load_jobs(tmp_path))
    assert len(secs) == 1  # the seed-dependent config entries do not split the section
    rows = rows_by_method(secs[0])
    assert list(rows) == ["pretrained", "individual experts", "ties", "task_arithmetic"]
    ties = rows["ties"]
    assert ties["n_seeds"] == 3 and ties["seeds"] == [0, 1, 2]
    assert (ties["a"], ties["a_std"]) == (62.0, 2.0)  # 60, 62, 64
    assert (ties["b"], ties["b_std"]) == (70.0, 0.0)
    assert (ties["avg"], ties["avg_std"]) == (66.0, 1.0)  # 65, 66, 67
    assert rows["task_arithmetic"]["b_std"] == 1.0
    base = rows["pretrained"]
    assert base["n_seeds"] == 3 and base["a"] == 40.0 and base["a_std"] == 0.0


def test_one_seed_has_no_std(tmp_path):
    fake_job(tmp_path, 0)
    row = rows_by_method(sections(load_jobs(tmp_path))[0])["ties"]
    assert row["n_seeds"] == 1 and row["a"] == 60.0 and row["a_std"] is None


def test_rows_differing_in_config_but_not_label_are_told_apart(tmp_path):
    fake_job(tmp_path, 0, model={}, extra_rows={})
    res = json.loads((tmp_path / "0" / "results.json").read_text())
    res["config"]["merge"]["k"] = 0.5  # e.g. a sweep that the label does not show
    d = tmp_path / "1"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    names = [r["method"] for r in sections(load_jobs(tmp_path))[0]["rows"]]
    assert names[2:] == ["ties [merge.k=0.2]", "ties [merge.k=0.5]"]


def test_outputs_json_csv_and_printed_table(tmp_path, capsys):
    for seed in (0, 1):
        fake_job(
            tmp_path,
            seed,
            seed=seed,
            merged=(60 + 2 * seed, 70),
            extra_rows={"ties [online]": (1, 2)},
        )
    fake_job(tmp_path, 2, tasks=("c",), pretrained=(33,), experts=(66,), merged=(44,))
    secs = sections(load_jobs(tmp_path))
    write_comparison(tmp_path, secs)
    print_comparison(tmp_path, secs)
    out = capsys.readouterr().out
    assert "61.0 ± 1.4" in out and "mean ± std over 2 seeds" in out
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert len(data["sections"]) == 2 and data["tasks"] == ["a", "b", "c"]
    lines = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [r["method"] for r in lines] == [
        "pretrained",
        "individual experts",
        "ties",
        "ties [online]",
        "pretrained",
        "individual experts",
        "ties",
    ]
    ties = lines[2]
    assert ties["a"] == "61.0" and ties["a_std"] == "1.41" and ties["n_seeds"] == "2"
    assert ties["seeds"] == "0 1" and ties["tasks"] == "a+b" and ties["c"] == ""
    assert lines[6]["c"] == "44.0" and lines[6]["tasks"] == "c"


def test_cli_multirun_over_seeds(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("seed=0,1", "analysis.bias=false", run_dir=sweep, multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [row["method"] for row in lines] == [
        "pretrained",
        "individual experts",
        "task_arithmetic",
    ]
    assert all(row["n_seeds"] == "2" and row["seeds"] == "0 1" for row in lines)
    assert lines[2]["avg_std"] != ""  # a spread over the two seeds is reported
    assert "±" in r.stdout and "over 2 seeds" in r.stdout
