"""Paths and URLs: run folders and catalogs on the local disk or on any filesystem fsspec knows.

A plain path (or a URL of this machine's disk: `file:///x`, `file://localhost/x`, or any scheme
fsspec serves with its LocalFileSystem, such as `local://`) stays a `pathlib.Path`, with everything
a local disk offers (atomic renames, fsync, flock). Any other URL (`s3://bucket/run`, `gs://…`)
becomes a universal_pathlib `UPath`: the same `/`, `exists()`, `glob()`, `read_bytes()` over
fsspec, so the code that walks a run folder is the same for both. What differs (how a file is written whole, how a
folder is locked, how pyarrow is handed a path) is decided here and in catalogen/storage/store.py.

Credentials come from each backend's standard environment or profile (`AWS_ACCESS_KEY_ID`,
`AWS_PROFILE`, `AWS_ENDPOINT_URL`, `~/.aws/…`; `GOOGLE_APPLICATION_CREDENTIALS` for gs://), never
from catalogen's settings, so they appear in no run.json, log line or output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from catalogen.storage import lease

Location = Union[Path, UPath]

# A server that accepts and never answers must not hold a run for long: s3fs tries a request 5
# times over botocore's own attempts of 15 s each (a silent server held `status` for over 5
# minutes); here botocore makes 2 attempts of at most 10 s: measured, it gives up in under 3 minutes,
# with a one-line error (`RunStore.is_run`).
BOUNDED: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                             "retries": {"max_attempts": 2, "mode": "standard"}}},
}


# Where a run folder (`run --out`, the RUN of status, verify, clean, report, export) may live besides
# the local disk: object stores, each URL naming a bucket (or container); a bucket's root may hold a
# run. http(s), ftp and the like are not storage a run can lock and write: refused before any request.
FOLDER_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
FOLDER_HINT = "give a path, or a file://, s3://, gs:// or az:// URL"


class LocationError(ValueError):
    """A path or URL that cannot name what it is given for; the message says why, naming it."""


def _filesystem(scheme: str) -> type | None:
    """fsspec's filesystem class for a URL scheme (None when fsspec knows none, or cannot load it)."""
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return None


def is_local_disk(scheme: str) -> bool:
    """Whether fsspec serves `scheme://` from this machine's disk (`file`, `local`, …): judged by the
    filesystem's class, so an alias added to fsspec's registry is caught too."""
    from fsspec.implementations.local import LocalFileSystem

    found = _filesystem(scheme)
    return found is not None and issubclass(found, LocalFileSystem)


def reaches_local_files(scheme: str) -> bool:
    """Whether a `scheme://` URL can open files of this machine: the local disk itself, or a filesystem
    that opens another one it is given (caches, `dir`, archives, references, `generic`, a Dask worker's
    disk), so `zip://x::file:///etc/…` would."""
    from fsspec.implementations import cached, dask, dirfs, reference
    from fsspec.archive import AbstractArchiveFileSystem
    from fsspec.generic import GenericFileSystem

    wrappers: tuple[type, ...] = (cached.CachingFileSystem, dirfs.DirFileSystem, AbstractArchiveFileSystem,
                                  reference.ReferenceFileSystem, GenericFileSystem, dask.DaskWorkerFileSystem)
    try:
        from fsspec.implementations.chained import ChainedFileSystem  # fsspec >= 2025.10
        wrappers += (ChainedFileSystem,)
    except ImportError:
        pass
    found = _filesystem(scheme)
    return is_local_disk(scheme) or (found is not None and issubclass(found, wrappers))


def _local_path(text: str) -> Path:
    """A URL of this machine's disk as a path: `file:///x` and `file://localhost/x` are /x (RFC 8089);
    a URL naming another host, or no path at all, is refused."""
    url = urlsplit(text)
    if url.netloc.lower() not in ("", "localhost"):
        raise LocationError(f"{text} names the host {url.netloc}: a {url.scheme}:// URL reaches this machine's "
                            f"files only ({url.scheme}:///PATH or {url.scheme}://localhost/PATH)")
    if not url.path:
        raise LocationError(f"{text} names no path")
    return Path(unquote(url.path))


def location(text: str | os.PathLike[str]) -> Location:
    """A path or URL as the object the rest of catalogen walks (LocationError: it cannot be one)."""
    if isinstance(text, (Path, UPath)):
        return text
    text = os.fspath(text)
    if "://" not in text:
        return Path(text)
    scheme = text.split("://", 1)[0]
    if is_local_disk(scheme):
        return _local_path(text)
    if scheme.lower() in FOLDER_SCHEMES and not urlsplit(text).netloc:
        raise LocationError(f"{text} names no bucket: give {scheme}://BUCKET/PATH")
    try:
        url = UPath(text)
        # Without a listings cache: Dask workers on other machines add parts that a cached listing of
        # this process would never show.
        return UPath(text, use_listings_cache=False, **BOUNDED.get(url.protocol, {}))
    except (ImportError, ValueError) as exc:  # an unknown scheme, a backend not installed, a malformed URL
        raise LocationError(f"{text}: {exc}") from None


def storage_folder(text: str | Location, option: str) -> Location:
    """A run or export folder named by `option` (`--out`, `RUN`): a path, a URL of the local disk,
    or a bucket URL of FOLDER_SCHEMES; anything else is refused here, before any request is made."""
    if isinstance(text, Path):
        return text
    url = str(text)  # a UPath as its URL
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and not is_local_disk(scheme) and scheme.lower() not in FOLDER_SCHEMES:
        raise LocationError(f"{option} {url}: {scheme}:// is not storage a folder can live in; {FOLDER_HINT}")
    try:
        return location(text)
    except LocationError as exc:
        raise LocationError(f"{option} {exc}") from None


def display(where: Location | str) -> str:
    """A location as a person reads and pastes it: a URL keeps its `scheme://` (a pathlib join would
    fold `s3://b/run` into `s3:/b/run`), a path is absolute (the same from any working directory)."""
    return absolute(location(where))


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
    on the folder, if it holds one (catalogen/storage/lease.py). Returns the object's ETag."""
    return lease.put(path, data)
