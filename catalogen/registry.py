"""The stages a run can use: every module registered under the `catalogen.stages` entry points.

A stage is a module that keeps the contract of catalogen/stage.py, made known by the package that
ships it, in that package's pyproject.toml (the entry point's name is the stage's `NAME`):

    [project.entry-points."catalogen.stages"]
    shout = "my_package.shout"

catalogen registers its own eight stages (tasks/) the same way, so the core never imports them and a
new stage edits nothing here: fsspec's `fsspec.specs` and pytest's `pytest11` work alike. Pipeline
order (how stages are listed, and their settings sections) follows each module's `POSITION`: the
built-ins take 10, 20, … 70 (enhance, generate, remove_bg, style, upscale, caption, renditions; score
sits at 65), so a stage that belongs between remove_bg and style says 35; one without a `POSITION`
comes last.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from catalogen.config import attach_stage_sections

if TYPE_CHECKING:
    from catalogen.stage import Stage

GROUP = "catalogen.stages"
LAST = 1_000_000  # the position of a stage that declares none


class StageRegistryError(RuntimeError):
    """A registered stage that cannot be used; the message names the package that registered it."""


def _origin(entry: metadata.EntryPoint) -> str:
    package = entry.dist.name if entry.dist is not None else "an unknown package"
    return f"stage {entry.name!r} ({entry.value}, registered by {package})"


def _load(entry: metadata.EntryPoint) -> Stage:
    """Import one registered stage module; a broken plugin is named, not just a traceback."""
    try:
        module = entry.load()
    except Exception as exc:  # noqa: BLE001 - any import-time error of a plugin
        raise StageRegistryError(f"{_origin(entry)} failed to import: {exc}") from exc
    declared = getattr(module, "NAME", None)
    if declared != entry.name:
        raise StageRegistryError(f"{_origin(entry)} declares NAME = {declared!r}; the two names must match")
    return module


def _position(item: tuple[str, Stage]) -> tuple[float, str]:
    name, module = item
    return getattr(module, "POSITION", LAST), name


@cache
def stages() -> Mapping[str, Stage]:
    """Every registered stage by name, in pipeline order; read once per process (read-only)."""
    found: dict[str, Stage] = {}
    origins: dict[str, str] = {}
    for entry in metadata.entry_points(group=GROUP):
        if entry.name in found:
            raise StageRegistryError(f"{_origin(entry)} clashes with {origins[entry.name]}")
        found[entry.name] = _load(entry)
        origins[entry.name] = _origin(entry)
    if not found:  # catalogen's own entry points are missing: installed before they existed
        raise StageRegistryError(f"no stages are registered under the {GROUP!r} entry points; "
                                 "reinstall catalogen (`pip install -e .` in its folder, or `make install`)")
    return MappingProxyType(dict(sorted(found.items(), key=_position)))


def settings_sections() -> dict[str, type]:
    """Each registered stage's `Settings` by name, in pipeline order: its section of the run configuration."""
    return {name: stage.Settings for name, stage in stages().items()}


attach_stage_sections(settings_sections)  # the configuration learns its stages' sections from here
