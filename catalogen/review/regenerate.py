"""`catalogen run --regenerate-rejected`: a reviewer's `regenerate` decisions become new variants.

Each standing regenerate decision that still applies (its image is the row's image now) is recorded
once, as its own small file under `review/regenerated/` named by the decision: the id, the new
variant number (one past the id's highest so far), the variant it replaces and the note. The plan
reads them (`regenerations`): the id gets that many more variants, each with the next seed (as any
further variant has) and the note appended to its prompt. Nothing is overwritten: the old variant
and its decision stay, and the files say which variant came from which decision.
"""

from __future__ import annotations

import json
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from catalogen.review.decisions import latest, read
from catalogen.storage.store import RunStore

FOLDER = "review/regenerated"
SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("from_variant", pa.int32()),
                    pa.field("note", pa.string()), pa.field("decision", pa.string())])


def regenerations(store: RunStore) -> pa.Table:
    """Every regeneration recorded in the folder (SCHEMA), in the order of their variants."""
    found = []
    if store.root.exists():
        for relative, _ in store.files_under(FOLDER):
            if relative.endswith(".json"):
                found.append(json.loads(store.read_bytes(relative)))
    return pa.Table.from_pylist(found, schema=SCHEMA).sort_by([("id", "ascending"), ("variant", "ascending")])


def with_note(prompt: str | None, note: str) -> str | None:
    """A regenerated variant's prompt: the row's, with the reviewer's note appended."""
    if not note.strip():
        return prompt
    return f"{prompt}, {note.strip()}" if prompt else note.strip()


def record_regenerations(store: RunStore) -> list[dict]:
    """Record a new variant for each standing `regenerate` decision not yet recorded; returns those added."""
    if not store.results_path.exists():
        return []
    results = store.read_table(store.results_path, columns=["id", "variant", "image_sha256"])
    images = {(str(i), v): key for i, v, key in zip(*(results.column(c).to_pylist() for c in results.column_names))}
    done = regenerations(store)
    recorded = set(done.column("decision").to_pylist())
    highest: dict[str, int] = {}
    for table in (results, done):
        for row_id, variant in zip(pc.cast(table.column("id"), pa.string()).to_pylist(), table.column("variant").to_pylist()):
            highest[row_id] = max(highest.get(row_id, -1), variant)
    added = []
    for row_id, decision in _standing(latest(read(store))).items():
        if decision.name in recorded or images.get((row_id, decision.variant)) != decision.key:
            continue  # recorded already, or made on an image the row no longer has
        highest[row_id] = highest.get(row_id, -1) + 1
        entry = {"id": row_id, "variant": highest[row_id], "from_variant": decision.variant, "note": decision.note,
                 "decision": decision.name}
        store.write_file(store.root / FOLDER / decision.name, json.dumps(entry, sort_keys=True).encode())
        added.append(entry)
    return added


def _standing(decisions: Mapping) -> dict:
    return {row_id: d for row_id, d in decisions.items() if d.decision == "regenerate"}
