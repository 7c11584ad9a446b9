"""Logs: off a terminal no carriage-return frames, one line per stage, progress at most every INTERVAL s."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sauce_export import progress
from sauce_export.progress import Lines

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["collect", "train-sae", "select", "calibrate", "fold", "export", "verify"]


def _run(recipe: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`sauce-export run` with stdout and stderr both pipes, as in CI or `make demo > log 2>&1`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sauce_export.cli", *flags, "run", str(recipe), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr  # 1: a gate failed on the untrained tiny model
    return done


@pytest.mark.slow
def test_log_has_stage_lines_and_no_frames(tmp_path: Path, small_recipe: dict) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe))
    first = _run(recipe, tmp_path / "run")
    assert "\r" not in first.stdout + first.stderr
    log = first.stderr.splitlines()
    for stage in STAGES:  # other lines are progress lines (a bar may share a stage's name)
        (line,) = [x for x in log if x.startswith(f"{stage}: done in ")]
        assert line.endswith(" s"), line
    assert "sauce-export" not in first.stderr  # no warning or error text on a clean run
    again = _run(recipe, tmp_path / "run")  # every stage reused: one line each, said so
    assert sorted(again.stderr.splitlines()) == sorted(f"{s}: reused from an earlier run" for s in STAGES)
    quiet = _run(recipe, tmp_path / "run", "--quiet")
    assert quiet.stderr == "" and quiet.stdout == again.stdout


def test_lines_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    counter = Lines(total=1000, desc="collect", initial=0, unit="it", stream=stream)
    for _ in range(1000):
        counter.update()
    assert stream.getvalue() == ""  # far below INTERVAL: nothing
    monkeypatch.setattr(progress, "INTERVAL", 0.02)
    counter.set_postfix(loss="0.5")
    time.sleep(0.03)
    counter.update(500)
    counter.update()  # within the new interval: no second line
    assert stream.getvalue().splitlines() == ["collect: 1500/1000 (150%), 0 s, loss=0.5"]
