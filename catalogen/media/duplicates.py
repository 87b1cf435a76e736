"""Near-duplicate images: a perceptual hash per final image, and which earlier row each repeats.

Two pure functions and the step a run ends with:

- `phash(image) -> int`: imagehash's pHash (DCT of a 32x32 greyscale, 8x8 low frequencies against
  their median) as a 64-bit integer, most significant bit first: `format(h, "016x")` is
  `str(imagehash.phash(image))`, and the Hamming distance of two integers is imagehash's `a - b`.
  An image with transparency is hashed as it looks on white (a cut-out's hidden pixels do not count).
- `group(hashes, max_distance) -> int64 array`: for each row i, the **earliest** row j < i (in
  catalog order) whose hash is within `max_distance` bits of row i's, else -1. Earliest means the
  smallest index among all earlier rows within the distance of row i itself, not the first row of
  some cluster: the relation is not transitive (a ~ b and b ~ c with a, c further apart gives
  b -> a and c -> b, or c -> a only if c is within the distance of a). Following the pointers from any
  row ends at a row that points nowhere: every chain of near-duplicates has exactly one such root,
  which is the row `export --dedupe` keeps (see `roots`).
- `add_duplicate_columns(results, read_bytes, max_distance, previous)`: the results table with
  `phash` (16 hex digits), `near_duplicate_of` / `near_duplicate_of_variant` (the id and variant
  of that earliest row, null when there is none) and `near_duplicate_distance`.

How `group` avoids comparing all pairs (multi-index hashing, Norouzi et al., 2012): identical
hashes are merged first (so a million copies of one image cost nothing), then the 64 bits are cut
into m contiguous chunks. Two hashes within distance d differ in at most floor(d / m) bits of some
chunk (pigeonhole: otherwise they differ in at least m * (floor(d / m) + 1) > d bits). So for each
chunk, a direct-address table of the chunk's values lists the rows that hold each value, and
each row looks up its own chunk value and every value within floor(d / m) bits of it; only the
rows found there (candidates) are compared on all 64 bits. With m = d + 1 chunks the look-ups are
exact matches, but for a million hashes that leaves 9-bit chunks and ~2,000 candidates per row;
m is chosen by a cost model (look-ups against expected candidates), for a million hashes 3 chunks
of 21-22 bits searched 2 bits wide at d = 6 (253 look-ups per row and chunk, halved by generating
each pair from one side only). Everything is vectorised with numpy (`benchmarks/duplicates.py`:
1,000,000 hashes in ~15 s, 10 s of CPU, on this project's 2-core machine). The work is rows x
look-ups plus candidate pairs, never rows squared: a bucket of more than SMALL_BUCKET rows (copies,
or distinct hashes crowded together) is searched from both sides, each row stopping at its
earliest match, so crowded data costs a few comparisons per row (tests count them). One case stays
quadratic: many distinct hashes that share whole chunks yet are all more than d apart elsewhere,
where each row scans its bucket to the end; pHashes of real images are not spread that way.

Where the hashes come from: at the end of a run, over the final images of results.parquet
(`image_sha256`), each image decoded once: hashes of images the previous results.parquet already
hashed are taken from its `phash` column by sha256, so a re-run decodes only new images. No side
file: the results are the cache, and they are rewritten at the end of every run anyway.

Grouping covers the rows whose summary status is ok (what an export can hold): a failed or pending
row is never named as the original of another, and gets no `near_duplicate_of` itself.

    >>> from PIL import Image
    >>> h = phash(Image.new("RGB", (64, 64), "white"))
    >>> group(np.array([h, h ^ 0b111, 0xFFFF_0000_0000_0000], dtype=np.uint64), 6).tolist()
    [-1, 0, -1]
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalogen.storage.locations import Location, read_table

log = logging.getLogger("catalogen.duplicates")

BITS = 64
MAX_DISTANCE_LIMIT = 10  # the search grows steeply with it: 1M hashes take ~2 s of CPU at 3, ~11 at 6, ~60 at 10
MAX_TABLE_BITS = 22  # a chunk's direct-address tables: 2**22 offsets and sizes (64 MB), searched a chunk at a time
BRUTE_FORCE_ROWS = 2048  # up to this many distinct hashes, all pairs (blocked) are cheaper than tables
PAIRS_PER_BLOCK = 1 << 22  # pairs compared at once by the all-pairs path (bounds memory)
SMALL_BUCKET = 6  # a bucket of more rows is searched from both sides, each row for its earliest match only
HASH_BATCH = 512  # images hashed between two looks at `stop` (a Ctrl-C during the end of a run)
SETTING = "duplicates.max_distance"
METADATA_KEY = b"catalogen.duplicates"  # results.parquet schema metadata: {"max_distance": d or null}
COLUMNS = (("phash", pa.string()), ("near_duplicate_of", pa.string()), ("near_duplicate_of_variant", pa.int32()),
           ("near_duplicate_distance", pa.int8()))


class DuplicatesError(ValueError):
    """A distance that cannot be searched; the message names the setting."""


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off")


def distance_problem(value: Any) -> str | None:
    """What is wrong with a max_distance value (None: nothing). None and False (YAML `off`) mean off."""
    if _is_off(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return (f"{value!r} is not a whole number: the distance is in bits of a {BITS}-bit pHash, from 0 "
                f"(identical hashes only) to {MAX_DISTANCE_LIMIT}, or null / off to turn near-duplicate detection off")
    if not 0 <= value <= MAX_DISTANCE_LIMIT:
        off = "; null or off turns near-duplicate detection off" if value < 0 else ""
        return (f"{value} is out of range: the distance is in bits of a {BITS}-bit pHash, from 0 (identical "
                f"hashes only) to {MAX_DISTANCE_LIMIT}{off}")
    return None


def check_max_distance(value: Any, setting: str = SETTING) -> int | None:
    """The distance as an int, None for off; refuses anything else, naming `setting`."""
    problem = distance_problem(value)
    if problem:
        raise DuplicatesError(f"{setting}: {problem}")
    return None if _is_off(value) else int(value)


class DuplicatesSettings(BaseModel):
    """Near-duplicate detection at the end of a run (see catalogen/media/duplicates.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_distance: int | None = Field(
        6, description=f"pHash bits (of {BITS}) two final images may differ in and still be near-duplicates: "
        f"0 = identical hashes only, at most {MAX_DISTANCE_LIMIT}; null or off turns detection off (no image is hashed)",
    )

    @field_validator("max_distance", mode="before")
    @classmethod
    def _in_range(cls, value: Any) -> Any:
        problem = distance_problem(value)
        if problem:
            raise ValueError(problem)
        return None if _is_off(value) else value


# --- the hash ---------------------------------------------------------------------------------------


def phash(image: Image.Image) -> int:
    """imagehash.phash of the image as a 64-bit integer (see the module docstring)."""
    import imagehash

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        image = flat.convert("RGB")
    return int(str(imagehash.phash(image)), 16)


def phash_bytes(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (128, 128))  # a JPEG decodes at a reduced scale; pHash looks at 32x32 anyway
        return phash(image)


def to_hex(value: int) -> str:
    return format(value, "016x")


def from_hex(values: list[str | None]) -> np.ndarray:
    """Hex strings as uint64 (nulls must have been left out)."""
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


# --- grouping ---------------------------------------------------------------------------------------


def _chunks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m contiguous chunks covering 64 bits, widths differing by at most one."""
    widths = [BITS // m + (1 if i < BITS % m else 0) for i in range(m)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths))


def _ball(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(radius + 1))


def choose_chunks(distinct: int, max_distance: int) -> int:
    """How many chunks make the search cheapest for `distinct` hashes. Per chunk of w bits searched
    at radius r: a look-up for every row and every chunk value within r bits (half of them, see
    `_search_chunk`), and each candidate pair compared once, ~PAIR_COST look-ups' worth (measured:
    15 ns a look-up, 40 ns a pair). Tables are at most 2**MAX_TABLE_BITS entries."""
    pair_cost = 2.7
    best, best_cost = 0, math.inf
    lowest = math.ceil(BITS / MAX_TABLE_BITS)
    for m in range(lowest, max(lowest, max_distance + 1) + 1):
        radius = max_distance // m
        cost = 0.0
        for _, width in _chunks(m):
            ball = _ball(width, radius)
            cost += distinct * (1 + (ball - 1) / 2) + pair_cost * ball * distinct * distinct / 2**width / 2
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _masks_by_top_bit(width: int, radius: int) -> list[tuple[int, list[int]]]:
    """Every non-zero value of `width` bits with at most `radius` bits set, grouped by its highest bit."""
    groups: list[tuple[int, list[int]]] = []
    if radius < 1:
        return groups
    for top in range(width):
        masks = [1 << top]
        for k in range(1, radius):
            masks += [(1 << top) | sum(1 << b for b in low) for low in combinations(range(top), k)]
        groups.append((top, masks))
    return groups


def _compare(values: np.ndarray, best: np.ndarray, rows: np.ndarray, others: np.ndarray,
             max_distance: int, stats: dict[str, int]) -> np.ndarray:
    """For each pair of distinct-hash indices within the distance: best[later] = min(best[later], earlier).
    Returns which pairs were within it."""
    stats["comparisons"] += len(rows)
    close = np.bitwise_count(values[rows] ^ values[others]) <= max_distance
    if close.any():
        near, other = rows[close], others[close]
        np.minimum.at(best, np.maximum(near, other), np.minimum(near, other))
    return close


def _expand(values: np.ndarray, best: np.ndarray, rows: np.ndarray, first: np.ndarray, count: np.ndarray,
            members: np.ndarray, max_distance: int, stats: dict[str, int], earliest_only: bool = False) -> None:
    """Compare each of `rows` with members[first:first + count] (its candidates; count > 0), rank by
    rank: the j-th candidate of every row that has one (buckets are small, at most SMALL_BUCKET rows
    unless `earliest_only`).

    `earliest_only`: only the earliest candidate before the row and within the distance matters
    (candidates ascend), so a row stops at its first match or at the first candidate after it: a
    bucket of many near-identical hashes costs a few comparisons per row, not one per pair.
    """
    rank = 0
    while len(rows):
        candidates = members[first + rank]
        if earliest_only:
            before = candidates < rows
            rows, first, count, candidates = rows[before], first[before], count[before], candidates[before]
        close = _compare(values, best, rows, candidates, max_distance, stats)
        rank += 1
        keep = count > rank
        if earliest_only:
            keep &= ~close
        rows, first, count = rows[keep], first[keep], count[keep]


def _brute_force(values: np.ndarray, best: np.ndarray, max_distance: int, stats: dict[str, int]) -> None:
    """All pairs, a block of rows at a time (few distinct hashes)."""
    n = len(values)
    block = max(1, PAIRS_PER_BLOCK // max(n, 1))
    columns = np.arange(n)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        distance = np.bitwise_count(values[rows, None] ^ values[None, :])
        close = (distance <= max_distance) & (columns[None, :] < rows[:, None])
        stats["comparisons"] += int(rows.sum())  # pairs with an earlier row
        hit = close.any(axis=1)
        if hit.any():
            first = np.argmax(close, axis=1)  # the earliest column within the distance
            best[rows[hit]] = np.minimum(best[rows[hit]], first[hit])


def _search_chunk(values: np.ndarray, best: np.ndarray, shift: int, width: int, radius: int, max_distance: int,
                  stats: dict[str, int]) -> None:
    """Candidates whose chunk value is within `radius` bits of the row's, compared on all 64 bits.

    Each unordered pair is generated once: in its own bucket only by the later row (the bucket's
    earlier members), across buckets only from the row whose chunk value has the mask's highest bit,
    which compares both ways. Except into a large bucket (more than SMALL_BUCKET rows): there both
    sides look, each for its own earliest match only (see `_expand`), so a bucket of thousands of
    near-identical hashes is not compared pair by pair.
    """
    keys = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
    members = np.argsort(keys, kind="stable")  # rows by chunk value; ascending rows within a value
    position = np.empty_like(members)
    position[members] = np.arange(len(members))
    sizes = np.bincount(keys, minlength=1 << width)
    starts = np.zeros((1 << width) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    occupied = sizes > 0  # 1 byte per chunk value: the cheap first look
    # 1. Same chunk value: each row against the earlier rows of its bucket.
    stats["lookups"] += len(keys)
    first = starts[keys]
    later = np.flatnonzero(position > first)  # rows with an earlier row in their bucket
    _expand(values, best, later, first[later], position[later] - first[later], members, max_distance, stats,
            earliest_only=True)
    # 2. Chunk values `radius` bits apart or less: from the rows that hold the mask's highest bit, and
    # from rows of large buckets for their own earliest match.
    crowded = np.flatnonzero(sizes[keys] > SMALL_BUCKET)
    for top, masks in _masks_by_top_bit(width, radius):
        rows = np.flatnonzero((keys >> top) & 1)
        row_keys = keys[rows]
        others = crowded[((keys[crowded] >> top) & 1) == 0]
        for mask in masks:
            stats["lookups"] += len(rows) + len(others)
            probe = row_keys ^ mask
            hit = np.flatnonzero(occupied[probe])
            if len(hit):
                found, probe = rows[hit], probe[hit]
                count = sizes[probe]
                small = count <= SMALL_BUCKET
                _expand(values, best, found[small], starts[probe[small]], count[small], members, max_distance, stats)
                large = ~small
                _expand(values, best, found[large], starts[probe[large]], count[large], members, max_distance,
                        stats, earliest_only=True)
            if len(others):
                probe = keys[others] ^ mask
                hit = np.flatnonzero(occupied[probe])
                probe = probe[hit]
                _expand(values, best, others[hit], starts[probe], sizes[probe], members, max_distance, stats,
                        earliest_only=True)


def group(hashes: np.ndarray, max_distance: int, stats: dict[str, int] | None = None,
          chunks: int | None = None) -> np.ndarray:
    """For each row, the index of the earliest row before it within `max_distance` bits, else -1.

    Args:
        hashes: 64-bit hashes (uint64, or anything numpy casts to it), in catalog order.
        max_distance: 0 (identical hashes only) to MAX_DISTANCE_LIMIT bits.
        stats: if given, filled with `distinct` (hashes after merging identical ones), `chunks`,
            `lookups` (table look-ups) and `comparisons` (candidate pairs compared on all 64 bits).
        chunks: how many chunks to cut the bits into (at least 3), instead of `choose_chunks`'s
            choice; the tables are then used even for few hashes. The answer is the same.

    The earliest row within the distance of row i (not of its cluster): see the module docstring.
    """
    max_distance = check_max_distance(max_distance, "max_distance")
    if max_distance is None:
        raise DuplicatesError("max_distance: None turns the search off; there is nothing to group")
    values = np.asarray(hashes)
    if values.ndim != 1:
        raise DuplicatesError(f"hashes: expected one hash per row (a 1-D array), got shape {values.shape}")
    values = values.astype(np.uint64, copy=False)
    stats = stats if stats is not None else {}
    stats.update(distinct=0, chunks=0, lookups=0, comparisons=0)
    n = len(values)
    if n == 0:
        return np.full(0, -1, dtype=np.int64)
    # 1. Merge identical hashes: distinct values in order of first appearance.
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    distinct, first_row = unique[order], first[order]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    stats["distinct"] = len(distinct)
    # 2. best[u]: the earliest distinct hash within the distance of distinct hash u (u itself at worst).
    best = np.arange(len(distinct), dtype=np.int64)
    if max_distance > 0 and len(distinct) > 1:
        if chunks is None and len(distinct) <= BRUTE_FORCE_ROWS:
            _brute_force(distinct, best, max_distance, stats)
        else:
            m = chunks or choose_chunks(len(distinct), max_distance)
            if not math.ceil(BITS / MAX_TABLE_BITS) <= m <= BITS:
                raise DuplicatesError(f"chunks: {m} is not from {math.ceil(BITS / MAX_TABLE_BITS)} to {BITS}")
            stats["chunks"] = m
            for shift, width in _chunks(m):
                _search_chunk(distinct, best, shift, width, max_distance // m, max_distance, stats)
    # 3. A row's earliest match is the first row of the best distinct hash, when that row is earlier.
    earliest = first_row[best[rank[inverse.reshape(-1)]]]
    return np.where(earliest < np.arange(n), earliest, -1).astype(np.int64)


def group_brute_force(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """The definition itself, O(n^2) in Python loops over numpy rows: the tests' reference."""
    values = np.asarray(hashes, dtype=np.uint64)
    out = np.full(len(values), -1, dtype=np.int64)
    for i in range(1, len(values)):
        close = np.flatnonzero(np.bitwise_count(values[:i] ^ values[i]) <= max_distance)
        if len(close):
            out[i] = close[0]
    return out


def roots(pointers: np.ndarray) -> np.ndarray:
    """For each row, the row its chain of `group` pointers ends at (itself when it points nowhere)."""
    found = np.where(pointers < 0, np.arange(len(pointers)), pointers)
    while True:
        step = found[found]
        if np.array_equal(step, found):
            return found
        found = step


# --- the run's columns ------------------------------------------------------------------------------


def previous_hashes(path: Location) -> dict[str, str]:
    """sha256 -> phash from an earlier results.parquet (empty when absent, unreadable or without
    them); only those two columns are read, not a million rows' every column. A hash that is not
    16 lower-case hex digits as `to_hex` writes them (edited, damaged) is left out, so its image is
    hashed again: one bad cached value must not cost every row its near-duplicate columns."""
    try:
        table = read_table(path, columns=["image_sha256", "phash"])
    except (pa.ArrowInvalid, OSError, KeyError):
        return {}
    hashes = table.column("phash")
    if not pa.types.is_string(hashes.type) and not pa.types.is_large_string(hashes.type):
        return {}
    table = table.filter(pc.fill_null(pc.and_(pc.is_valid(table.column("image_sha256")),
                                              pc.match_substring_regex(hashes, r"^[0-9a-f]{16}$")), False))
    return dict(zip(table.column("image_sha256").to_pylist(), table.column("phash").to_pylist()))


def hash_images(jobs: dict[str, str], read_bytes: Callable[[str], bytes], workers: int | None = None,
                stop: Callable[[], bool] | None = None) -> dict[str, str | None]:
    """sha256 -> phash hex of each image (sha256 -> path relative to the run folder); None where the
    file is missing or cannot be decoded (`catalogen verify` is what reports those). `stop`, asked
    between batches of HASH_BATCH images, ends the work early: the images not reached are left out."""

    def one(item: tuple[str, str]) -> tuple[str, str | None]:
        sha, path = item
        try:
            return sha, to_hex(phash_bytes(read_bytes(path)))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return sha, None

    items = list(jobs.items())
    found: dict[str, str | None] = {}
    threads = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow decodes and resizes outside the GIL
        for start in range(0, len(items), HASH_BATCH):
            if stop is not None and stop():
                break
            found.update(pool.map(one, items[start:start + HASH_BATCH]))
    return found


def add_duplicate_columns(results: pa.Table, read_bytes: Callable[[str], bytes], max_distance: int | None,
                          previous: Mapping[str, str] | None = None, hash_new: bool = True,
                          workers: int | None = None, stop: Callable[[], bool] | None = None,
                          ) -> tuple[pa.Table, dict[str, int]]:
    """The results with `phash`, `near_duplicate_of`, `near_duplicate_of_variant` and
    `near_duplicate_distance` appended (replaced if present), and counts: `hashed` (images decoded
    now), `reused` (hashes taken from `previous`, the earlier results.parquet's), `unreadable`,
    `not_hashed` (left for the next run: `hash_new` False, as on a stopped run that must finish
    within its grace period), `near_duplicates` (rows pointing at an earlier one).

    Args:
        results: the assembled results (`id`, `variant`, `status`, `image_path`, `image_sha256`).
        read_bytes: reads a file of the run folder by its relative path (`RunStore.read_bytes`).
        max_distance: see `group`; None: detection off: no image is decoded, `near_duplicate_*`
            are null, `phash` keeps the hashes `previous` knows (turned on again, nothing is redone).
        previous: sha256 -> phash of the results.parquet this run replaces (`previous_hashes`), reused.
        hash_new: False decodes no image (what `previous` does not know stays null).
        stop: asked now and then while images are decoded; True leaves the rest for the next run.
    """
    max_distance = check_max_distance(max_distance)
    n = results.num_rows
    counts = {"hashed": 0, "reused": 0, "unreadable": 0, "not_hashed": 0, "near_duplicates": 0}
    for name, _ in COLUMNS:
        if name in results.column_names:
            results = results.drop_columns([name])
    hexes: list[str | None] = [None] * n
    pointer = np.full(n, -1, dtype=np.int64)
    distance = np.zeros(n, dtype=np.int64)
    if n and (max_distance is not None or previous):
        shas = results.column("image_sha256").to_pylist()
        paths = results.column("image_path").to_pylist()
        known = dict(previous or {})
        jobs = {sha: path for sha, path in zip(shas, paths) if sha and path and sha not in known}
        if max_distance is None:
            jobs = {}
        elif not hash_new:
            counts["not_hashed"], jobs = len(jobs), {}
        if jobs:
            log.info("hashing %d new final image(s) (pHash) to find near-duplicates", len(jobs))
        found = hash_images(jobs, read_bytes, workers, stop) if jobs else {}
        counts["hashed"] = sum(1 for v in found.values() if v is not None)
        counts["unreadable"] = len(found) - counts["hashed"]
        counts["not_hashed"] += len(jobs) - len(found)
        counts["reused"] = len({sha for sha in shas if sha in known})
        known.update(found)
        hexes = [known.get(sha) if sha else None for sha in shas]
    if n and max_distance is not None:
        ok = pc.fill_null(pc.equal(results.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
        members = np.flatnonzero(ok & np.array([h is not None for h in hexes], dtype=bool))
        if len(members):
            values = from_hex([hexes[i] for i in members])
            found_in = group(values, max_distance)
            has = found_in >= 0
            pointer[members[has]] = members[found_in[has]]
            distance[members[has]] = np.bitwise_count(values[has] ^ values[found_in[has]])
    has = pointer >= 0
    counts["near_duplicates"] = int(has.sum())
    ids = pc.cast(results.column("id"), pa.string()).to_numpy(zero_copy_only=False)
    variants = results.column("variant").to_numpy(zero_copy_only=False)
    of = np.full(n, None, dtype=object)
    of_variant = np.full(n, None, dtype=object)
    of_distance = np.full(n, None, dtype=object)
    of[has] = ids[pointer[has]]
    of_variant[has] = variants[pointer[has]]
    of_distance[has] = distance[has]
    for (name, typ), values in zip(COLUMNS, (hexes, of, of_variant, of_distance)):
        results = results.append_column(pa.field(name, typ), pa.array(list(values), typ))
    metadata = dict(results.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps({"max_distance": max_distance}).encode()
    return results.replace_schema_metadata(metadata), counts


def recorded_max_distance(results: pa.Table) -> tuple[bool, int | None]:
    """(whether the results say, the distance their near_duplicate_of columns used; None: off)."""
    raw = (results.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return False, None
    try:
        return True, json.loads(raw).get("max_distance")
    except (ValueError, AttributeError):
        return False, None


def first_of_each(table: pa.Table, max_distance: int) -> np.ndarray:
    """Which rows of `table` to keep so that none is within `max_distance` of an earlier kept one's
    `phash`: every row that `group` points nowhere, over these rows only (a row without a hash is kept).

    Over all of a run's ok rows this leaves out exactly the rows with `near_duplicate_of` set; over
    fewer (an export's filters took some out) a row whose original was taken out stays, unless it
    repeats another row that stays.
    """
    hexes = table.column("phash").to_pylist()
    hashed = np.flatnonzero(np.array([h is not None for h in hexes], dtype=bool))
    keep = np.ones(table.num_rows, dtype=bool)
    if len(hashed):
        keep[hashed[group(from_hex([hexes[i] for i in hashed]), max_distance) >= 0]] = False
    return keep


def duplicate_groups(results: pa.Table) -> list[list[int]]:
    """Groups of near-duplicate rows (row indices, the kept row first, then in catalog order), each
    chain of `near_duplicate_of` pointers followed to its root; largest groups first."""
    if "near_duplicate_of" not in results.column_names:
        return []
    of = results.column("near_duplicate_of")
    members = np.flatnonzero(pc.is_valid(of).to_numpy(zero_copy_only=False))
    if not len(members):
        return []
    ids = pc.cast(results.column("id"), pa.string()).to_pylist()
    variants = results.column("variant").to_pylist()
    row_of = {(row_id, variant): i for i, (row_id, variant) in enumerate(zip(ids, variants))}
    pointers = np.full(results.num_rows, -1, dtype=np.int64)
    targets = of.to_pylist()
    target_variants = results.column("near_duplicate_of_variant").to_pylist()
    for i in members:
        pointers[i] = row_of.get((targets[i], target_variants[i]), -1)
    root = roots(pointers)
    grouped: dict[int, list[int]] = {}
    for i in np.flatnonzero(pointers >= 0):
        grouped.setdefault(int(root[i]), []).append(int(i))
    groups = [[r, *sorted(rest)] for r, rest in grouped.items()]
    return sorted(groups, key=lambda g: (-len(g), g[0]))
