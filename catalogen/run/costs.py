"""Device time and money: per row, per invocation, and the budgets that stop a run.

Each stage's part records per row `device_seconds`, the row's share of the time its shard held its
device lease (model loading included: the lease was held for it), spread evenly over the rows the
stage processed (0 for rows skipped before it, and for work a server did: no lease), and `cost`,
those seconds at the device's price (`costs:`, per device-hour; a device's model name wins over its
kind), null where no price applies. The results sum them per row (`device_seconds`, `cost`).

`Meter` adds up the parts one invocation writes, per stage and device: what run.json keeps, and what
`budget:` is checked against. A budget is reached when spent, or when starting one more shard would
cross it by more than that shard's expected share (measured throughput so far); the run then stops
as a stop does (catalogen/stopping.py) and ends Completed with `budget_line`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogen.config import BudgetSettings, ConfigError, RunConfig
from catalogen.stage import Device

# budget setting -> (its unit in the budget line, what one unit is in the meter's terms)
UNITS = {"device_hours": "device-hours", "cost": "cost", "wall_hours": "wall-hours"}


def price(costs: Mapping[str, float], device: Device) -> float | None:
    """The device's price per hour: by its model name, else its kind (`cuda`, `cpu`); None if neither."""
    return hourly(costs, device.kind, device.model)


def hourly(costs: Mapping[str, float], kind: str, name: str | None = None) -> float | None:
    """The price per hour of a device kind, or of its name (`NVIDIA H100 80GB HBM3`) where priced."""
    if name and name in costs:
        return float(costs[name])
    return float(costs[kind]) if kind in costs else None


def with_device_time(part: pa.Table, held_seconds: float, hourly: float | None) -> pa.Table:
    """The part with `device_seconds` (held_seconds spread over its rows) and `cost` filled in."""
    n = part.num_rows
    share = held_seconds / n if n else 0.0
    seconds = pa.array(np.full(n, share), pa.float64())
    cost = pa.nulls(n, pa.float64()) if hourly is None else pa.array(np.full(n, share * hourly / 3600.0), pa.float64())
    for name, values in (("device_seconds", seconds), ("cost", cost)):
        index = part.schema.get_field_index(name)  # -1: a stage that builds its table without them
        part = part.set_column(index, name, values) if index >= 0 else part.append_column(name, values)
    return part


def row_totals(stage_tables: Mapping[str, pa.Table]) -> dict[str, pa.Array]:
    """Per row, the sum over stages of `device_seconds` and `cost` (null where no stage recorded one)."""
    totals = {}
    for column in ("device_seconds", "cost"):
        values = [t.column(column) for t in stage_tables.values() if column in t.column_names]
        if not values:
            continue
        stacked = np.vstack([np.asarray(pc.fill_null(v, np.nan).to_numpy(), dtype=float) for v in values])
        known = ~np.isnan(stacked)
        total = np.where(known, stacked, 0.0).sum(axis=0)
        totals[column] = pa.array(total, pa.float64(), mask=~known.any(axis=0))
    return totals


def check_budget(cfg: RunConfig, devices: Sequence[Device]) -> None:
    """Before any work: a cost budget needs a price for every device the run may use."""
    if cfg.budget.cost is None:
        return
    if not cfg.costs:
        raise ConfigError(f"budget.cost: needs prices per device-hour in `costs:` (e.g. costs: {{cpu: 0.05}}), "
                          f"none given (from {cfg.origin('budget.cost')})")
    unpriced = [d.model or d.name for d in devices if price(cfg.costs, d) is None]
    if unpriced:
        raise ConfigError(f"budget.cost: no price in `costs:` for {', '.join(unpriced)} (give its name or kind, "
                          f"e.g. {devices[0].kind}: 2.10; from {cfg.origin('costs')})")


@dataclass
class Usage:
    """What one stage spent on one device."""

    device_seconds: float = 0.0
    cost: float | None = None
    rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"device_seconds": self.device_seconds, "cost": self.cost, "rows": self.rows}


@dataclass
class Meter:
    """One invocation's spending, from the parts its shards wrote, against its budget."""

    budget: BudgetSettings
    stages: Sequence[str]
    started: float = field(default_factory=time.monotonic)
    usage: dict[tuple[str, str], Usage] = field(default_factory=dict)
    reached: str | None = None  # the budget setting that stopped the run

    def add(self, stage: str, part: pa.Table) -> None:
        """Count a finished part's rows, device seconds and cost, per device."""
        if part.num_rows == 0:
            return
        devices = part.column("device").to_pylist()
        seconds = part.column("device_seconds").to_pylist()
        costs = part.column("cost").to_pylist()
        for device, held, paid in zip(devices, seconds, costs):
            usage = self.usage.setdefault((stage, device or "-"), Usage())
            usage.rows += 1
            usage.device_seconds += held or 0.0
            if paid is not None:
                usage.cost = (usage.cost or 0.0) + paid

    def spent(self, setting: str) -> float:
        """Spent so far in the budget's unit: device-hours, cost, or wall-hours."""
        if setting == "device_hours":
            return sum(u.device_seconds for u in self.usage.values()) / 3600.0
        if setting == "cost":
            return sum(u.cost or 0.0 for u in self.usage.values())
        return (time.monotonic() - self.started) / 3600.0

    def _per_row(self, setting: str, stage: str) -> float:
        """Measured spending per row of a stage in this invocation (0 before a measurement)."""
        if setting == "wall_hours":
            return 0.0
        mine = [u for (s, _), u in self.usage.items() if s == stage]
        rows = sum(u.rows for u in mine)
        if not rows:
            return 0.0
        spent = sum(u.device_seconds for u in mine) / 3600.0 if setting == "device_hours" \
            else sum(u.cost or 0.0 for u in mine)
        return spent / rows

    def expected(self, setting: str, rows: int, from_stage: int = 0) -> float:
        """What `rows` rows are expected to spend from stage `from_stage` on."""
        return rows * sum(self._per_row(setting, s) for s in self.stages[from_stage:])

    def check(self, in_flight: Sequence[tuple[int, int]] = (), starting: int | None = None) -> str | None:
        """The budget setting that stops the run now, if any (and remembered): one spent, or one that
        a shard of `starting` rows would cross by more than its own expected share, given the work
        `in_flight` ((rows, stage index) of each shard under way)."""
        for setting in UNITS:
            limit = getattr(self.budget, setting)
            if limit is None:
                continue
            spent = self.spent(setting)
            if spent >= limit:
                self.reached = setting
            elif starting is not None:
                ahead = sum(self.expected(setting, rows, stage) for rows, stage in in_flight)
                shard = self.expected(setting, starting)
                if spent + ahead + shard - limit > shard:
                    self.reached = setting
            if self.reached:
                return self.reached
        return None

    def totals(self) -> dict[str, Any]:
        """run.json's record of the invocation: per stage and device, and in all."""
        stages: dict[str, dict[str, Any]] = {}
        for (stage, device), usage in sorted(self.usage.items()):
            stages.setdefault(stage, {})[device] = usage.as_dict()
        costs = [u.cost for u in self.usage.values() if u.cost is not None]
        return {"device_seconds": sum(u.device_seconds for u in self.usage.values()),
                "cost": sum(costs) if costs else None, "rows": sum(u.rows for u in self.usage.values()),
                "wall_seconds": time.monotonic() - self.started, "stages": stages}


def record_costs(store: Any, meter: Meter) -> None:
    """Under run.json's latest invocation: what it spent (`Meter.totals`), and the budget that stopped it."""
    info = store.read_run_json()
    info["invocations"][-1]["costs"] = {**meter.totals(), "budget_reached": meter.reached}
    store.write_json(store.run_json, info)


def amount(value: float) -> str:
    """A number as the budget line shows it: `3.98`, `4`, `0.00123`, `1,204` (3 significant digits
    below 100, thousands separated above)."""
    if value >= 100:
        return f"{value:,.0f}"
    if value <= 0:
        return "0"
    decimals = max(0, 2 - int(np.floor(np.log10(value))))
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".") if decimals else f"{value:.0f}"


def given(value: float) -> str:
    """A budget as it was set, in full (`4`, `0.002`, `10,000`)."""
    text = np.format_float_positional(value, trim="-")
    whole, dot, fraction = text.partition(".")
    return f"{int(whole):,}{dot}{fraction}"


def budget_line(setting: str, spent: float, limit: float, pending: int, rows: int) -> str:
    """`budget reached: 3.98 of 4 device-hours; 1,204 of 10,000 rows pending; run again to continue`"""
    return (f"budget reached: {amount(spent)} of {given(limit)} {UNITS[setting]}; "
            f"{pending:,} of {rows:,} rows pending; run again to continue")


def folder_totals(info: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """From run.json: the last invocation's totals (None if it recorded none), and all invocations'
    (device seconds, cost: None where no invocation recorded one)."""
    invocations = info.get("invocations") or []
    recorded = [i["costs"] for i in invocations if isinstance(i.get("costs"), dict)]
    costs = [c["cost"] for c in recorded if c.get("cost") is not None]
    total = {"device_seconds": sum(c.get("device_seconds", 0.0) for c in recorded),
             "cost": sum(costs) if costs else None, "rows": sum(c.get("rows", 0) for c in recorded)}
    last = invocations[-1].get("costs") if invocations else None
    return (last if isinstance(last, dict) else None), total


def money(value: float | None) -> str:
    """A cost to the cent, or why there is none."""
    return "unknown (no `costs:` price)" if value is None else f"{value:,.2f}"


def spent_text(totals: Mapping[str, Any]) -> str:
    """`123.4 device-seconds (0.0343 device-hours) on 12 stage-rows, cost 0.41`: a row counts once per
    stage it went through, so 25 rows of generate -> caption are 50 stage-rows."""
    seconds = totals.get("device_seconds", 0.0)
    return (f"{seconds:,.1f} device-seconds ({amount(seconds / 3600.0)} device-hours) on {totals.get('rows', 0):,} stage-"
            f"rows, cost {money(totals.get('cost'))}")


def spending_lines(info: Mapping[str, Any]) -> list[str]:
    """What `catalogen status` prints of run.json's totals: the last invocation's, and all of them."""
    last, total = folder_totals(info)
    if last is None and not total["rows"]:
        return []
    lines = [f"spent by the last run: {spent_text(last)}"] if last is not None else []
    if last is not None and last.get("budget_reached"):
        lines[-1] += f"; stopped by budget.{last['budget_reached']}"
    return lines + [f"spent by all runs: {spent_text(total)}"]
