"""Best-of-N and quality gates: the review columns a run writes into results.parquet.

`decide` ranks each id's candidates by `select.by` (highest first, ties to the lower variant),
chooses the first `select.keep` that succeeded and pass every `select.require` rule, then gates the
chosen ones by `review.reject_if` / `review.approve_if`. It is computed over the whole table at once
with pyarrow.compute and numpy (a million rows in seconds), whenever results.parquet is written: so
a change of these settings re-ranks at the next `catalogen run` and re-runs no stage.

States: a chosen candidate is `approved` (every approve_if rule holds, or the run has no `review:`
section), `rejected` (a reject_if rule holds; that rule is its reason) or `needs_review`; every other
candidate is an `alternate`, its reason saying why it was not chosen (a failed status, the first
require rule it fails, or a better-ranked candidate). `review_by` names what decided: `default`,
`review.approve_if`, `review.reject_if`, `select` (or, once applied by state.py, a reviewer).
"""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogen.config import ReviewSettings, SelectSettings
from catalogen.review.rules import RuleError, by_score, check_by, check_rule, parse_rule, rule_mask
from catalogen.review.state import REVIEW_SCHEMA

NOT_CHOSEN = "not chosen: another candidate ranks higher"


def settings_faults(select: SelectSettings, review: ReviewSettings | None, columns: Mapping[str, pa.DataType],
                    origin: Callable[[str], str]) -> list[str]:
    """Every `select:` and `review:` setting the run's columns cannot satisfy, one line each naming the
    setting and the column (`origin`: where a setting came from, RunConfig.origin)."""
    checks: list[tuple[str, str, str]] = []
    if select.by is not None:
        checks.append(("select.by", select.by, "by"))
    checks += [(f"select.require.{i}", rule, "rule") for i, rule in enumerate(select.require)]
    if review is not None:
        checks += [(f"review.approve_if.{i}", rule, "rule") for i, rule in enumerate(review.approve_if)]
        checks += [(f"review.reject_if.{i}", rule, "rule") for i, rule in enumerate(review.reject_if)]
    problems = []
    for setting, text, kind in checks:
        try:
            if kind == "by":
                check_by(text, columns, setting)
            else:
                check_rule(text, columns, setting, "the run's results")
        except RuleError as exc:
            problems.append(f"{exc} (from {origin(setting)})")
    return problems


def _holds(table: pa.Table, rule: str, setting: str) -> np.ndarray:
    """Where a rule holds; a column the results lack (near-duplicates not searched) decides nothing."""
    if parse_rule(rule, setting)[0] not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return rule_mask(table, rule, setting).to_numpy(zero_copy_only=False)


def _ranks(table: pa.Table, score: pa.Array | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the row order: id, score high first, variant; each sorted row's group start; its 0-based rank)."""
    keys = {"id": pc.cast(table.column("id"), pa.string()), "variant": table.column("variant")}
    order_by = [("id", "ascending", "at_end"), ("variant", "ascending", "at_end")]
    if score is not None:
        keys["score"] = pc.if_else(pc.is_nan(score), None, score)  # a NaN score ranks last, as a null
        order_by.insert(1, ("score", "descending", "at_end"))
    order = pc.sort_indices(pa.table(keys), sort_keys=order_by).to_numpy()
    ids = keys["id"].take(pa.array(order))
    starts = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        starts[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    return order, first[group], np.arange(len(order)) - first[group]


def _strings(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string())


def decide(table: pa.Table, select: SelectSettings, review: ReviewSettings | None, at: datetime) -> pa.Table:
    """The results with the review columns (state.REVIEW_SCHEMA) as the run's settings decide them."""
    n = table.num_rows
    status = table.column("status")
    eligible = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
    reason = np.full(n, None, dtype=object)
    for value in pc.unique(status).to_pylist():
        if value != "ok":
            reason[pc.fill_null(pc.equal(status, value) if value else pc.is_null(status), False).to_numpy(
                zero_copy_only=False)] = f"status {value}"
    if select.is_set():
        for rule in select.require:
            fails = eligible & ~_holds(table, rule, "select.require")
            reason[fails] = f"fails select.require: {rule}"
            eligible &= ~fails
    score = by_score(table, check_by(select.by, {f.name: f.type for f in table.schema})) if select.by else None
    order, start, rank_sorted = _ranks(table, score)
    chosen_sorted = eligible[order]
    if select.is_set():
        passed = np.cumsum(chosen_sorted)
        before = passed[start] - chosen_sorted[start]
        chosen_sorted &= (passed - before) <= select.keep
    selected = np.empty(n, dtype=bool)
    selected[order] = chosen_sorted
    rank = np.empty(n, dtype=np.int32)
    rank[order] = rank_sorted + 1
    reason[eligible & ~selected] = NOT_CHOSEN
    state = np.where(selected, "approved", "alternate").astype(object)
    by = np.where(selected, "default", "select").astype(object)
    if review is not None:
        _gate(table, review, selected, state, reason, by)
    decided_at = pa.array([at] * n, pa.timestamp("us", tz="UTC")) if (select.is_set() or review is not None) \
        else pa.nulls(n, pa.timestamp("us", tz="UTC"))
    values = {"select_rank": pa.array(rank, pa.int32()), "selected": pa.array(selected), "review_state": _strings(state),
              "review_reason": _strings(reason), "review_by": _strings(by), "review_at": decided_at}
    for field in REVIEW_SCHEMA:
        if field.name in table.column_names:
            table = table.set_column(table.schema.get_field_index(field.name), field, values[field.name])
        else:
            table = table.append_column(field, values[field.name])
    return table


def _gate(table: pa.Table, review: ReviewSettings, selected: np.ndarray, state: np.ndarray, reason: np.ndarray,
          by: np.ndarray) -> None:
    """Set the chosen rows' state from the gates, in place: reject_if first, then approve_if."""
    open_ = selected.copy()
    for rule in review.reject_if:
        hit = open_ & _holds(table, rule, "review.reject_if")
        state[hit], reason[hit], by[hit] = "rejected", rule, "review.reject_if"
        open_ &= ~hit
    state[open_], by[open_] = "needs_review", None
    if not review.approve_if:
        reason[open_] = "no review.approve_if rule: a person decides"
        return
    approved = open_.copy()
    for rule in reversed(review.approve_if):  # the first rule that fails is the reason
        fails = open_ & ~_holds(table, rule, "review.approve_if")
        reason[fails] = f"approve_if does not hold: {rule}"
        approved &= ~fails
    state[approved], reason[approved], by[approved] = "approved", None, "review.approve_if"
