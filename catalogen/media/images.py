"""Images a catalog brings: checked before any model loads, read and decoded one row at a time.

A catalog's `image` column holds, per row, either text or bytes:
- text: a path relative to the catalog file's folder, an absolute path, or a URL. A path must
  lead (after `..` and symbolic links are followed) into the catalog's folder or one of
  `images.roots`; a URL's scheme must be listed in `images.url_schemes` (none is, by default), and
  no scheme whose fsspec filesystem reaches local files (`file`, `local`, `zip`, …) can be listed.
- binary: the image file's bytes. A Hugging Face `datasets` Image column (a struct of `bytes`
  and `path`) is read the same way: its bytes where given, else its path.

`check_images` refuses a catalog whose paths climb out of those folders, point at missing or
empty files, or use a refused URL scheme, with the row ids; it stats each distinct file once
(100k files in about 4 s on this project's shared 2-core machine). It normalises the column for the stages: `image`
holds an absolute, resolved path (or the URL), `image_bytes` the bytes of binary rows. The
catalog's column as the user gave it is kept aside (`catalog_as_given`) for results.parquet, so
the results join back to the catalog: a catalog of paths shows its paths as written, a catalog
of bytes shows its bytes (to keep results small, give paths).

Faults found only when an image is decoded (a truncated or corrupt file, a file that is not an
image, more pixels than `images.max_pixels`) fail that row alone, with the reason: see
`load_image` and `ImageLoadError`.

What identifies an image in a key (`image_identity`): bytes are hashed (SHA-256), the honest
identity. Hashing a million catalog files at plan time would take minutes, so a catalog file is
identified by its resolved path, size and modification time (nanoseconds), and the stage records
the real SHA-256 of what it read per row; a stage also refuses a file whose size or time changed
between plan and read, so a result is never recorded under the identity of other content. A URL
is identified by its text: its content is fetched only when the row runs.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
from dataclasses import dataclass
import posixpath
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalogen import stopping
from catalogen.catalog import Fault, RowLabels, column_or_nulls
from catalogen.storage.hashing import sha256_bytes
from catalogen.storage.locations import is_remote, reaches_local_files

IMAGE = "image"  # the catalog column, normalised to an absolute path or URL (null for binary rows)
IMAGE_BYTES = "image_bytes"  # the bytes of binary rows (null for the others)
IMAGE_GIVEN = "__image_as_given"  # the catalog's own `image` column, for the results
ROW_COLUMNS = (IMAGE, IMAGE_BYTES)  # what the stages' plans read
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_REQUIRED_HINT = "each row needs an image (a path or the image's bytes), or run a stage that makes one first"


class ImageSettings(BaseModel):
    """The `images:` section: where catalog images may come from, and how large they may be.

    (Declared with its own strict model config, as `TemplateSettings` is: `catalogen.config`
    imports this module, so it cannot import `Strict` from there.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    roots: tuple[Path, ...] = Field(
        (), description="folders, besides the catalog's own, that image paths may point into (`~` expanded; "
        "a relative folder is taken from the catalog's folder)",
    )
    url_schemes: tuple[str, ...] = Field(
        (), description="URL schemes images may be fetched from with fsspec, e.g. https (none by default)",
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="width x height above which an image is refused before it is decoded",
    )
    fetch_timeout_s: float = Field(
        60, gt=0, description="a URL's whole download, however slowly the server sends; past it the row fails",
    )
    max_fetch_bytes: int = Field(
        256 * 2**20, ge=1, description="bytes a URL may send before the download is refused (the row fails)",
    )

    @field_validator("roots")
    @classmethod
    def _expand_home(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(Path(os.path.expanduser(root)) for root in value)

    @field_validator("url_schemes")
    @classmethod
    def _schemes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        schemes = tuple(s.strip().lower().removesuffix("://") for s in value)
        for scheme in schemes:  # file, local, and any fsspec filesystem that opens local files (zip, simplecache, …)
            if reaches_local_files(scheme):
                raise ValueError(f"'{scheme}' URLs would reach any local file: give paths, and list their folders in "
                                 "images.roots")
        return schemes


class ImageLoadError(ValueError):
    """One row's image cannot be used; the message says why (the row fails, not the run)."""


# --- checking the catalog -------------------------------------------------------------------------


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _is_binary(typ: pa.DataType) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)


def _is_hf_image(typ: pa.DataType) -> bool:
    """A Hugging Face `datasets` Image column: struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(typ):
        return False
    names = {typ.field(i).name: typ.field(i).type for i in range(typ.num_fields)}
    return set(names) == {"bytes", "path"} and _is_binary(names["bytes"]) and _is_text(names["path"])


def _split(column: pa.Array) -> tuple[pa.Array, pa.Array] | None:
    """(text, bytes) per row, each null where the row has none; None for a column of another type."""
    n = len(column)
    typ = column.type
    if pa.types.is_null(typ):
        return pa.nulls(n, pa.string()), pa.nulls(n, pa.large_binary())
    if _is_text(typ):
        return pc.cast(column, pa.string()), pa.nulls(n, pa.large_binary())
    if _is_binary(typ):
        return pa.nulls(n, pa.string()), pc.cast(column, pa.large_binary())
    if _is_hf_image(typ):
        data = pc.cast(pc.struct_field(column, "bytes"), pa.large_binary())
        path = pc.cast(pc.struct_field(column, "path"), pa.string())
        return pc.if_else(data.is_valid(), pa.scalar(None, pa.string()), path), data
    return None


def _blank_as_null(text: pa.Array) -> pa.Array:
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), False)
    return pc.if_else(blank, pa.scalar(None, pa.string()), text)


def _within(path: str, roots: Sequence[str]) -> bool:
    for root in roots:
        prefix = root if root.endswith(os.sep) else root + os.sep
        if path == root or path.startswith(prefix):
            return True
    return False


@dataclass
class _Places:
    """The folders paths may lead into, spelled as given (for `..`) and with links resolved."""

    folder: str
    lexical: list[str]
    real: list[str]
    name: str = "the catalog's folder"  # what `folder` is, in messages

    @property
    def allowed(self) -> str:
        """The places paths may lead into, in messages."""
        return self.name if self.name == "images.roots" else f"{self.name} and images.roots"

    @classmethod
    def of(cls, folder: Path | None, settings: ImageSettings, name: str = "the catalog's folder") -> "_Places":
        """`folder` None: a catalog read from a URL, whose paths may lead into `images.roots` only."""
        if folder is None:
            roots = [os.path.abspath(root) for root in settings.roots]
            return cls("", roots, [os.path.realpath(f) for f in roots], "images.roots")
        base = os.path.abspath(folder)
        folders = [base, *(os.path.normpath(os.path.join(base, root)) for root in settings.roots)]
        return cls(base, folders, [os.path.realpath(f) for f in folders], name)


def _resolve(value: str, places: _Places, parents: dict[str, str]) -> tuple[str | None, str | None]:
    """(absolute resolved path, None) for a usable file, else (None, the fault's message)."""
    if not places.folder and not os.path.isabs(value):
        return None, "is a relative path in a catalog read from a URL: give image URLs, or absolute paths in images.roots"
    lexical = os.path.normpath(os.path.join(places.folder, value))
    if not _within(lexical, places.lexical) and not _within(lexical, places.real):
        return None, f"points outside {places.allowed}"
    parent, name = os.path.split(lexical)
    if parent not in parents:
        parents[parent] = os.path.realpath(parent)
    path = os.path.join(parents[parent], name)
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            path = os.path.realpath(path)
            info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None, "file does not exist"
    except PermissionError:
        return None, "cannot be read (permission denied)"
    if not _within(path, places.real):
        return None, f"leads through a symbolic link outside {places.allowed}"
    if not stat.S_ISREG(info.st_mode):
        return None, "is not a file"
    if info.st_size == 0:
        return None, "is an empty file"
    return path, None


def _scheme_fault(url: str, scheme: str, settings: ImageSettings) -> str | None:
    if scheme not in settings.url_schemes:
        allowed = ", ".join(settings.url_schemes) or "none"
        return f"is a {scheme}:// URL, a scheme images.url_schemes does not allow (allowed: {allowed})"
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        return f"is a {scheme}:// URL, which fsspec cannot fetch here: {exc}"
    if "::" in url:  # fsspec would chain it onto another filesystem (`zip://x::file:///…`), the local disk too
        return "chains filesystems with '::': give one plain URL"
    return None


def _text_values(text: pa.Array, places: _Places, settings: ImageSettings) -> tuple[pa.Array, pa.Array]:
    """Each row's normalised path (or URL) and its fault message, from each distinct value once."""
    distinct = pc.unique(text.drop_null())
    normalised: list[str | None] = []
    messages: list[str | None] = []
    parents: dict[str, str] = {}
    for value in distinct.to_pylist():
        url = _URL.match(value)
        if url:
            message = _scheme_fault(value, url.group(1).lower(), settings)
            normalised.append(None if message else value)
            messages.append(message)
            continue
        path, message = _resolve(value, places, parents)
        normalised.append(path)
        messages.append(message)
    where = pc.index_in(text, distinct)
    return pa.array(normalised, pa.string()).take(where), pa.array(messages, pa.string()).take(where)


def _mask(values: pa.Array) -> np.ndarray:
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False)


def _faults_by_message(messages: pa.Array, text: pa.Array, labels: RowLabels) -> list[Fault]:
    faults = []
    for message in pc.unique(messages.drop_null()).to_pylist():
        rows = pc.fill_null(pc.equal(messages, message), False)
        example = text.filter(rows)[0].as_py()
        faults.append(Fault(f"{message} (e.g. {example!r})", IMAGE, labels.pick(_mask(rows))))
    return faults


def check_images(
    table: pa.Table, folder: Path | None, settings: ImageSettings, required: bool = False
) -> tuple[pa.Table, list[Fault]]:
    """Check the catalog's `image` column and normalise it; returns the table and every fault.

    `folder` is the catalog file's folder (relative paths start there); `required`: each row must
    bring an image (the run's first image reader reads the catalog). The returned table has
    `image` (absolute resolved paths or URLs), `image_bytes` and the column as given
    (`IMAGE_GIVEN`, see `catalog_as_given`); without an `image` column it is returned unchanged.
    """
    labels = RowLabels(table)
    faults = []
    if IMAGE_BYTES in table.column_names or IMAGE_GIVEN in table.column_names:
        name = IMAGE_BYTES if IMAGE_BYTES in table.column_names else IMAGE_GIVEN
        faults.append(Fault(f"is a name catalogen uses for image data; put images (paths or bytes) in '{IMAGE}'", name))
    if IMAGE not in table.column_names:
        if required:
            faults.append(Fault(f"required column is missing ({_REQUIRED_HINT})", IMAGE))
        return table, faults
    given = table.column(IMAGE).combine_chunks()
    split = _split(given)
    if split is None:
        kind = "must hold text (a path or URL) or binary (the image's bytes)"
        return table, faults + [Fault(f"{kind}, found {given.type}", IMAGE)]
    text, data = split
    text = _blank_as_null(text)
    paths, messages = _text_values(text, _Places.of(folder, settings), settings)
    faults += _faults_by_message(messages, text, labels)
    empty = pc.fill_null(pc.equal(pc.binary_length(data), 0), False)
    if pc.any(empty).as_py():
        faults.append(Fault("holds empty bytes", IMAGE, labels.pick(_mask(empty))))
    missing = pc.and_(text.is_null(), data.is_null())
    if required and pc.any(missing).as_py():
        faults.append(Fault("is null or blank", IMAGE, labels.pick(_mask(missing))))
    normalised = table.set_column(table.schema.get_field_index(IMAGE), IMAGE, paths)
    normalised = normalised.append_column(IMAGE_BYTES, data)
    return normalised.append_column(IMAGE_GIVEN, given), faults


def check_paths(table: pa.Table, column: str, folder: Path | None, settings: ImageSettings) -> tuple[pa.Table, list[Fault]]:
    """A catalog column of file paths (e.g. a row's `style_image`) checked and made absolute.

    The same rules as `image` paths: relative to the catalog's folder or inside `images.roots`,
    no climbing out, no links leading out, the file must exist. Null and blank cells stay null.
    """
    if column not in table.column_names:
        return table, []
    given = table.column(column).combine_chunks()
    if not _is_text(given.type):
        return table, [Fault(f"must hold text (a path), found {given.type}", column)]
    text = _blank_as_null(pc.cast(given, pa.string()))
    paths, messages = _text_values(text, _Places.of(folder, settings), settings)
    faults = []
    for message in pc.unique(messages.drop_null()).to_pylist():
        rows = pc.fill_null(pc.equal(messages, message), False)
        faults.append(Fault(f"{message} (e.g. {text.filter(rows)[0].as_py()!r})", column, RowLabels(table).pick(_mask(rows))))
    return table.set_column(table.schema.get_field_index(column), column, paths), faults


def image_file_fault(value: str, folder: Path, settings: ImageSettings, folder_name: str) -> str | None:
    """Why one image path of the run's settings (e.g. `style.style_image`) cannot be used, or None.

    The rules of a catalog's paths, with `folder` (called `folder_name` in messages) in place of the
    catalog's folder; a URL is refused (such settings are read as files), and the file must decode
    as an image within `max_pixels`: one bad setting refuses the run instead of failing every row.
    """
    if _URL.match(value):
        return "is a URL; give a file path"
    path, message = _resolve(value, _Places.of(folder, settings, folder_name), {})
    if message is not None:
        return message
    try:
        decode_image(_read_file(Path(path)), settings, path)
    except ImageLoadError as exc:
        return str(exc)
    return None


def file_in_roots(value: str, settings: ImageSettings) -> tuple[str | None, str | None]:
    """(the resolved path, None) when the absolute path `value` is a file inside `images.roots`
    (after `..` and links), else (None, why not): the rule for a catalog read from a URL, which has
    no folder of its own (`catalogen reproduce` holds a recipe's recorded paths to it)."""
    return _resolve(value, _Places.of(None, settings), {})


def catalog_as_given(catalog: pa.Table) -> pa.Table:
    """A checked catalog with its `image` column as the user gave it (for results.parquet)."""
    if IMAGE_GIVEN not in catalog.column_names:
        return catalog
    given = catalog.column(IMAGE_GIVEN)
    restored = catalog.set_column(catalog.schema.get_field_index(IMAGE), IMAGE, given)
    return restored.drop_columns([IMAGE_BYTES, IMAGE_GIVEN])


# --- identity ---------------------------------------------------------------------------------------


def file_identity(path: str) -> str:
    """What stands for a catalog file's content in a key: resolved path, size, modification time."""
    info = os.stat(path)
    return f"file:{path}:{info.st_size}:{info.st_mtime_ns}"


def image_identity(source_image: str | None, source_bytes: bytes | None) -> str | None:
    """A row's image as a key sees it: SHA-256 of bytes; path, size and time of a catalog file; a URL's text.

    None where the row brings no image of its own (its image then comes from an upstream stage,
    whose key the pipeline chains), or where the file is gone (the row fails when it runs).
    """
    if source_image is not None:
        if _URL.match(source_image):
            return f"url:{source_image}"
        try:
            return file_identity(source_image)
        except OSError:
            return None
    if source_bytes is not None:
        return f"sha256:{sha256_bytes(source_bytes)}"
    return None


def image_identities(images: pa.Array, image_bytes: pa.Array) -> pa.Array:
    """`image_identity` of every row (aligned arrays of the normalised catalog columns)."""
    found = [image_identity(path, data) for path, data in zip(images.to_pylist(), _iter_bytes(image_bytes))]
    return pa.array(found, pa.string())


def catalog_sources(rows: pa.Table) -> dict[str, pa.Array]:
    """An image stage's plan columns for the catalog's own image of each row: `source_image` (a
    path or URL), `source_bytes`, and `source_identity` (what the key holds; `read_planned` checks
    it). The pipeline replaces `source_image` with an upstream stage's image where there is one."""
    image = column_or_nulls(rows, "image", pa.string())
    data = column_or_nulls(rows, "image_bytes", pa.large_binary())
    return {"source_image": image, "source_bytes": data, "source_identity": image_identities(image, data)}


def _iter_bytes(column: pa.Array) -> Iterator[bytes | None]:
    """The bytes of each row without copying the whole column into a Python list first."""
    for scalar in column:
        yield scalar.as_py()


# --- reading and decoding ---------------------------------------------------------------------------


def _read_url(url: str, settings: ImageSettings) -> bytes:
    scheme = _URL.match(url).group(1).lower()
    if scheme not in settings.url_schemes:
        raise ImageLoadError(f"{url}: the {scheme}:// scheme is not in images.url_schemes")
    if "::" in url:
        raise ImageLoadError(f"{url}: chains filesystems with '::'; give one plain URL")
    import fsspec

    def fetch(cancelled: threading.Event) -> bytes:
        chunks, size = [], 0
        with fsspec.open(url, "rb") as handle:
            while not cancelled.is_set() and (chunk := handle.read(1 << 16)):
                size += len(chunk)
                if size > settings.max_fetch_bytes:
                    raise ImageLoadError(f"{url} is larger than images.max_fetch_bytes={settings.max_fetch_bytes}")
                chunks.append(chunk)
        return b"".join(chunks)

    try:
        return stopping.bounded(fetch, settings.fetch_timeout_s, f"fetching {url}")
    except (ImageLoadError, stopping.Abandoned):
        raise
    except Exception as exc:  # noqa: BLE001 - every fsspec backend raises its own kinds
        raise ImageLoadError(f"could not fetch {url}: {type(exc).__name__}: {exc}") from exc


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path} is a folder, not an image file") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


def _inside_run(relative: str, run_root: Path) -> Path:
    """An upstream stage's image: a path inside the run folder, never outside it."""
    if is_remote(run_root):  # a bucket has no links: the name alone decides
        clean = posixpath.normpath(relative)
        if clean == ".." or clean.startswith(("../", "/")):
            raise ImageLoadError(f"{relative!r} leads outside the run folder {run_root}")
        return run_root / clean
    root = run_root.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ImageLoadError(f"{relative!r} leads outside the run folder {root}")
    return path


def read_source(
    source_image: str | None, source_bytes: bytes | None, run_root: Path, settings: ImageSettings
) -> bytes:
    """A row's image file as bytes: an upstream image (a path relative to the run folder), a catalog
    file (absolute), a URL, else the catalog's bytes."""
    if source_image is not None:
        if _URL.match(source_image):
            data = _read_url(source_image, settings)
        elif os.path.isabs(source_image):
            data = _read_file(Path(source_image))
        else:
            data = _read_file(_inside_run(source_image, run_root))
        where = source_image
    elif source_bytes is not None:
        data, where = source_bytes, "the catalog's bytes"
    else:
        raise ImageLoadError("the row has no image")
    if not data:
        raise ImageLoadError(f"{where} is empty")
    return data


def decode_image(data: bytes, settings: ImageSettings, where: str = "the image") -> Image.Image:
    """Decode image bytes, refusing more than `max_pixels` from the header, before the pixels are read.

    EXIF orientation is applied (what a viewer shows) and the pixels come back in `stage_mode`
    (8-bit RGB or RGBA, 16-bit and float images scaled, not clipped). Truncated or corrupt files, files that are
    not images and decompression bombs raise ImageLoadError. PIL's own bomb limit
    (`Image.MAX_IMAGE_PIXELS`, twice it raises) applies as well, whatever `max_pixels` says.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageLoadError(f"{where} is not an image PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{where} is refused as a decompression bomb: {exc}") from None
    width, height = image.size
    if width * height > settings.max_pixels:
        raise ImageLoadError(f"{where} is {width}x{height} = {width * height} pixels, over images.max_pixels="
                             f"{settings.max_pixels}")
    try:
        image.load()
        return stage_mode(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's plugins raise these for broken files
        raise ImageLoadError(f"{where} is truncated or corrupt ({exc})") from None


def _scale_of(pixels: np.ndarray, mode: str) -> float:
    """The value that stands for white in a wide grey image (see `stage_mode`)."""
    if mode != "F":
        return 65535.0
    top = float(np.nanmax(pixels, initial=0.0))
    return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0


def _wide_grey(image: Image.Image) -> Image.Image:
    """An I;16*, I or F image scaled into 8-bit grey (Pillow's own conversion clips at 255: white)."""
    pixels = np.asarray(image)
    scale = _scale_of(pixels, image.mode)
    grey = np.nan_to_num(pixels.astype(np.float32) * np.float32(255.0 / scale))  # float32: exact for 16 bits
    grey = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if not isinstance(key, (int, float)):
        return grey.convert("RGB")
    alpha = Image.fromarray(np.where(pixels == key, 0, 255).astype(np.uint8), "L")
    return Image.merge("RGBA", (grey, grey, grey, alpha))


def _cmyk(image: Image.Image) -> Image.Image:
    """CMYK to RGB through the file's own ICC profile where it has one (else Pillow's plain formula)."""
    profile = image.info.get("icc_profile")
    if profile:
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the plain formula below
    return image.convert("RGB")


def stage_mode(image: Image.Image) -> Image.Image:
    """`image` as every stage reads it: 8-bit RGB, or RGBA where it has transparency.

    16-bit grey (I;16, I;16B, and I as Pillow's decoders fill it) is scaled from 0..65535; float
    grey (F) from 0..1 when no value exceeds 1, else 0..255 when none exceeds 255, else 0..65535
    (the range picked from the image's largest value; NaN is black). A transparency key (tRNS)
    becomes alpha; CMYK goes through its ICC profile when it brings one.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _wide_grey(image)
    if mode == "CMYK":
        return _cmyk(image)
    has_alpha = mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in image.info
    target = "RGBA" if has_alpha else "RGB"
    return image if mode == target else image.convert(target)


def load_image(
    source_image: str | None, source_bytes: bytes | None, run_root: Path, settings: ImageSettings
) -> Image.Image:
    """A row's image, decoded: relative path = inside the run folder, absolute = a catalog file, else bytes.

    Raises ImageLoadError with the reason (missing, unreadable, empty, not an image, too large).
    """
    data = read_source(source_image, source_bytes, run_root, settings)
    return decode_image(data, settings, source_image or "the catalog's bytes")


def open_input(row: Mapping[str, Any], run_root: Path, settings: ImageSettings) -> Image.Image:
    """An image stage's input for a planned row (`source_image`, else `source_bytes`; see
    `read_planned`), fully loaded, as RGB, or RGBA when it has transparency (a cut-out keeps its
    alpha). Raises ImageLoadError."""
    _, image = read_planned(row["source_image"], row["source_identity"], row["source_bytes"], run_root, settings)
    return image


def read_planned(
    source_image: str | None, source_identity: str | None, source_bytes: bytes | None, run_root: Path,
    settings: ImageSettings,
) -> tuple[bytes, Image.Image]:
    """A planned row's image bytes and decoded image; a catalog file must still be the one its key was made from.

    `source_identity` is what the plan recorded (`image_identity`); a catalog file whose size or
    time changed since then raises ImageLoadError, so a result is never recorded under the key of
    other content. An upstream stage's image (which replaced the catalog's at hand-off) is not the
    file that identity describes; the upstream key stands for it.
    """
    if source_image is not None and source_identity is not None and source_identity.startswith(f"file:{source_image}:"):
        try:
            now = file_identity(source_image)
        except OSError as exc:
            raise ImageLoadError(f"cannot read {source_image}: {exc.strerror or exc}") from None
        if now != source_identity:
            raise ImageLoadError(f"{source_image} changed (size or time) since the run was planned; run again to use it")
    data = read_source(source_image, source_bytes, run_root, settings)
    return data, decode_image(data, settings, source_image or "the catalog's bytes")
