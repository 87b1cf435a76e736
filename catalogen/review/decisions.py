"""A reviewer's decisions, one small file each under the run folder's `review/decisions/`.

A decision is never rewritten: each is a new file with a unique name, created whole (renamed into
place and synced on a disk, one PUT on a bucket), so two reviewers at once lose nothing and a
server killed after answering has already written what it answered. A row's state is its latest
decision; `undo` takes back the decision it names. A decision applies only while the row's image
is still the one it was made on (`key`, the image's sha256): catalogen/review/state.py checks.

`compact` folds them into one `compacted-*.jsonl` file, each decision keeping its own `name`: the
folded file is written whole first, then only the files it holds are removed, so an interrupted
compaction loses nothing (a decision then read twice counts once: `read` keeps one per name), and
a decision written meanwhile stays in its own file.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any, Iterable

from catalogen.storage.store import RunStore, write_atomic

FOLDER = "review/decisions"
COMPACTED = "compacted-"  # the prefix of a folded file (`.jsonl`, one decision a line)
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
    _write(store, name, json.dumps(body, sort_keys=True).encode())
    return written


def _write(store: RunStore, name: str, data: bytes) -> None:
    """A new file of the folder, whole or absent. On a disk its temporary file sits beside it (not in
    work/, which a run starting meanwhile sweeps), so a reviewer never races a run."""
    path = store.root / FOLDER / name
    if store.remote:
        store.write_file(path, data)
    else:
        write_atomic(path, data, path.parent)


def _decision(data: Any, name: str, where: str) -> Decision:
    known = {f.name for f in fields(Decision)} - {"name"}
    try:
        return Decision(**{k: v for k, v in data.items() if k in known}, name=name)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecisionError(f"{where}: not a decision ({exc})") from exc


def _in_file(store: RunStore, relative: str) -> list[Decision]:
    """The decisions of one file: a single decision (named by its file) or a folded one."""
    try:
        text = store.read_bytes(relative).decode()
        if relative.rsplit("/", 1)[-1].startswith(COMPACTED):
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            return [_decision(d, d.get("name", ""), f"{relative} line {i}") for i, d in enumerate(lines, 1)]
        return [_decision(json.loads(text), relative.rsplit("/", 1)[-1], relative)]
    except (ValueError, AttributeError) as exc:
        raise DecisionError(f"{relative}: not a decision ({exc})") from exc


def files(store: RunStore) -> list[str]:
    """The files decisions are kept in now (paths under the run folder), for `read(skip=...)`: one
    listing of names (no stat per file: a page asks before each decision)."""
    folder = store.root / FOLDER
    try:
        names = [n.rsplit("/", 1)[-1] for n in store.root.fs.ls(folder.path, detail=False)] if store.remote \
            else os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(f"{FOLDER}/{name}" for name in names
                  if name.endswith(".jsonl" if name.startswith(COMPACTED) else ".json") and not name.startswith("."))


def _read_files(store: RunStore, relatives: Iterable[str]) -> dict[str, Decision]:
    found: dict[str, Decision] = {}
    for relative in relatives:
        found.update((d.name, d) for d in _in_file(store, relative))
    return found


def listed(store: RunStore, skip: Iterable[str] = ()) -> tuple[list[str], dict[str, Decision]]:
    """The decision files now and what they hold (those in `skip` left out). A file that vanishes
    between listing and reading was folded by a compaction meanwhile: list again."""
    skipped = set(skip)
    for _ in range(9):
        names = files(store)
        try:
            return names, _read_files(store, [f for f in names if f not in skipped])
        except FileNotFoundError:
            continue
    raise DecisionError(f"{store.root / FOLDER}: its files keep changing while read (a compaction loop?)")


def read(store: RunStore, skip: Iterable[str] = ()) -> list[Decision]:
    """Every decision in the folder, in the order they were made (time, then name), each once.
    `skip`: files (paths under the run folder) already read, e.g. by a page that reads only new ones."""
    return _ordered(listed(store, skip)[1].values())


def _ordered(decisions: Iterable[Decision]) -> list[Decision]:
    return sorted(decisions, key=lambda d: (d.at, d.name))


def compact(store: RunStore) -> tuple[int, int]:
    """Fold every decision file into one; returns (decisions kept, files removed). Safe at any moment
    and beside reviewers: see the module docstring."""
    folded, found = listed(store)
    if len(folded) <= 1:
        return len(found), 0
    name = f"{COMPACTED}{now().replace('-', '').replace(':', '').replace('+0000', 'Z')}-{secrets.token_hex(6)}.jsonl"
    body = "".join(json.dumps(asdict(d), sort_keys=True) + "\n" for d in _ordered(found.values()))
    _write(store, name, body.encode())
    for relative in folded:
        store.delete(relative)
    return len(found), len(folded)


def latest(decisions: Iterable[Decision]) -> dict[str, Decision]:
    """Each id's latest decision still standing (undone ones and undos themselves left out)."""
    ordered = _ordered(decisions)
    undone = {d.undoes for d in ordered if d.decision == "undo"}
    standing: dict[str, Decision] = {}
    for d in ordered:
        if d.decision != "undo" and d.name not in undone:
            standing[d.id] = d
    return standing
