"""Each row's review state as of now: what the run decided (selection and gates, in results.parquet)
with the reviewers' standing decisions applied over it.

Columns (results.parquet keeps them as of the end of the run; `current` recomputes them):
`select_rank` (1..N within an id), `selected`, `review_state` (approved | rejected | needs_review |
alternate), `review_reason`, `review_by` (a rule, or a reviewer's name), `review_at`.
A run with no selection or gates selects every candidate and approves it (`review_by` "default").
"""

from __future__ import annotations

from datetime import datetime
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from catalogen.review.decisions import Decision, latest, read
from catalogen.storage.store import RunStore

STATES = ("approved", "rejected", "needs_review", "alternate")
REVIEW_SCHEMA = pa.schema([
    pa.field("select_rank", pa.int32()),
    pa.field("selected", pa.bool_()),
    pa.field("review_state", pa.string()),
    pa.field("review_reason", pa.string()),
    pa.field("review_by", pa.string()),
    pa.field("review_at", pa.timestamp("us", tz="UTC")),
])


def with_defaults(table: pa.Table) -> pa.Table:
    """The review columns of a run that chose nothing: every candidate selected, approved by default."""
    if "selected" in table.column_names:
        return table
    n = table.num_rows
    ranks = pc.add(table.column("variant").cast(pa.int32()), pa.scalar(1, pa.int32()))
    values = {"select_rank": ranks, "selected": pa.array([True] * n), "review_state": pa.array(["approved"] * n),
              "review_reason": pa.nulls(n, pa.string()), "review_by": pa.array(["default"] * n),
              "review_at": pa.nulls(n, pa.timestamp("us", tz="UTC"))}
    for field in REVIEW_SCHEMA:
        table = table.append_column(field, pa.array(values[field.name], field.type))
    return table


def apply_decisions(table: pa.Table, decisions: Mapping[str, Decision]) -> pa.Table:
    """Each id's standing decision over the run's own states. A decision made on an image the row no
    longer has (new settings, a regenerated row) no longer applies: the id needs review again."""
    if not decisions:
        return table
    rows = table.select(["id", "variant", "image_sha256", *REVIEW_SCHEMA.names]).to_pylist()
    images = {(row["id"], row["variant"]): row["image_sha256"] for row in rows if row["id"] in decisions}
    for row in rows:
        decision = decisions.get(row["id"])
        if decision is None:
            continue
        at = datetime.fromisoformat(decision.at)
        if images.get((row["id"], decision.variant)) != decision.key:
            if row["selected"]:
                row.update(review_state="needs_review", review_reason="the image changed after "
                           f"{decision.reviewer}'s decision", review_by=decision.reviewer, review_at=at)
            continue
        chosen = row["variant"] == decision.variant
        if decision.decision in ("approve", "choose"):
            state = "approved" if chosen else "alternate"
            row.update(selected=chosen, review_state=state,
                       review_reason=None if chosen else f"{decision.reviewer} chose variant {decision.variant}")
        elif decision.decision == "regenerate" and chosen:  # its new variant (if made yet) is judged on its own
            row.update(review_state="rejected", review_reason=f"regenerate: {decision.note}".rstrip(": "))
        elif decision.decision == "reject" and row["selected"]:  # the id ships nothing
            row.update(review_state="rejected", review_reason=decision.reason)
        else:
            continue
        row.update(review_by=decision.reviewer, review_at=at)
    decided = pa.Table.from_pylist(rows, schema=pa.schema([*[table.schema.field(c) for c in ("id", "variant", "image_sha256")],
                                                           *REVIEW_SCHEMA]))
    for field in REVIEW_SCHEMA:
        table = table.set_column(table.schema.get_field_index(field.name), field, decided.column(field.name))
    return table


def current(store: RunStore) -> pa.Table:
    """results.parquet with every review column as of now."""
    table = with_defaults(store.read_table(store.results_path))
    return apply_decisions(table, latest(read(store)))


def state_counts(table: pa.Table) -> dict[str, int]:
    """Rows per review state, every state named (0 where none)."""
    found = {c["values"]: c["counts"] for c in pc.value_counts(table.column("review_state")).to_pylist()}
    return {state: int(found.get(state, 0)) for state in STATES}


def review_command(root: object) -> str:
    """The command that opens a run's rows for a person to decide."""
    return f"catalogen review {root}"
