"""A reviewer's decisions, one small file each under the run folder's `review/decisions/`.

A decision is never rewritten: each is a new file with a unique name, created whole (renamed into
place and synced on a disk, one PUT on a bucket), so two reviewers at once lose nothing and a
server killed after answering has already written what it answered. A row's state is its latest
decision; `undo` takes back the decision it names. A decision applies only while the row's image
is still the one it was made on (`key`, the image's sha256): catalogen/review/state.py checks.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Iterable

from catalogen.storage.store import RunStore

FOLDER = "review/decisions"
KINDS = ("approve", "reject", "choose", "regenerate", "undo")


class DecisionError(ValueError):
    """A decision that cannot be recorded or read; the message names the field or file."""


@dataclass(frozen=True)
class Decision:
    id: str  # the catalog row's id
    decision: str  # one of KINDS
    variant: int  # the candidate decided on; for `choose`, the one that ships
    key: str  # the image it was made on: its `image_sha256` in results.parquet
    reviewer: str
    at: str  # ISO 8601, UTC, microseconds: the order decisions are applied in
    reason: str = ""  # why a row was rejected
    note: str = ""  # regenerate: appended to the prompt
    undoes: str = ""  # undo: the `name` of the decision taken back
    name: str = ""  # the file's name, set when written or read

    def __post_init__(self) -> None:
        if self.decision not in KINDS:
            raise DecisionError(f"decision {self.decision!r} is not one of {', '.join(KINDS)}")
        if self.decision == "undo" and not self.undoes:
            raise DecisionError("an undo names the decision it takes back (undoes)")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def record(store: RunStore, decision: Decision) -> Decision:
    """Write one decision as a new file; returns it with its `name`. Returns once it is durable."""
    stamp = decision.at.replace("-", "").replace(":", "").replace("+0000", "Z")
    name = f"{stamp}-{secrets.token_hex(6)}.json"
    written = Decision(**{**asdict(decision), "name": name})
    body = {k: v for k, v in asdict(written).items() if k != "name"}
    store.write_file(store.root / FOLDER / name, json.dumps(body, sort_keys=True).encode())
    return written


def read(store: RunStore) -> list[Decision]:
    """Every decision in the folder, in the order they were made (time, then name)."""
    known = {f.name for f in fields(Decision)}
    found = []
    for relative, _ in store.files_under(FOLDER):
        if not relative.endswith(".json"):
            continue
        try:
            data = json.loads(store.read_bytes(relative))
            found.append(Decision(**{k: v for k, v in data.items() if k in known and k != "name"},
                                  name=relative.rsplit("/", 1)[-1]))
        except (ValueError, TypeError) as exc:
            raise DecisionError(f"{relative}: not a decision ({exc})") from exc
    return sorted(found, key=lambda d: (d.at, d.name))


def latest(decisions: Iterable[Decision]) -> dict[str, Decision]:
    """Each id's latest decision still standing (undone ones and undos themselves left out)."""
    ordered = sorted(decisions, key=lambda d: (d.at, d.name))
    undone = {d.undoes for d in ordered if d.decision == "undo"}
    standing: dict[str, Decision] = {}
    for d in ordered:
        if d.decision != "undo" and d.name not in undone:
            standing[d.id] = d
    return standing
