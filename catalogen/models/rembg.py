"""rembg's models: where their ONNX files live, how they are fetched, what identifies them.

rembg keeps named models under one home folder, `<home>/models/<name>/<name>.onnx` (an older flat
`<home>/<name>.onnx` is read too), and downloads a missing one there with pooch. catalogen's home
for them is `<cache_dir>/rembg`, handed to rembg as `U2NET_HOME`, so `catalogen models prepare`
fills the same folder a run reads, and an offline run names the file it lacks and where it goes.
A model's identity is the SHA-256 of its file, so a replaced file never reuses old results.

The tiny profile's `tiny:rembg` is built in code (catalogen.models.tiny.vision) and resolved like every
tiny model.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from catalogen.config import ModelSpec, RunConfig
from catalogen.storage.hashing import sha256_file_remembered
from catalogen.models.identity import MissingModelsError, ModelIdentity

KIND = "rembg"
# rembg's models that take one image, give one mask and live in one ONNX file rembg downloads.
REMBG_MODELS = (
    "isnet-general-use",
    "isnet-anime",
    "birefnet-general",
    "birefnet-general-lite",
    "birefnet-portrait",
    "birefnet-dis",
    "birefnet-hrsod",
    "birefnet-cod",
    "birefnet-massive",
    "bria-rmbg",
    "u2net",
    "u2netp",
    "u2net_human_seg",
    "silueta",
)


def rembg_home(cfg: RunConfig) -> Path:
    """The project's folder for rembg's models (`U2NET_HOME` while rembg opens or fetches one)."""
    return cfg.resolved_cache_dir() / "rembg"


_U2NET_HOME_LOCK = threading.Lock()


@contextmanager
def u2net_home(folder: Path) -> Iterator[None]:
    """`U2NET_HOME=<folder>` while rembg creates a session or downloads a model (under a lock, then restored).

    rembg reads its model folder from that variable only: named models live in
    `<folder>/models/<name>/<name>.onnx` (or `<folder>/<name>.onnx`), and a custom `model_path` must lie inside it.
    """
    with _U2NET_HOME_LOCK:
        previous = os.environ.get("U2NET_HOME")
        os.environ["U2NET_HOME"] = str(folder)
        try:
            yield
        finally:
            if previous is None:
                del os.environ["U2NET_HOME"]
            else:
                os.environ["U2NET_HOME"] = previous


def model_file(home: Path, name: str) -> Path:
    """Where rembg downloads model `name` under `home`."""
    return home / "models" / name / f"{name}.onnx"


def find_model_file(home: Path, name: str) -> Path | None:
    """The model's file as rembg looks for it: its own folder first, then the old flat layout."""
    for candidate in (model_file(home, name), home / f"{name}.onnx"):
        if candidate.is_file():
            return candidate
    return None


def home_of(path: Path, name: str) -> Path:
    """The rembg home a found model file lies in (the inverse of `find_model_file`)."""
    if path.parent.name == name and path.parent.parent.name == "models":
        return path.parents[2]
    return path.parent


def file_revision(path: Path) -> str:
    """SHA-256 of a model file, computed once per process while the file is unchanged."""
    return "sha256:" + sha256_file_remembered(path)


def _download(name: str, home: Path) -> Path:
    """Let rembg fetch the model into `home` (pooch checks its published checksum)."""
    from rembg.sessions import sessions

    with u2net_home(home):
        return Path(sessions[name].download_models())


def resolve_rembg(spec: ModelSpec, cfg: RunConfig) -> ModelIdentity:
    """Find a named rembg model in the project's folder, fetching it when online; pin it by its SHA-256."""
    name = spec.repo
    if name not in REMBG_MODELS:
        raise ValueError(f"unknown rembg model {name!r}; choose from {', '.join(REMBG_MODELS)} or tiny:rembg")
    home = rembg_home(cfg)
    found = find_model_file(home, name)
    if found is None:
        if cfg.is_offline():
            raise MissingModelsError([f"rembg model {name}: no file {model_file(home, name)} "
                                      f"(rembg downloads it there; the folder is <cache_dir>/rembg)"])
        found = _download(name, home)
    return ModelIdentity(name, file_revision(found), str(found), KIND)
