"""What an image file must carry to be made again from it alone: its row's recipe.

Every image a stage writes inside a run carries, in its provenance (the PNG's `catalogen` chunk,
see catalogen/media/pngmeta.py), a `recipe`:

- `stages`: the run's stages up to and including the one that wrote the image, in order;
- `settings`: the settings that decide its pixels: `profile`, `dtype`, `images` (without `roots`)
  and the sections of those stages (and those a stage reads besides its own, its `SETTINGS_FROM`),
  without what only changes throughput (batch sizes, request concurrency, timeouts, answer
  caches), so the same row writes the same bytes whatever those are;
- `models`: per stage and role, the repository, resolved revision and kind of every model used;
- `row`: the row as the stages' plans read it: `id`, `variant`, the effective `seed`, the base
  `prompt` and `negative_prompt` (the catalog's, or the template's), and every per-row column the
  run understands (`steps`, `style_image`, `scene_prompt`, the `image` path …);
- `inputs`: the files the row reads from outside the run folder, by reference: under the name of
  its column (`image`, a stage's `PATH_COLUMNS` such as `style_image`) or its setting
  (`stage.setting`, a stage's `PATH_SETTINGS` such as `style.style_image`), as `{path, sha256}` (a
  URL as `{url}`); an image given as bytes inside the catalog as `{catalog, id, sha256}`. They are
  not embedded: `catalogen reproduce` reads them only from where its user allows, and checks each
  against its sha256;
- `enhanced` (when `enhance` ran before the stage): enhance's answer, `{prompt, negative_prompt}`,
  as the later stages were given it, so `catalogen reproduce` needs no LLM (nor its server).

The flow hands each row's catalog fields to the runner in the shard input's `RECIPE_COLUMN`, and
the file settings it resolved in `PATHS_COLUMN` (`recipe_columns`); the runner takes them off
(`take_recipes`), and the stage reads the finished recipe from its context
(`StageContext.recipe_entry`). A stage called directly (a test, a benchmark) has no recipe, and
its files carry none. See catalogen/run/reproduce.py for the way back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa

from catalogen import registry
from catalogen.storage.hashing import sha256_bytes, sha256_file_remembered

RECIPE_COLUMN = "catalogen_recipe_row"
PATHS_COLUMN = "catalogen_recipe_paths"  # the same on every row: the path settings, resolved by the flow
RECIPE_VERSION = 1
ENHANCED = "enhanced"  # enhance's answer (`prompt`, `negative_prompt`): what the later stages were given
# Settings that change how fast rows are made, never what they become.
THROUGHPUT_ONLY = frozenset({"batch_size", "concurrency", "timeout_s", "max_retries", "retry_wait_max_s", "answer_cache"})
# Columns of the planned rows that are not the row's own (the catalog position, bytes, the variant count).
_LEFT_OUT = ("index", "image_bytes", "num_variants")


def recipe_columns(rows: pa.Table, cfg: Any, stage: str, enhanced: pa.Table | None = None) -> dict[str, pa.Array]:
    """The shard input's recipe columns: each row's catalog fields (with the prompt pair enhance
    answered, when given), and the run's file settings resolved where the flow runs (a worker's
    working folder may be another)."""
    paths = json.dumps(path_settings(cfg, stage), sort_keys=True)
    return {RECIPE_COLUMN: recipe_rows(rows, enhanced), PATHS_COLUMN: pa.array([paths] * rows.num_rows, pa.string())}


def path_settings(cfg: Any, stage: str) -> dict[str, str]:
    """`stage.setting` -> absolute path, for the settings of the chain's stages that name a file
    (their `PATH_SETTINGS`), resolved from the working folder as the stages' plans resolve them."""
    known = registry.stages()
    found: dict[str, str] = {}
    for name in chain(cfg.stages, stage):
        for setting in getattr(known[name], "PATH_SETTINGS", ()):
            value = getattr(getattr(cfg, name), setting, None)
            if value:
                path = Path(value).expanduser()
                found[f"{name}.{setting}"] = str(path if path.is_absolute() else (Path.cwd() / path).absolute())
    return found


def recipe_rows(rows: pa.Table, enhanced: pa.Table | None = None) -> pa.Array:
    """Each planned row's catalog fields as JSON text (an image given as bytes: its sha256 only;
    enhance's prompt pair under `ENHANCED`, when given)."""
    names = [c for c in rows.column_names if c not in _LEFT_OUT]
    values = rows.select(names).to_pylist()
    data = rows.column("image_bytes").to_pylist() if "image_bytes" in rows.column_names else [None] * rows.num_rows
    answers = enhanced.to_pylist() if enhanced is not None else [None] * rows.num_rows
    texts = []
    for row, blob, answer in zip(values, data, answers):
        if blob is not None:
            row["image_bytes_sha256"] = sha256_bytes(blob)
        if answer is not None:
            row[ENHANCED] = answer
        texts.append(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str))
    return pa.array(texts, pa.string())


def without_throughput(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: without_throughput(v) for k, v in value.items() if k not in THROUGHPUT_ONLY}
    return value


def chain(stages: tuple[str, ...] | list[str], stage: str) -> list[str]:
    return list(stages[: list(stages).index(stage) + 1])


def recipe_settings(cfg: Any, stage: str) -> dict[str, Any]:
    """The settings that decide the pixels of `stage`'s images (see the module docstring)."""
    dump = cfg.model_dump(mode="json")
    settings: dict[str, Any] = {
        "profile": dump["profile"],
        "dtype": dump["dtype"],
        "images": {k: v for k, v in dump["images"].items() if k != "roots"},
    }
    known = registry.stages()
    for name in chain(cfg.stages, stage):
        for section in (name, *getattr(known.get(name), "SETTINGS_FROM", ())):
            if section in dump:
                settings[section] = without_throughput(dump[section])
    return settings


def _file_input(path: str) -> dict[str, Any]:
    if "://" in path:
        return {"url": path}
    try:
        return {"path": path, "sha256": sha256_file_remembered(path)}
    except OSError:
        return {"path": path, "sha256": None}


class Recipes:
    """The recipes of one shard's rows in one stage, by (id, variant)."""

    def __init__(self, cfg: Any, models: Mapping[str, Mapping[str, Any]], stage: str, rows: list[str],
                 catalog: str | None, paths: Mapping[str, str] | None = None) -> None:
        self.stages = chain(cfg.stages, stage)
        self.settings = recipe_settings(cfg, stage)
        self.models = {name: {role: {"repo": i.repo, "revision": i.revision, "kind": i.kind}
                              for role, i in models.get(name, {}).items()} for name in self.stages}
        self.catalog = catalog
        known = registry.stages()
        self.path_columns = ["image", *(c for name in self.stages for c in getattr(known[name], "PATH_COLUMNS", ()))]
        self.path_settings = dict(paths) if paths is not None else path_settings(cfg, stage)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        for text in rows:
            row = json.loads(text)
            self.rows[(row["id"], int(row["variant"]))] = row

    def _inputs(self, row: Mapping[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for column in self.path_columns:
            if row.get(column):
                found[column] = _file_input(row[column])
        if "image" not in found and row.get("image_bytes_sha256"):
            found["image"] = {"catalog": self.catalog, "id": row["id"], "sha256": row["image_bytes_sha256"]}
        for dotted, path in self.path_settings.items():
            found[dotted] = _file_input(path)
        return found

    def entry(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """`{"recipe": …}` for a row's provenance, or nothing when the row has no recipe."""
        own = self.rows.get((row["id"], int(row["variant"])))
        if own is None:
            return {}
        fields = {k: v for k, v in own.items() if k not in ("image_bytes_sha256", ENHANCED)}
        recipe = {"version": RECIPE_VERSION, "stages": self.stages, "settings": self.settings,
                  "models": self.models, "row": fields, "inputs": self._inputs(own)}
        if ENHANCED in own:
            recipe[ENHANCED] = own[ENHANCED]
        return {"recipe": recipe}


def take_recipes(rows: pa.Table, cfg: Any, models: Mapping[str, Mapping[str, Any]], stage: str,
                 catalog: str | None) -> tuple[pa.Table, Recipes | None]:
    """The shard input without its recipe column, and the recipes it held (None without one)."""
    if RECIPE_COLUMN not in rows.column_names:
        return rows, None
    texts = rows.column(RECIPE_COLUMN).to_pylist()
    paths = None
    if PATHS_COLUMN in rows.column_names and rows.num_rows:
        paths = json.loads(rows.column(PATHS_COLUMN)[0].as_py())
    ours = [c for c in (RECIPE_COLUMN, PATHS_COLUMN) if c in rows.column_names]
    return rows.drop_columns(ours), Recipes(cfg, models, stage, texts, catalog, paths)


def run_catalog(run_json: Mapping[str, Any]) -> str | None:
    return (run_json.get("catalog") or {}).get("path")

