"""Paths and URLs: run folders and catalogs on the local disk or on any filesystem fsspec knows.

A plain path (or a `file://` URL) stays a `pathlib.Path`, with everything a local disk offers
(atomic renames, fsync, flock). Any other URL (`s3://bucket/run`, `gs://…`) becomes a
universal_pathlib `UPath`: the same `/`, `exists()`, `glob()`, `read_bytes()` over fsspec, so the
code that walks a run folder is the same for both. What differs (how a file is written whole, how a
folder is locked, how pyarrow is handed a path) is decided here and in catalogen/store.py.

Credentials come from each backend's standard environment or profile (`AWS_ACCESS_KEY_ID`,
`AWS_PROFILE`, `AWS_ENDPOINT_URL`, `~/.aws/…`; `GOOGLE_APPLICATION_CREDENTIALS` for gs://), never
from catalogen's settings, so they appear in no run.json, log line or output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from catalogen import lease

Location = Union[Path, UPath]

# A server that accepts and never answers must not hold a run for long: s3fs tries a request 5
# times over botocore's own attempts of 15 s each (a silent server held `status` for over 5
# minutes); here botocore makes 2 attempts of at most 10 s: measured, it gives up in under 3 minutes,
# with a one-line error (`RunStore.is_run`).
BOUNDED: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                             "retries": {"max_attempts": 2, "mode": "standard"}}},
}


def location(text: str | os.PathLike[str]) -> Location:
    """A path or URL as the object the rest of catalogen walks."""
    if isinstance(text, (Path, UPath)):
        return text
    text = os.fspath(text)
    if "://" not in text:
        return Path(text)
    url = UPath(text)
    if url.protocol in ("file", "local"):
        return Path(url.path)
    # Without a listings cache: Dask workers on other machines add parts that a cached listing of
    # this process would never show.
    return UPath(text, use_listings_cache=False, **BOUNDED.get(url.protocol, {}))


def is_remote(path: Location) -> bool:
    return not isinstance(path, Path)


def absolute(path: Location) -> str:
    """A name for the path that is the same from any working directory (what run.json records)."""
    return str(path) if is_remote(path) else str(path.resolve())


def arrow_path(path: Location) -> tuple[str, Any]:
    """(path, filesystem) as pyarrow's readers take them; the filesystem is None on the local disk."""
    return (path.path, path.fs) if is_remote(path) else (str(path), None)


def read_table(path: Location, **kwargs: Any) -> pa.Table:
    where, filesystem = arrow_path(path)
    return pq.read_table(where, filesystem=filesystem, **kwargs)


def put(path: UPath, data: bytes) -> str | None:
    """Write an object in one request, so it appears whole or not at all (object stores have no
    rename; a PUT, or a multipart upload's completion, is atomic); fenced by this process's lease
    on the folder, if it holds one (catalogen/lease.py). Returns the object's ETag."""
    return lease.put(path, data)
