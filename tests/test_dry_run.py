"""`catalogen run --dry-run` (#6): the checks and plan of a run, priced, with nothing written.

A real tiny-profile run (configs/photos.yaml) between dry runs: the first finds no measurement and
creates no folder; the run then does exactly the rows it announced and records its throughput per
stage and device kind in run.json; the next dry run prices the rest from it and leaves the folder
byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, REPO, cli_env, prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app

STAGES = ("remove_bg", "style", "upscale")
FEWER_STEPS = ["--set", "style.steps=2", "--set", "upscale.steps=2"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under `folder`: content hash and modification time."""
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(folder))] = (digest, stat.st_mtime_ns)
    return found


def stage_line(output: str, stage: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith(f"{stage}: ")]
    assert len(lines) == 1, output
    return lines[0]


def test_dry_run_plans_what_the_run_then_does_and_writes_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    command = ["run", "catalogs/demo_photos.parquet", "--config", "configs/photos.yaml", "--out", str(out), *FEWER_STEPS]

    first = invoke(*command, "--limit", "2", "--dry-run")
    assert first.exit_code == 0, first.output
    assert not out.exists()  # no folder, no run.json, no lock
    assert "a new folder" in first.output and "nothing was written" in first.output
    for stage in STAGES:
        line = stage_line(first.output, stage)
        assert line.startswith(f"{stage}: 2 rows to do, 2 images to make, time: no measurement yet on cpu"), line
    assert "rough bound" in stage_line(first.output, "style")  # its canvas size is planned: width x height x 1.5

    ran = invoke(*command, "--limit", "2")
    assert ran.exit_code == 0, ran.output
    results = pd.read_parquet(out / "results.parquet")
    for stage in STAGES:  # exactly the rows the dry run announced
        assert (results[f"{stage}_status"] == "ok").sum() == 2
    throughput = json.loads((out / "run.json").read_text())["throughput"]
    for stage in STAGES:
        measured = throughput[stage]["cpu"]
        assert measured["rows"] == 2 and measured["seconds_per_row"] > 0 and measured["bytes_per_row"] > 100

    nothing = invoke(*command, "--limit", "2")  # a run with nothing to do keeps the measurements
    assert nothing.exit_code == 0, nothing.output
    assert json.loads((out / "run.json").read_text())["throughput"] == throughput

    before = snapshot(out)
    rest = invoke(*command, "--dry-run")
    assert rest.exit_code == 0, rest.output
    for stage in STAGES:
        line = stage_line(rest.output, stage)
        assert re.match(rf"{stage}: 4 rows to do, 4 images to make, about [\d.]+ (s|min|h) on cpu \(measured over 2 rows\), "
                        r"disk about [\d.]+ [kMG]?B \(estimate, measured by earlier runs\)", line), line
    assert re.search(r"total: about [\d.]+ (s|min|h) of work", rest.output)
    again = invoke(*command, "--limit", "2", "--dry-run")
    assert again.exit_code == 0, again.output
    assert stage_line(again.output, "upscale") == "upscale: 0 rows to do, 0 images to make, nothing to do"
    assert snapshot(out) == before  # byte for byte, times included: nothing written


def test_a_refused_dry_run_creates_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    result = invoke("run", "catalogs/demo_photos.parquet", "--config", "configs/photos.yaml", "--out", str(out),
                    "--set", "style.steps=0", "--dry-run")
    assert result.exit_code == 1, result.output
    assert "style.steps" in result.output
    assert not out.exists()


def test_calibration_times_one_batch_in_a_folder_it_removes(tmp_path: Path, monkeypatch):
    import tempfile

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    one_row = ["--set", "style.batch_size=1", "--set", "upscale.batch_size=1"]  # one batch: one row
    command = ["run", "catalogs/demo_photos.parquet", "--config", "configs/photos.yaml", "--out", str(out),
               *FEWER_STEPS, *one_row, "--dry-run", "--calibrate"]
    scratch = set(Path(tempfile.gettempdir()).glob("catalogen-calibrate-*"))
    result = invoke(*command)
    assert result.exit_code == 0, result.output
    assert "calibrated: one batch of 1 rows run through every stage in a temporary folder, now removed" in result.output
    for stage in STAGES:
        line = stage_line(result.output, stage)
        assert re.match(rf"{stage}: 6 rows to do, 6 images to make, about [\d.]+ (s|min|h) on cpu \(calibrated now on 1 rows\), "
                        r"disk about [\d.]+ [kMG]?B \(estimate, calibrated now\)", line), line
    assert not out.exists()
    assert set(Path(tempfile.gettempdir()).glob("catalogen-calibrate-*")) == scratch
    refused = invoke(*command[:-2], "--calibrate")  # without --dry-run: a usage error
    assert refused.exit_code == 2 and not out.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_calibration_as_it_stops_a_run(tmp_path: Path, signum: int, code: int):
    scratch = tmp_path / "tmp"  # the calibration's temporary folder is made here
    scratch.mkdir()
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(4))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(BIN / "catalogen"), "run", str(catalog), "--out", str(out), "--set", "generate.steps=150",
         "--set", "generate.width=32", "--set", "generate.height=32", "--set", "stop_grace_s=1",
         "--dry-run", "--calibrate"],
        env={**cli_env(), "TMPDIR": str(scratch)}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(scratch.glob("catalogen-calibrate-*/out/run.json")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signum)  # mid-batch, as Ctrl-C or a supervisor's SIGTERM does
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"stopped by {signal.Signals(signum).name} while calibrating" in stderr and "Traceback" not in stderr
    assert "rows to do" not in stdout  # no estimate from a batch that did not finish
    assert not list(scratch.glob("catalogen-calibrate-*")) and not out.exists()
