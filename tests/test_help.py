"""First contact: `mergelab --help` says what mergelab is, lists the config groups with their
choices, and shows how to override."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "mergelab" / "conf"


@pytest.fixture(scope="module")
def help_text() -> str:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mergelab", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_help_opens_with_what_mergelab_is(help_text):
    first = help_text.strip().splitlines()[0]
    assert first.startswith("mergelab — multi-task model merging")
    assert "powered by Hydra" not in help_text


def test_help_lists_every_group_and_its_choices(help_text):
    groups = help_text.index("== Config groups ==")
    overrides = help_text.index("== Overrides ==")
    assert groups < overrides
    listed = {
        line.split(":", 1)[0]: {c.strip() for c in line.split(":", 1)[1].split(",")}
        for line in help_text[groups:overrides].splitlines()
        if ":" in line and not line.startswith(("Choose", "=="))
    }
    for group in ("model", "tasks", "merge", "surgery", "trainer", "logger"):
        on_disk = {p.stem for p in (CONF / group).glob("*.yaml")}
        assert listed[group] == on_disk, group
    assert "hydra/launcher" not in listed  # Hydra's own groups stay in --hydra-help


def test_help_shows_how_to_override(help_text):
    tail = help_text[help_text.index("== Overrides ==") :]
    assert "merge=ties surgery=v2 rank=16" in tail and "--multirun" in tail
    assert "$MERGELAB_CACHE" in tail and "--hydra-help" in tail
