"""A --multirun frees each job's models before the next job starts (issue 11: a sweep of 19
jobs grew the process to 7 GB).

Every Lightning pass leaves a Trainer ↔ LightningModule reference cycle holding the job's
models, and a failed job's exception keeps its frames; neither is freed by reference
counting. The test runs the sweep with the automatic collector disabled, so that it does not
depend on when the collector's heuristics happen to fire: only the CLI's own end-of-job
release can free the models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import TINY

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, weakref

    import mergelab.pipeline as P
    from mergelab import cli

    made, alive = [], []
    build_model = P.MultiTaskModel
    evaluate = P.evaluate

    def recording(*args, **kwargs):
        alive.append(sum(r() is not None for r in made))  # earlier jobs' models still alive
        model = build_model(*args, **kwargs)
        made.append(weakref.ref(model))
        return model

    def failing_first(*args, **kwargs):  # job 0 fails after its model is built
        if len(made) == 1:
            raise RuntimeError("injected failure")
        return evaluate(*args, **kwargs)

    P.MultiTaskModel, P.evaluate = recording, failing_first
    gc.disable()
    try:
        cli.main()
    except SystemExit:
        pass
    print("ALIVE " + json.dumps(alive))
    """
)


def test_multirun_frees_every_jobs_models_even_a_failed_ones(tiny_cache, tmp_path):
    args = [
        "--multirun",
        *TINY,
        f"paths.cache_dir={tiny_cache}",
        "merge=weight_average,task_arithmetic,ties",
        "surgery=none",
        f"hydra.sweep.dir={tmp_path}",
    ]
    env = {**os.environ, "MERGELAB_CACHE": str(tiny_cache), "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ALIVE ")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    alive = json.loads(lines[-1].removeprefix("ALIVE "))
    assert len(alive) == 3, out.stderr[-3000:]
    # at the start of jobs 1 and 2, no earlier job's model is alive (job 0 failed)
    assert alive == [0, 0, 0]
    assert "injected failure" in out.stderr  # the failed job still reports its error
    assert (tmp_path / "1" / "results.json").is_file() and (
        tmp_path / "2" / "results.json"
    ).is_file()
