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
    monkeypatch.setenv("CATALOGEN_MEASUREMENTS", str(tmp_path / "measurements"))  # this test's shared store
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
    assert stage_line(first.output, "renditions").endswith(  # a 2000 px JPEG and a 2048 px WebP per row, at most
        f"disk about {2 * (2000 * 2000 * 0.25 + 2048 * 2048 * 0.2) / 1e6:.1f} MB (estimate, rough bound, width x height x "
        "bytes per pixel of each format)")

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
    a_sibling_folder_prices_from_the_shared_store(tmp_path, out, throughput)

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


def a_sibling_folder_prices_from_the_shared_store(tmp_path: Path, measured_in: Path, throughput: dict) -> None:
    """A dry run in a new folder beside `measured_in` prices the same rows from the shared store: its
    numbers are the store's times the rows, its disk (renditions included) what the run wrote, within 30%."""
    stages = (*STAGES, "renditions")
    store = {stage: json.loads(next((tmp_path / "measurements").glob(f"{stage}-*.json")).read_text()) for stage in stages}
    for stage, m in store.items():
        assert (m["source"], m["folder"], m["rows"]) == ("run", str(measured_in), 2), m
        assert m["key_hash"] == throughput[stage]["cpu"]["key_hash"] and m["seconds_per_row"] > 0
    assert store["renditions"]["files_per_row"] == 2 and store["remove_bg"]["files_per_row"] == 2  # cut-out + canvas
    leased = [store[s] for s in STAGES]  # renditions takes no device lease: no device time
    once, per_row = sum(m["load_seconds"] for m in leased) / 3600, sum(m["seconds_per_row"] for m in leased) / 3600
    hours, money = once + 1.5 * per_row, (once + 2.5 * per_row) * 0.05
    sibling = tmp_path / "sibling"
    command = ["run", "catalogs/demo_photos.parquet", "--config", "configs/photos.yaml", "--out", str(sibling),
               *FEWER_STEPS, "--limit", "2", "--dry-run", "--set", "costs={cpu: 0.05}",
               "--set", f"budget.device_hours={hours!r}", "--set", f"budget.cost={money!r}"]
    result = invoke(*command)
    assert result.exit_code == 0, result.output
    assert not sibling.exists()
    lines = [line.rstrip() for line in result.output.splitlines()]
    day = store["style"]["measured_at"][:10]
    for stage, m in store.items():
        line = lines.index(f"  {stage_line(result.output, stage)}")
        spr, load, size = m["seconds_per_row"], m["load_seconds"], m["bytes_per_row"]
        seconds = spr * 2 / 1 + load
        held = spr * 2 + load if stage != "renditions" else 0.0
        money_part = (f"{held / 3600:.6g} device-hours, cost {held / 3600 * 0.05:.6g} (cpu at 0.05 per device-hour)"
                      if stage != "renditions" else "no device lease: no device time, no cost")
        assert lines[line + 1] == (f"    time {seconds:.6g} s = 2 rows x {spr:.6g} s + {load:.6g} s loading; {money_part}; "
                                   f"disk {size * 2:.6g} bytes = 2 rows x {size:.6g} bytes ({m['files_per_row']:g} files per row)")
        assert lines[line + 2] == f"    from a run on cpu {day} in {measured_in}"
    per_row_hours = sum(m["seconds_per_row"] for m in leased) / 3600
    assert f"budget: {hours:g} device-hours fits 1 of 2 rows (estimate: {once:.6g} once + {per_row_hours:.6g} per row); " \
           "run again to continue" in lines
    assert f"budget: {money:g} cost fits 2 of 2 rows (estimate: {once * 0.05:.6g} once + {per_row_hours * 0.05:.6g} " \
           "per row); the whole run fits" in lines
    estimated = float(re.search(r"disk: about .* of new files \(estimate, ([\d.e+]+) bytes\)", result.output).group(1))
    written = sum(p.stat().st_size for p in measured_in.rglob("*") if p.is_file())  # the same rows: the same bytes
    assert 0.7 * written <= estimated <= 1.3 * written, (estimated, written)
    changed = invoke(*command, "--set", "style.steps=3")  # another key: style's measurement is not reused
    assert "style: 2 rows to do, 2 images to make, time: no measurement yet on cpu" in changed.output, changed.output
    assert "(measured over 2 rows)" in stage_line(changed.output, "remove_bg")  # its own key is unchanged
    assert "budget: cannot say how many rows fit: no measurement yet of style on cpu" in changed.output


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
    monkeypatch.setenv("CATALOGEN_MEASUREMENTS", str(tmp_path / "measurements"))
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
    assert f"calibrated: kept for later dry runs and runs in {tmp_path / 'measurements'}" in result.output
    later = invoke(*command[:-1])  # the next dry run, without --calibrate, prices from the shared store
    assert later.exit_code == 0, later.output
    for stage in (*STAGES, "renditions"):
        stored = json.loads(next((tmp_path / "measurements").glob(f"{stage}-*.json")).read_text())
        assert stored["source"] == "calibrate" and stored["rows"] == 1, stored
        lines = [line.rstrip() for line in later.output.splitlines()]
        line = lines.index(f"  {stage_line(later.output, stage)}")
        assert "on cpu (measured over 1 rows)" in lines[line]
        assert lines[line + 2] == f"    from calibrate on cpu {stored['measured_at'][:10]}"
    assert not out.exists()
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


def test_a_rows_seconds_leave_out_model_loading(tmp_path: Path):
    """generate's safety checker loads inside its first batch, the pipeline before it: neither is a
    row's time (each load is in the load events, and in run.json's throughput, once)."""
    import pyarrow as pa
    from conftest import context, fast_config, plan_table

    from catalogen.models.loading import clear_cache, load_mark, load_seconds_since
    from tasks import STAGES

    plan = plan_table(pa.table(prompts(1)), fast_config(**{"generate.safety_checker": "flag"}), tmp_path / "out")
    clear_cache()
    mark = load_mark()
    started = time.perf_counter()
    out = STAGES["generate"].process(plan.planned["generate"], context(plan, "generate"))
    wall = time.perf_counter() - started
    loads = load_seconds_since(mark)
    assert len(loads) == 2  # the pipeline and the checker, loaded in this call
    assert sum(out.column("seconds").to_pylist()) + sum(loads.values()) <= wall


def test_a_measurement_is_reused_only_under_its_own_key(tmp_path: Path, monkeypatch):
    from conftest import fast_config

    from catalogen.run.measurements import measurement_key, read_measurement, write_measurement

    monkeypatch.setenv("CATALOGEN_MEASUREMENTS", str(tmp_path))
    cfg = fast_config()
    key = measurement_key("generate", cfg, {}, "cpu")
    write_measurement(cfg, key, {"rows": 4, "seconds_per_row": 1.5})
    assert read_measurement(cfg, key)["seconds_per_row"] == 1.5
    for other in (measurement_key("generate", cfg, {}, "cuda:NVIDIA H100 80GB HBM3"),
                  measurement_key("generate", fast_config(**{"generate.steps": 4}), {}, "cpu"),
                  measurement_key("generate", fast_config(**{"generate.width": 64}), {}, "cpu"),
                  measurement_key("generate", fast_config(dtype="bfloat16"), {}, "cpu")):
        assert read_measurement(cfg, other) is None, other


def test_two_runs_writing_one_measurement_at_once_never_tear_it(tmp_path: Path, monkeypatch):
    """Two writers (as two runs' ends) replace one key's file over and over while it is read."""
    import threading

    from conftest import fast_config

    from catalogen.run.measurements import measurement_key, measurement_path, write_measurement

    monkeypatch.setenv("CATALOGEN_MEASUREMENTS", str(tmp_path))
    cfg = fast_config()
    key = measurement_key("generate", cfg, {}, "cpu")

    def write(rows: int) -> None:
        for i in range(200):
            write_measurement(cfg, key, {"rows": rows, "seconds_per_row": i, "pad": "x" * 50_000})

    writers = [threading.Thread(target=write, args=(n,)) for n in (1, 2)]
    for writer in writers:
        writer.start()
    path, reads = measurement_path(cfg, key), 0
    while any(w.is_alive() for w in writers):
        if path.exists():
            found = json.loads(path.read_text())  # never a torn file: always a whole measurement
            assert found["rows"] in (1, 2) and found["key"] == key
            reads += 1
    for writer in writers:
        writer.join()
    assert reads > 0 and json.loads(path.read_text())["seconds_per_row"] == 199
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left
