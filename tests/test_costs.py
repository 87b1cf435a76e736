"""Device time and money per row and per run, and budgets that stop a run cleanly (catalogen/run/costs.py).

One module-scoped set of tiny runs serves most tests: a run through the CLI with a budget of 3.6 ms
of device time (reached by the first shard that finishes), the next run of the same folder that
completes it, and an unbudgeted run of the same catalog in another folder to compare with.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from click.testing import Result
from conftest import FAST, prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.config import BudgetSettings, ConfigError, load_config
from catalogen.run.costs import (Meter, amount, budget_line, check_budget, given, price, row_totals, spending_lines,
                                 with_device_time)
from catalogen.stage import Device
from catalogen.storage.store import RunStore

PRICE = 360.0  # per device-hour: 0.1 a device-second, so cents mean something on a tiny run
BUDGET_HOURS = 0.000001  # 3.6 ms: the first shard to finish spends more
ROWS = 3
SETTINGS = {**FAST, "rows_per_shard": 1, "costs.cpu": PRICE}
TIMINGS = re.compile(r"(^|_)(seconds|finished_at|cost)$")  # columns that differ from run to run
LINE = re.compile(r"budget reached: (\S+) of (\S+) device-hours; (\d+) of (\d+) rows pending; run again to continue")


def cli(*args: str) -> Result:
    """The CLI in this process: its Prefect API and the models it loads serve every run here."""
    return CliRunner().invoke(app, list(args), terminal_width=200)


def status_output(folder: Path) -> str:
    result = cli("status", str(folder))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("costs")
    catalog = write_catalog(tmp / "catalog.parquet", prompts(ROWS))
    budgeted, reference = tmp / "budgeted", tmp / "reference"
    flags = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    first = cli("run", str(catalog), "--out", str(budgeted), *flags, "--set", f"budget.device_hours={BUDGET_HOURS}")
    found = {"first": first, "first_results": pd.read_parquet(budgeted / "results.parquet"),
             "first_status": status_output(budgeted),
             "first_info": json.loads((budgeted / "run.json").read_text()),
             "first_parts": [len(pd.read_parquet(f)) for f in RunStore(budgeted).part_files("generate")]}
    # The next run of the folder, with room to finish (its other settings as recorded), and a run
    # that never had a budget.
    found["second"] = cli("run", str(catalog), "--out", str(budgeted), "--set", "budget.device_hours=1")
    found["reference"] = cli("run", str(catalog), "--out", str(reference), *flags)
    found.update(folder=budgeted, reference_folder=reference, catalog=catalog)
    return found


def test_a_budget_stops_at_a_shard_boundary_with_its_line_and_exit_0(runs):
    first, results = runs["first"], runs["first_results"]
    assert first.exit_code == 0, first.output
    match = LINE.search(first.stdout)
    assert match, first.output
    done = results[results.status == "ok"]
    pending = int((results.status == "pending").sum())
    assert set(results.status) == {"ok", "pending"} and 1 <= len(done) < ROWS  # stopped, at a shard of 1 row
    assert match.groups() == (amount(done.device_seconds.sum() / 3600), given(BUDGET_HOURS), str(pending), str(ROWS))
    assert given(BUDGET_HOURS) == "0.000001"
    # what status says is pending is what the line said
    row = re.search(r"generate\D+" + r"\D+".join([r"(\d+)"] * 6), runs["first_status"])
    assert row and [int(n) for n in row.groups()] == [len(done), 0, 0, 0, 0, pending], runs["first_status"]
    invocation = runs["first_info"]["invocations"][-1]
    assert invocation["costs"]["budget_reached"] == "device_hours"
    assert "stopped by budget.device_hours" in runs["first_status"]
    assert runs["first_parts"] == [1] * len(done)  # whole shards of one row, one part each


def test_the_next_run_completes_the_catalog_as_an_unbudgeted_run_would(runs):
    second = runs["second"]
    assert second.exit_code == 0 and runs["reference"].exit_code == 0, second.output
    assert f"{ROWS} rows: {ROWS} ok, 0 failed, 0 skipped\n" in second.stdout and "budget reached" not in second.stdout
    pending = int((runs["first_results"].status == "pending").sum())
    invocations = json.loads((runs["folder"] / "run.json").read_text())["invocations"]
    assert invocations[-1]["pending"] == {"generate": pending}  # it continued where the first stopped
    ours = pd.read_parquet(runs["folder"] / "results.parquet").set_index("id")
    theirs = pd.read_parquet(runs["reference_folder"] / "results.parquet").set_index("id").loc[ours.index]
    kept = [c for c in theirs.columns if not TIMINGS.search(c)]
    assert "image_sha256" in kept and "generate_image_sha256" in kept
    pd.testing.assert_frame_equal(ours[kept], theirs[kept])
    for sha, path in zip(ours.image_sha256, ours.image_path):
        assert (runs["folder"] / path).exists() and sha == theirs.set_index("image_path").loc[path, "image_sha256"]


def test_every_rows_cost_is_its_device_seconds_at_the_price(runs):
    for folder in (runs["folder"], runs["reference_folder"]):
        results = pd.read_parquet(folder / "results.parquet")
        assert (results.generate_device_seconds > 0).all()
        assert results.generate_cost.tolist() == pytest.approx((results.generate_device_seconds * PRICE / 3600).tolist(),
                                                               rel=1e-12)
        assert results.device_seconds.tolist() == results.generate_device_seconds.tolist()  # one stage: the total
        assert results.cost.tolist() == results.generate_cost.tolist()
    # the first shard held the device while its model loaded: more than its own work took
    assert (results.generate_device_seconds >= results.generate_seconds).all()


def test_totals_in_run_json_status_and_the_report_agree_to_the_cent(runs):
    folder = runs["folder"]
    results = pd.read_parquet(folder / "results.parquet")
    info = json.loads((folder / "run.json").read_text())
    recorded = [i["costs"] for i in info["invocations"]]
    assert [c["rows"] for c in recorded] == [int((runs["first_results"].status == "ok").sum()),
                                             int((runs["first_results"].status == "pending").sum())]
    assert sum(c["cost"] for c in recorded) == pytest.approx(results.cost.sum(), abs=1e-9)
    assert sum(c["device_seconds"] for c in recorded) == pytest.approx(results.device_seconds.sum(), abs=1e-9)
    assert recorded[-1]["stages"]["generate"]["cpu"]["cost"] == pytest.approx(recorded[-1]["cost"])
    cents = f"{results.cost.sum():,.2f}"
    status = status_output(folder)
    assert f"spent by all runs: {results.device_seconds.sum():,.1f} device-seconds" in status
    assert re.search(rf"spent by all runs: .* on {ROWS} stage-rows, cost {re.escape(cents)}$", status, re.M), status
    last = recorded[-1]
    assert f"spent by the last run: {last['device_seconds']:,.1f} device-seconds" in status
    assert status.count("cost ") == 2 and f"cost {last['cost']:,.2f}" in status
    report = (folder / "report.html").read_text()
    assert re.search(rf'id="spent-cost">{re.escape(cents)}<', report)
    assert re.search(rf'id="per-ok-cost">{re.escape(f"{results.cost.sum() / ROWS:,.2f}")}<', report)
    assert f'id="spent-seconds">{results.device_seconds.sum():,.1f} s<' in report
    assert '<svg id="chart-stages"' in report and '<svg id="chart-rows"' in report
    assert f"device seconds per row ({ROWS} rows)" in report
    assert "http" not in re.search(r'<svg id="chart-stages".*?</svg>', report, re.S).group(0)


def test_without_costs_every_cost_is_null_not_0():
    """A part as the runner fills it, its rows summed as the results do, and status's line."""
    part = pa.table({"device": ["cpu"] * 2, "device_seconds": pa.nulls(2, pa.float64()), "cost": pa.nulls(2, pa.float64())})
    free = with_device_time(part, 3.0, None)
    assert free.column("device_seconds").to_pylist() == [1.5, 1.5] and free.column("cost").null_count == 2
    totals = row_totals({"generate": free, "caption": with_device_time(part, 1.0, None)})
    assert totals["device_seconds"].to_pylist() == [2.0, 2.0] and totals["cost"].null_count == 2
    meter = Meter(BudgetSettings(), ["generate"])
    meter.add("generate", free)
    assert meter.totals()["cost"] is None
    info = {"invocations": [{"costs": meter.totals()}]}
    assert spending_lines(info) == ["spent by the last run: 3.0 device-seconds (0.000833 device-hours) on 2 stage-rows, "
                                    "cost unknown (no `costs:` price)",
                                    "spent by all runs: 3.0 device-seconds (0.000833 device-hours) on 2 stage-rows, "
                                    "cost unknown (no `costs:` price)"]


# --- settings refused before any work -----------------------------------------------------------


def test_a_cost_budget_without_prices_is_refused_before_work(tmp_path: Path):
    catalog = write_catalog(tmp_path / "c.parquet", prompts(1))
    result = cli("run", str(catalog), "--out", str(tmp_path / "out"), "--set", "budget.cost=5")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert errors == ["error: budget.cost: needs prices per device-hour in `costs:` (e.g. costs: {cpu: 0.05}), "
                      "none given (from --set budget.cost=5)"], result.stderr
    assert not (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "results.parquet").exists()


def test_a_cost_budget_with_a_device_left_unpriced_is_refused():
    cfg = load_config(None, {"costs": {"cuda": 2.1}, "budget.cost": 1})
    with pytest.raises(ConfigError, match=r"^budget\.cost: no price in `costs:` for cpu "):
        check_budget(cfg, [Device("cpu", "cpu")])
    gpu = Device("cuda:0", "gpu-0", "NVIDIA H100 80GB HBM3")
    check_budget(cfg, [gpu])  # priced by its kind
    check_budget(load_config(None, {"costs": {"NVIDIA H100 80GB HBM3": 3.2}, "budget.cost": 1}), [gpu])  # by its name


@pytest.mark.parametrize("setting, value, said", [
    ("budget.device_hours", -1, "budget.device_hours: Input should be greater than 0"),
    ("budget.cost", ".nan", "budget.cost: Input should be a finite number"),
    ("budget.hours", 1, "budget.hours: unknown setting; did you mean 'budget.wall_hours'?"),
    ("costs.cpu", -0.5, "costs.cpu: Input should be greater than or equal to 0"),
])
def test_bad_budget_and_cost_values_are_refused_naming_the_setting(setting, value, said):
    with pytest.raises(ConfigError) as refused:
        load_config(None, {setting: value if value != ".nan" else math.nan})
    assert said in str(refused.value)


# --- the arithmetic, at its edges ---------------------------------------------------------------


def part(device_seconds: list[float], cost: list[float]) -> pa.Table:
    n = len(device_seconds)
    return pa.table({"device": ["cpu"] * n, "device_seconds": device_seconds, "cost": cost})


def test_the_budget_line_reads_as_the_issue_shows():
    assert budget_line("device_hours", 3.98, 4, 1204, 10_000) == \
        "budget reached: 3.98 of 4 device-hours; 1,204 of 10,000 rows pending; run again to continue"
    assert budget_line("cost", 12.004, 12.5, 1, 2) == "budget reached: 12 of 12.5 cost; 1 of 2 rows pending; run again to continue"
    assert budget_line("wall_hours", 8.0, 8, 0, 1).startswith("budget reached: 8 of 8 wall-hours;")
    assert [amount(v) for v in (0.00123456, 0.5, 99.95, 1234.4)] == ["0.00123", "0.5", "100", "1,234"]


def test_a_shard_starts_unless_it_would_cross_the_budget_by_more_than_its_own_share():
    """0.25 a row measured; 2 rows spent, a shard of 2 rows in flight: 1.0 expected before the next
    shard of 2 rows (0.5) starts. It may overshoot by its own share: at a budget of 1.0 it starts, below not."""
    at_edge = Meter(BudgetSettings(cost=1.0), ["generate"])
    at_edge.add("generate", part([1.0, 1.0], [0.25, 0.25]))
    assert at_edge.check([(2, 0)], starting=2) is None
    below = Meter(BudgetSettings(cost=0.9999), ["generate"])
    below.add("generate", part([1.0, 1.0], [0.25, 0.25]))
    assert below.check([(2, 0)], starting=2) == "cost"
    assert below.reached == "cost"
    # spent: reached whatever starts
    spent = Meter(BudgetSettings(device_hours=2 / 3600), ["generate"])
    spent.add("generate", part([1.0, 1.0], [0.0, 0.0]))
    assert spent.check() == "device_hours"
    # nothing measured yet: the first shards start
    assert Meter(BudgetSettings(cost=0.01), ["generate"]).check([(64, 0)], starting=64) is None


def test_wall_hours_count_from_the_invocations_start():
    meter = Meter(BudgetSettings(wall_hours=1.0), ["generate"])
    assert meter.check() is None
    meter.started -= 3600.0
    assert meter.check() == "wall_hours" and meter.spent("wall_hours") >= 1.0


def test_a_devices_name_wins_over_its_kind():
    costs = {"cuda": 2.10, "NVIDIA H100 80GB HBM3": 3.20, "cpu": 0.05}
    assert price(costs, Device("cuda:0", "gpu-a", "NVIDIA H100 80GB HBM3")) == 3.20
    assert price(costs, Device("cuda:1", "gpu-b", "NVIDIA A10G")) == 2.10
    assert price(costs, Device("cpu", "cpu")) == 0.05
    assert price({"cuda": 2.10}, Device("cpu", "cpu")) is None
    # the price of the device that ran it: 36 device-seconds on the H100 cost 0.032
    assert with_device_time(pa.table({"device_seconds": [None, None], "cost": [None, None]},
                                     schema=pa.schema([("device_seconds", pa.float64()), ("cost", pa.float64())])),
                            72.0, 3.20).column("cost").to_pylist() == pytest.approx([0.032, 0.032])
