"""A run from start to finish, without the orchestrator: check, plan, what is pending, hand-offs.

The Prefect flow (flows/run.py) decides only ordering and concurrency; everything it needs to
know about rows, keys, shards and files comes from here, so a benchmark or a test can drive a
run with a plain loop and get the same outputs.

How stages chain:
- `upstreams` finds, for each role a stage reads ("prompt", "image"), the nearest earlier stage
  that provides it; with none, the stage reads the catalog (or the template).
- Every stage plans every row up front (no model needed). A row's key in a stage is extended
  with its keys in the stages it reads from, so a change upstream recomputes that row downstream
  and nothing else.
- A row is pending in a stage when it has no result under its key there (or a failed one, with
  `retry_failed`), or when it is pending in a stage it reads from.
- Shards are cut once per invocation over the rows pending anywhere, and keep their names through
  every stage; a shard enters stage k+1 as soon as its stage-k part exists (`stage_input`).
"""

from __future__ import annotations

import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

import catalogen
from catalogen.catalog import (
    CatalogError,
    Rule,
    expand,
    expand_rows,
    read_catalog,
    select_rows,
    column_or_nulls,
    string_ids,
    validate_catalog,
)
from catalogen import registry
from catalogen.media.credentials import credential_faults
from catalogen.media.duplicates import COLUMNS as DUPLICATE_COLUMNS
from catalogen.config import ConfigError, RunConfig, config_model, field_bounds
from catalogen.run.devices import visible_devices
from catalogen.storage.hashing import column_keys, sha256_file, stable_hash, text_digest
from catalogen.media.images import ROW_COLUMNS as IMAGE_ROW_COLUMNS
from catalogen.media.images import check_images, check_paths
from catalogen.storage.locations import Location, absolute, display, is_remote, location
from catalogen.models.loading import (
    MissingModelsError,
    ModelIdentity,
    check_loadable,
    resolve_model,
)
from catalogen.review.regenerate import regenerations, with_note
from catalogen.review.select import settings_faults
from catalogen.stage import SKIP_COLUMN, Stage
from catalogen.storage.store import ROW_KEY, RunStore, folder_fault

# Catalog columns every run understands, whatever its stages (a null means "the run's setting").
CORE_RULES = {
    "seed": Rule("int", *field_bounds(RunConfig, "seed")),
    "num_variants": Rule("int", *field_bounds(RunConfig, "num_variants")),
    "negative_prompt": Rule("str"),
}
# The catalog column a role is read from when no earlier stage provides it, and what to do without it.
ROLE_COLUMNS = {
    "prompt": ("prompt", "each row needs a prompt, or configure a `template:` that makes one from its columns"),
    "image": ("image", "each row needs an image (a path or the image's bytes), or run a stage that makes one first"),
}
SUMMARY_TYPES = {"status": pa.string(), "error": pa.string(), "stage": pa.string(), "image_path": pa.string(),
                 "image_sha256": pa.string(), "image_width": pa.int32(), "image_height": pa.int32(),
                 "product_identical": pa.bool_()}
SUMMARY_COLUMNS = tuple(SUMMARY_TYPES)
_PACKAGES = ("torch", "diffusers", "transformers", "prefect", "pyarrow", "pydantic")


def stage_modules(cfg: RunConfig) -> dict[str, Stage]:
    known = registry.stages()
    return {name: known[name] for name in cfg.stages}


def upstreams(stages: Sequence[str]) -> dict[str, dict[str, str | None]]:
    """For each stage and role it reads: the nearest earlier stage providing it, or None (the catalog).

    A role `<role>@<stage>` (e.g. `image@remove_bg`, see tasks/renditions.py) is read from that
    stage when it runs earlier, else from nowhere (None, and nothing is required of the catalog).
    """
    known = registry.stages()
    found: dict[str, dict[str, str | None]] = {}
    for position, name in enumerate(stages):
        found[name] = {}
        for role in known[name].READS:
            wanted, _, only = role.partition("@")
            providers = [s for s in stages[:position] if wanted in known[s].PROVIDES and only in ("", s)]
            found[name][role] = providers[-1] if providers else None
    return found


def catalog_rules(cfg: RunConfig) -> dict[str, Rule]:
    """Every optional per-row column this run understands, with its rule."""
    rules = dict(CORE_RULES)
    for module in stage_modules(cfg).values():
        rules.update(module.rules(cfg))
    return rules


def path_columns(cfg: RunConfig) -> list[str]:
    """Catalog columns of file paths besides `image` (a stage's `PATH_COLUMNS`, e.g. style's
    `style_image`): checked like image paths, and made absolute, before planning."""
    return [c for module in stage_modules(cfg).values() for c in getattr(module, "PATH_COLUMNS", ())]


def required_columns(cfg: RunConfig) -> dict[str, str]:
    """Columns each row must fill (with a hint): what the first reader of a role takes from the catalog."""
    needed = {}
    for roles in upstreams(cfg.stages).values():
        for role, provider in roles.items():
            if "@" in role:  # a named stage's output, taken when that stage runs (see `upstreams`)
                continue
            column, hint = ROLE_COLUMNS[role]
            if provider is None and not (role == "prompt" and _has_template(cfg)):
                needed[column] = hint
    return needed


def _has_template(cfg: RunConfig) -> bool:
    template = getattr(cfg, "template", None)
    return bool(template is not None and template.is_set())


def result_names(cfg: RunConfig) -> set[str]:
    """Every column name the results add to the catalog's own."""
    names = {"variant", *SUMMARY_COLUMNS}
    for name, module in stage_modules(cfg).items():
        names |= {f"{name}_{c}" for c in module.OUTPUT_SCHEMA.names if c not in ("id", "variant")}
    return names


def result_types(cfg: RunConfig, catalog: pa.Schema) -> dict[str, pa.DataType]:
    """The columns `select:` and `review:` rules may read, by type: the catalog's, `variant`, the
    summary (`product_identical`…), every stage's of this run's `stages` (`generate_safety_flagged`,
    `caption_status`…) and the near-duplicate columns. A column no stage of the run makes is unknown."""
    types = {f.name: f.type for f in catalog}
    types.update({"variant": pa.int32(), **SUMMARY_TYPES, **dict(DUPLICATE_COLUMNS)})
    for name, module in stage_modules(cfg).items():
        types.update({f"{name}_{f.name}": f.type for f in module.OUTPUT_SCHEMA
                      if f.name not in ("id", "variant") and not pa.types.is_list(f.type)})
    return types


def review_faults(cfg: RunConfig, catalog: pa.Schema) -> list[str]:
    """`select:` and `review:` rules the run's columns cannot satisfy (see catalogen/review/select.py)."""
    return settings_faults(cfg.select, cfg.review, result_types(cfg, catalog), cfg.origin)


def faults_error(problems: Sequence[str]) -> ConfigError:
    """One line for one fault, one indented line each for several."""
    if len(problems) == 1:
        return ConfigError(f"invalid configuration: {problems[0]}")
    return ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def config_faults(cfg: RunConfig) -> list[str]:
    """Run-level settings that cannot work, found before any catalog row is read."""
    problems = []
    for name, module in stage_modules(cfg).items():
        problems += module.config_faults(cfg)
    problems += credential_faults(cfg)  # the signing certificate and key, when outputs.credentials is set
    cache = cfg.resolved_cache_dir()
    fault = folder_fault(cache)  # asked, not made: `validate` writes nothing
    if fault:
        problems.append(f"cache_dir {str(cache)!r} is not a usable folder ({fault}) (from {cfg.origin('cache_dir')})")
    return problems


def resolve_stage_models(cfg: RunConfig) -> dict[str, dict[str, ModelIdentity]]:
    """Every stage's models, all missing ones reported at once, then checked for loadability."""
    identities: dict[str, dict[str, ModelIdentity]] = {}
    missing: list[str] = []
    for name, module in stage_modules(cfg).items():
        identities[name] = {}
        for role, spec in module.models(cfg).items():
            try:
                identities[name][role] = resolve_model(spec, cfg)
            except MissingModelsError as exc:
                missing += [m for m in exc.missing if m not in missing]
    if missing:
        raise MissingModelsError(missing)
    check_loadable({f"{stage}.{role}": i for stage, roles in identities.items() for role, i in roles.items()})
    return identities


@dataclass(frozen=True)
class Selection:
    """Part of a catalog for a trial run: the first `limit` rows or a seeded `sample`.

    A trial narrows what this invocation computes, never what the folder keeps: rows done by
    earlier runs stay in results.parquet.
    """

    limit: int | None = None
    sample: int | None = None

    def __bool__(self) -> bool:
        return self.limit is not None or self.sample is not None

    def apply(self, catalog: pa.Table, seed: int) -> pa.Table:
        return select_rows(catalog, self.limit, self.sample, seed)

    def mask(self, catalog: pa.Table, seed: int) -> np.ndarray:
        """Which catalog rows the trial takes (all of them without one)."""
        if not self:
            return np.ones(catalog.num_rows, dtype=bool)
        position = pa.array(np.arange(catalog.num_rows))
        chosen = self.apply(catalog.append_column("__position", position), seed).column("__position")
        keep = np.zeros(catalog.num_rows, dtype=bool)
        keep[chosen.to_numpy()] = True
        return keep

    def describe(self) -> str:
        return f"--limit {self.limit}" if self.limit is not None else f"--sample {self.sample}"


def validate_for_run(table: pa.Table, cfg: RunConfig, source: str = "catalog", folder: Path | None | str = "") -> pa.Table:
    """Validate a catalog table against this run's stages and template; refuse it with every fault.

    `folder` is where the catalog's relative image paths start (default: the folder of `source`;
    None: a catalog read from a URL, which has none).
    """
    required = required_columns(cfg)
    needs_images = required.pop("image", None) is not None  # a path or bytes: check_images knows both
    folder = Path(source).parent if folder == "" else folder
    table, image_faults = check_images(table, folder, cfg.images, needs_images)
    for column in path_columns(cfg):
        table, path_faults = check_paths(table, column, folder, cfg.images)
        image_faults += path_faults
    # A row that brings its own image skips generation: it needs no prompt (later stages fall back
    # to their own prompt settings).
    exempt = {"prompt": _brings_image(table)} if "prompt" in required else {}
    try:
        catalog = validate_catalog(table, catalog_rules(cfg), required, result_names(cfg), source=source, exempt=exempt)
    except CatalogError as exc:
        raise CatalogError(source, exc.faults + image_faults) from None
    if image_faults:
        raise CatalogError(source, image_faults)
    if _has_template(cfg):
        from catalogen.prompting.templates import template_faults

        faults = template_faults(cfg.template, catalog.column_names, catalog)
        if faults:
            raise CatalogError(source, faults)
    return catalog


def _brings_image(table: pa.Table) -> np.ndarray:
    has = np.zeros(table.num_rows, dtype=bool)
    for name in IMAGE_ROW_COLUMNS:
        if name in table.column_names:
            has |= table.column(name).is_valid().to_numpy(zero_copy_only=False)
    return has


def catalog_folder(catalog: Path | Any) -> Path | None:
    """Where a catalog's relative paths start: its folder; none for a catalog read from a URL."""
    return None if is_remote(catalog) else catalog.parent


def load_checked_catalog(catalog_path: str | Path, cfg: RunConfig) -> pa.Table:
    """Read and validate the catalog file."""
    where = location(catalog_path)
    return validate_for_run(read_catalog(where), cfg, source=str(where), folder=catalog_folder(where))


def check(catalog_path: str | Path, cfg: RunConfig) -> tuple[pa.Table, dict]:
    """Everything that can refuse a run, done before anything is written or a model loaded.

    Raises ConfigError, CatalogError, DeviceError, MissingModelsError or ModelError; returns the
    validated catalog and every stage's model identities.
    """
    problems = config_faults(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
    catalog = load_checked_catalog(catalog_path, cfg)
    problems = review_faults(cfg, catalog.schema)
    if problems:
        raise faults_error(problems)
    visible_devices(cfg.device)  # a device that is not there fails now, not in every shard
    return catalog, resolve_stage_models(cfg)


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    catalog_path: Path
    catalog: pa.Table  # validated input, one row per id (the whole catalog, also for a trial)
    rows: pa.Table  # one row per (id, variant): id, variant, seed, index, and the columns stages read
    config: RunConfig
    store: RunStore
    models: dict[str, dict[str, ModelIdentity]]  # stage -> role -> identity
    planned: dict[str, pa.Table]  # per stage, aligned with rows: effective parameters and chained keys
    upstream: dict[str, dict[str, str | None]] = field(default_factory=dict)
    selection: Selection = Selection()
    scope: np.ndarray | None = None  # per row: in this invocation's trial subset (None: every row)
    held: dict[str, np.ndarray] = field(default_factory=dict)  # stage -> per row: why it is held back (None: not)

    def in_scope(self) -> np.ndarray:
        return np.ones(self.rows.num_rows, dtype=bool) if self.scope is None else self.scope


def default_out(catalog_path: str | Path, cfg: RunConfig, root: str | Path = "outputs") -> Path:
    """A stable folder per (catalog file, profile): `<stem>-<hash of its absolute path>-<profile>`
    under `root` (from the working directory), as an absolute path (what every message prints).

    The same command resumes the same folder, and two catalogs with the same file name (in
    different folders) never share one.
    """
    path = location(catalog_path)
    return (Path(root) / f"{path.name.split('.')[0]}-{stable_hash(absolute(path))[:8]}-{cfg.profile}").absolute()


def base_prompts(catalog: pa.Table, cfg: RunConfig) -> tuple[pa.Array, pa.Array]:
    """Each catalog row's prompt and negative prompt before any stage: the template's, or the catalog's.

    A row's own `negative_prompt` wins over the template's.
    """
    n = catalog.num_rows
    own_negative = (catalog.column("negative_prompt").combine_chunks() if "negative_prompt" in catalog.column_names
                    else pa.nulls(n, pa.string()))
    if _has_template(cfg):
        from catalogen.prompting.templates import render_prompts

        positive, negative = render_prompts(cfg.template, catalog)
        return pa.array(positive, pa.string()), pc.coalesce(own_negative, pa.array(negative, pa.string()))
    prompt = catalog.column("prompt").combine_chunks() if "prompt" in catalog.column_names else pa.nulls(n, pa.string())
    return pc.cast(prompt, pa.string()), own_negative


def plan_rows(catalog: pa.Table, cfg: RunConfig, regenerated: pa.Table | None = None) -> pa.Table:
    """The (id, variant) rows with everything a stage's plan reads from the catalog; `regenerated`
    (catalogen/review/regenerate.py) adds variants, each with its note appended to the prompt."""
    extra, notes = _regenerated(catalog, cfg, regenerated)
    rows = expand_rows(catalog, cfg.num_variants, cfg.seed, extra)
    index = rows.column("index").to_numpy()
    positive, negative = base_prompts(catalog, cfg)
    prompt = expand(positive, index)
    if notes:
        keys = zip(rows.column("id").to_pylist(), rows.column("variant").to_pylist(), prompt.to_pylist())
        prompt = pa.array([with_note(p, notes[(i, v)]) if (i, v) in notes else p for i, v, p in keys], pa.string())
    rows = rows.append_column("prompt", prompt).append_column("negative_prompt", expand(negative, index))
    for name in [*catalog_rules(cfg), *IMAGE_ROW_COLUMNS]:
        if name in catalog.column_names and name not in rows.column_names:
            rows = rows.append_column(name, expand(catalog.column(name).combine_chunks(), index))
    return rows


def _regenerated(catalog: pa.Table, cfg: RunConfig, regenerated: pa.Table | None) -> tuple[np.ndarray | None, dict]:
    """(per catalog row, the variants regenerations add; (id, variant) -> note). A regeneration is
    used only where it follows the row's own variants without a gap (num_variants may have changed)."""
    if regenerated is None or regenerated.num_rows == 0:
        return None, {}
    ids = string_ids(catalog).to_pylist()
    position = {row_id: i for i, row_id in enumerate(ids)}
    own = pc.fill_null(column_or_nulls(catalog, "num_variants", pa.int64()), cfg.num_variants).to_numpy()
    extra = np.zeros(catalog.num_rows, dtype=np.int64)
    notes = {}
    for entry in regenerated.to_pylist():
        row = position.get(entry["id"])
        if row is not None and entry["variant"] == own[row] + extra[row]:
            extra[row] += 1
            notes[(entry["id"], entry["variant"])] = entry["note"] or ""
    return extra, notes


def plan_stages(rows: pa.Table, cfg: RunConfig, models: Mapping[str, Mapping[str, ModelIdentity]]) -> dict[str, pa.Table]:
    """Every stage's plan, keys chained to the keys of what each row reads upstream."""
    planned: dict[str, pa.Table] = {}
    links = upstreams(cfg.stages)
    for name, module in stage_modules(cfg).items():
        table = _settled_skip_keys(name, module, module.plan(rows, cfg, models[name]))
        providers = [p for p in links[name].values() if p is not None]
        if providers:
            columns = [table.column("key"), *(planned[p].column("key") for p in providers)]
            keys = column_keys(["chained", name, providers], columns)
            table = table.set_column(table.schema.get_field_index("key"), "key", keys)
        planned[name] = table
    return planned


def _settled_skip_keys(name: str, module: Stage, table: pa.Table) -> pa.Table:
    """A row the stage's own plan skips gets a key of the stage, its version and the reason only.

    Settings that do not apply to it (generate's steps for a row that brings its own image) then
    neither make it pending nor change the keys of the rows downstream that read from it.
    """
    if SKIP_COLUMN not in table.column_names:
        return table
    skipped = table.column(SKIP_COLUMN).is_valid()
    if not pc.any(skipped).as_py():
        return table
    positions = np.flatnonzero(skipped.to_numpy(zero_copy_only=False))
    settled = column_keys(["skipped", name, module.VERSION], [table.column(SKIP_COLUMN).take(pa.array(positions))])
    keys = np.array(table.column("key").to_pylist(), dtype=object)
    keys[positions] = settled.to_pylist()
    return table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))


_memo: dict[tuple, RunPlan] = {}


def prepare(
    catalog_path: str | Path,
    cfg: RunConfig,
    out: str | Path | None,
    selection: Selection = Selection(),
) -> RunPlan:
    """Check the run and plan every stage; nothing is written before all of that passes.

    The last plan is remembered per process, so the CLI's pre-flight and the flow it then runs
    read and plan a large catalog once, not twice.
    """
    catalog_path = location(catalog_path)
    stat = catalog_path.stat() if catalog_path.exists() else None
    folder = RunStore(out if out is not None else default_out(catalog_path, cfg))
    memo_key = (absolute(catalog_path), stat and (getattr(stat, "st_mtime_ns", stat.st_mtime), stat.st_size),
                cfg.model_dump_json(), str(out), selection, regenerations(folder).num_rows)
    if memo_key in _memo:
        return _memo[memo_key]
    catalog, models = check(catalog_path, cfg)
    store = RunStore(out if out is not None else default_out(catalog_path, cfg))
    rows = plan_rows(catalog, cfg, regenerations(store))
    planned = plan_stages(rows, cfg, models)
    scope = selection.mask(catalog, cfg.seed)[rows.column("index").to_numpy()] if selection else None
    plan = RunPlan(catalog_path, catalog, rows, cfg, store, models, planned, upstreams(cfg.stages), selection, scope)
    _memo.clear()
    _memo[memo_key] = plan
    return plan


# --- the folder's catalog, run.json ---------------------------------------------------------------


RECORDED = "the run folder's recorded settings (run.json)"


def run_settings(
    catalog_path: str | Path,
    out: str | Path | None,
    config: str | Path | None,
    overrides: Mapping[str, object] | None = None,
    origins: Mapping[str, str] | None = None,
) -> tuple[RunConfig, RunStore, dict | None]:
    """The settings and folder of a run, and the settings the folder was last run with (or None).

    A folder remembers: with no `--config`, a run starts from the settings recorded in its
    run.json instead of the defaults (then `--set` and flags apply), so re-running the same
    folder, or a hint's command, never silently falls back to default settings.
    """
    from catalogen.config import load_config

    cfg = load_config(config, overrides, origins)
    store = RunStore(out if out is not None else default_out(catalog_path, cfg))
    store.check_usable()
    recorded = store.read_run_json().get("config") if store.run_json.exists() else None
    if recorded is not None and config is None:
        cfg = load_config(None, overrides, origins, base=(recorded, RECORDED))
    return cfg, store, recorded


def settings_changes(recorded: Mapping | None, cfg: RunConfig) -> list[str]:
    """`key: old -> new (from …)` for every setting that differs from the folder's last run."""
    if recorded is None:
        return []
    changes = []
    for key, (old, new) in _differences(dict(recorded), cfg.model_dump(mode="json")).items():
        changes.append(f"{key}: {old!r} -> {new!r} (from {cfg.origin(key)})")
    return changes


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> dict[str, tuple]:
    found = {}
    for key in sorted(set(old) & set(new)):  # a setting new to this version of catalogen has its default
        a, b = old[key], new[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found.update(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found[f"{prefix}{key}"] = (a, b)
    return found


def rerun_command(store: RunStore, *flags: str, trial: bool = True) -> str:
    """The command that runs this folder again with the settings it was made with (see run_settings):
    within its trial subset, if it holds one and `trial`, else over the whole catalog."""
    info = store.read_run_json()
    selection = _trial_flags(info) if trial else []
    return shlex.join(["catalogen", "run", _catalog(info), "--out", display(store.root), *selection, *flags])


def repeat_trial_command(store: RunStore) -> str:
    """The command that makes a trial folder's rows again in a new folder beside it, with the same
    settings: a `--set` for each that differs from the defaults (a new folder has none recorded)."""
    info = store.read_run_json()
    changed = _differences(config_model()().model_dump(mode="json"), info.get("config", {}))
    sets = [flag for key, (_, value) in changed.items() for flag in ("--set", f"{key}={_yaml_value(value)}")]
    out = display(_free_sibling(store.root, "trial"))
    return shlex.join(["catalogen", "run", _catalog(info), "--out", out, *_trial_flags(info), *sets])


def _catalog(info: Mapping) -> str:
    return info.get("catalog", {}).get("path", "CATALOG")


def _trial_flags(info: Mapping) -> list[str]:
    return shlex.split(info["trial"]["selection"]) if isinstance(info.get("trial"), dict) else []


def _yaml_value(value: object) -> str:
    """A setting's value as `--set` reads it back (safe YAML, on one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("\n...\n").strip()


def _free_sibling(root: Location, suffix: str) -> Location:
    """`<root>-<suffix>`, else `<root>-<suffix>-2`, …: the first such folder that does not exist yet."""
    n = 1
    while True:
        candidate = location(f"{root}-{suffix}" + (f"-{n}" if n > 1 else ""))
        if not candidate.exists():
            return candidate
        n += 1


class CatalogChanged(RuntimeError):
    """The output folder was made from another catalog file."""


def check_folder_catalog(store: RunStore, catalog_path: Path, accept_new: bool) -> None:
    """Refuse to run a different catalog into a folder (its results would be replaced)."""
    if not store.run_json.exists():
        return
    recorded = store.read_run_json().get("catalog", {}).get("path")
    if recorded is None or accept_new:
        return
    if absolute(location(recorded)) != absolute(location(catalog_path)):
        raise CatalogChanged(
            f"{store.root} was made from {recorded}, not {catalog_path}; its results would be replaced "
            "by this catalog's. Use another --out, or pass --new-catalog to run this catalog into it."
        )


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "catalogen": catalogen.__version__, "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def record_invocation(plan: RunPlan, pending: Mapping[str, int], retry_failed: bool) -> None:
    """Write run.json: the configuration tasks read, and a history of every invocation."""
    store = plan.store
    previous = store.read_run_json() if store.run_json.exists() else {}
    now = datetime.now(timezone.utc).isoformat()
    invocation = {
        "started_at": now,
        "catalog": str(plan.catalog_path),
        "catalog_sha256": sha256_file(plan.catalog_path),
        "config_hash": stable_hash(plan.config.model_dump(mode="json"))[:16],
        "settings_from": dict(plan.config._origins),
        "retry_failed": retry_failed,
        "limit": plan.selection.limit,
        "sample": plan.selection.sample,
        "rows": int(plan.in_scope().sum()),
        "pending": dict(pending),
    }
    store.write_json(
        store.run_json,
        {
            "created_at": previous.get("created_at", now),
            "updated_at": now,
            "catalog": {"path": absolute(plan.catalog_path), "ids": plan.catalog.num_rows,
                        "rows": plan.rows.num_rows},
            "trial": _trial(plan, previous),
            "config": plan.config.model_dump(mode="json"),
            "models": {stage: {role: i.to_dict() for role, i in roles.items()} for stage, roles in plan.models.items()},
            "versions": _versions(),
            "invocations": previous.get("invocations", []) + [invocation],
            # seconds and bytes per row, per stage and device kind, measured by earlier runs (catalogen.run.dryrun)
            "throughput": previous.get("throughput", {}),
        },
    )


def _trial(plan: RunPlan, previous: Mapping) -> dict | None:
    """How the folder is a trial subset, or None once a run has covered the whole catalog."""
    if not plan.selection:
        return None
    earlier = previous.get("trial") if previous else None
    if previous and earlier is None and previous.get("invocations"):
        return None  # a whole-catalog run was made into this folder already
    return {"selection": plan.selection.describe(), "rows": int(plan.in_scope().sum()), "of": plan.rows.num_rows}


def read_config(store: RunStore) -> tuple[RunConfig, dict[str, dict[str, ModelIdentity]]]:
    """The configuration and model identities a task works with, from run.json."""
    from catalogen.config import config_from_dict

    info = store.read_run_json()
    models = {stage: {role: ModelIdentity(**value) for role, value in roles.items()}
              for stage, roles in info["models"].items()}
    return config_from_dict(info["config"]), models


# --- what is done, what is pending ----------------------------------------------------------------


def set_aside_unreadable_parts(plan: RunPlan) -> list[Path]:
    """Parts that cannot be read are moved aside, so their rows are redone instead of aborting the run."""
    return [p for name in plan.config.stages for p in plan.store.set_aside_unreadable(name)]


def done_results(plan: RunPlan, stage: str, columns: Sequence[str]) -> pa.Table:
    """The newest result of each planned row under its current key (nulls where none); for a row
    outside a trial's subset, its newest under any key.

    Results are matched to rows by id (a hash lookup in the catalog's ids) and variant, then kept
    only where their key is the row's current one; a row recorded more than once under its key (a
    retry, `catalogen verify`) keeps its newest. No join over millions of string keys is needed.
    """
    module = stage_modules(plan.config)[stage]
    wanted = list(dict.fromkeys(["status", *columns]))
    values = [c for c in wanted if c not in ROW_KEY]
    planned = plan.planned[stage]
    found = plan.store.stage_rows(stage, module.OUTPUT_SCHEMA, list(dict.fromkeys([*ROW_KEY, "finished_at", *values])))
    position = _planned_positions(plan, found)
    if len(position):
        usable = position >= 0
        current = planned.column("key").take(pa.array(np.where(usable, position, 0)))
        same_key = pc.fill_null(pc.equal(found.column("key"), current), False).to_numpy(zero_copy_only=False)
        if plan.scope is not None:  # a trial leaves the rows outside it as they were, under any settings
            same_key |= ~plan.scope[np.where(usable, position, 0)]
        usable &= same_key
        candidates = np.flatnonzero(usable)
        newest_first = np.lexsort((-found.column("finished_at").to_numpy().astype("int64")[candidates],
                                   position[candidates]))
        candidates = candidates[newest_first]
        rows = position[candidates]
        keep = np.concatenate([[True], rows[1:] != rows[:-1]]) if len(rows) else np.array([], bool)
        source = np.full(planned.num_rows, -1, dtype=np.int64)
        source[rows[keep]] = candidates[keep]
    else:
        source = np.full(planned.num_rows, -1, dtype=np.int64)
    take = pa.array(source, mask=source < 0)
    return pa.table({c: planned.column(c) if c in ROW_KEY else found.column(c).take(take) for c in wanted})


def _planned_positions(plan: RunPlan, found: pa.Table) -> np.ndarray:
    """The planned row each recorded result belongs to by (id, variant), or -1 if none does."""
    if found.num_rows == 0:
        return np.array([], dtype=np.int64)
    catalog_row = pc.index_in(found.column("id"), string_ids(plan.catalog))
    index = plan.rows.column("index").to_numpy()
    starts = np.searchsorted(index, np.arange(plan.catalog.num_rows))
    counts = np.diff(np.append(starts, len(index)))
    known = catalog_row.is_valid().to_numpy(zero_copy_only=False)
    row = pc.fill_null(catalog_row, 0).to_numpy().astype(np.int64)
    variant = found.column("variant").to_numpy().astype(np.int64)
    known &= variant < counts[row]
    return np.where(known, starts[row] + variant, -1)


def pending_masks(plan: RunPlan, retry_failed: bool, done: Mapping[str, pa.Table]) -> dict[str, np.ndarray]:
    """Per stage, which rows to (re)compute: no result under the key, a failure to retry, or pending
    upstream; within a trial's subset only."""
    masks: dict[str, np.ndarray] = {}
    for name in plan.config.stages:
        status = done[name].column("status")
        mask = pc.is_null(status).to_numpy(zero_copy_only=False) & plan.in_scope()
        if retry_failed:
            mask = mask | pc.fill_null(pc.equal(status, "failed"), False).to_numpy(zero_copy_only=False)
        for provider in plan.upstream[name].values():
            if provider is not None:
                mask = mask | masks[provider]
        masks[name] = mask
    return masks


NOT_APPROVED = "held back: not approved (only: approved); made on the next run after it is approved"


def approved_only(cfg: RunConfig) -> list[str]:
    """The stages that run only for approved rows (a section's `only: approved`, e.g. renditions)."""
    return [name for name in cfg.stages if getattr(getattr(cfg, name, None), "only", "all") == "approved"]


def approved_masks(plan: RunPlan, masks: Mapping[str, np.ndarray], done: Mapping[str, pa.Table],
                   approved: np.ndarray) -> dict[str, np.ndarray]:
    """The work of the `approved_only` stages once review states are known (`approved`, per planned row):
    their pending rows, and rows they held back earlier that are approved now. Sets `plan.held` for
    the pending rows that are not approved: they are recorded as skipped with `NOT_APPROVED`, so a
    later approval (a reviewer's decision) makes exactly their renditions on the next run."""
    second = {name: np.zeros(plan.rows.num_rows, dtype=bool) for name in plan.config.stages}
    for name in approved_only(plan.config):
        table = done[name]
        held = (pc.fill_null(pc.equal(table.column("status"), "skipped"), False).to_numpy(zero_copy_only=False)
                & pc.fill_null(pc.equal(table.column("error"), NOT_APPROVED), False).to_numpy(zero_copy_only=False))
        second[name] = masks[name] | (held & approved & plan.in_scope())
        plan.held[name] = np.where(approved, None, NOT_APPROVED).astype(object)
    return second


def planned_values(plan: RunPlan, results: pa.Table, column: str) -> np.ndarray:
    """A results column per planned row (matched by id and variant; None where the results lack the row)."""
    left = pa.table({"id": pc.cast(plan.rows.column("id"), pa.string()), "variant": plan.rows.column("variant"),
                     "_pos": pa.array(np.arange(plan.rows.num_rows))})
    right = pa.table({"id": pc.cast(results.column("id"), pa.string()),
                      "variant": pc.cast(results.column("variant"), plan.rows.schema.field("variant").type),
                      "_value": results.column(column)})
    joined = left.join(right, keys=["id", "variant"], join_type="left outer").sort_by("_pos")
    return joined.column("_value").to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class Shard:
    name: str
    rows: np.ndarray  # indices into plan.rows


def cut_shards(plan: RunPlan, masks: Mapping[str, np.ndarray]) -> list[Shard]:
    """The rows pending anywhere, alike rows together, cut into shards named by their content.

    A shard's name hashes its rows' keys in every stage, so the same pending work gets the same
    names on a re-run. Sorting (stable, so catalog order is kept within a kind) changes which rows
    share a shard, never a result.
    """
    work = np.flatnonzero(np.logical_or.reduce(list(masks.values()))) if masks else np.array([], np.int64)
    if not len(work):
        return []
    order_columns = {}
    for name in plan.config.stages:
        module = stage_modules(plan.config)[name]
        for column in module.SHARD_ORDER:
            values = plan.planned[name].column(column)
            if values.null_count or pc.count_distinct(values).as_py() > 1:  # a constant orders nothing
                order_columns[f"{name}.{column}"] = values.take(pa.array(work))
    if order_columns:
        order = pa.table(order_columns).append_column("_pos", pa.array(np.arange(len(work))))
        order = order.sort_by([(c, "ascending") for c in order_columns] + [("_pos", "ascending")])
        work = work[order.column("_pos").to_numpy()]
    size = plan.config.rows_per_shard
    shards = []
    identity = [plan.rows.column("id"), pc.cast(plan.rows.column("variant"), pa.string())]
    identity += [plan.planned[name].column("key") for name in plan.config.stages]
    for start in range(0, len(work), size):
        rows = work[start:start + size]
        shards.append(Shard(text_digest([c.take(pa.array(rows)) for c in identity])[:16], rows))
    return shards


# --- hand-offs between stages ---------------------------------------------------------------------


def handoff_columns(plan: RunPlan, provider: str) -> list[str]:
    """The provider's output columns its readers take (besides status and error)."""
    known = registry.stages()
    wanted = []
    for name, roles in plan.upstream.items():
        for column, (role, source) in known[name].FROM_UPSTREAM.items():
            # a provider hands off only what it makes (e.g. a product's box comes from style, not generate)
            if roles.get(role) == provider and source not in wanted and source in known[provider].OUTPUT_SCHEMA.names:
                wanted.append(source)
    return wanted


@dataclass
class ShardOutcomes:
    """What one shard has become so far, per stage: status, error and hand-off columns per row."""

    shard: Shard
    tables: dict[str, pa.Table] = field(default_factory=dict)


def initial_outcomes(shard: Shard, done: Mapping[str, pa.Table]) -> ShardOutcomes:
    """The shard's rows as recorded before this invocation (nulls where pending)."""
    take = pa.array(shard.rows)
    return ShardOutcomes(shard, {name: table.take(take) for name, table in done.items()})


def absorb_part(plan: RunPlan, outcomes: ShardOutcomes, stage: str, part: pa.Table) -> None:
    """Overlay a freshly written part onto the shard's known outcomes of `stage` (its rows win)."""
    known = outcomes.tables[stage]
    take = pa.array(outcomes.shard.rows)
    left = pa.table({"id": plan.rows.column("id").take(take), "variant": plan.rows.column("variant").take(take),
                     "_pos": pa.array(np.arange(len(outcomes.shard.rows)))})
    # Join on the keys alone and take the values by row: joins refuse list columns (a product's box).
    fresh = part.select(["id", "variant"]).append_column("_row", pa.array(np.arange(part.num_rows)))
    joined = left.join(fresh, keys=["id", "variant"], join_type="left outer").sort_by("_pos")
    rows = joined.column("_row").combine_chunks()
    matched = rows.is_valid()
    columns = {}
    for name in known.column_names:
        new = part.column(name).take(rows) if name in part.column_names else pa.nulls(len(left), known.schema.field(name).type)
        columns[name] = pc.if_else(matched, pc.cast(new, known.schema.field(name).type), known.column(name))
    outcomes.tables[stage] = pa.table(columns)


def blocked_reason(plan: RunPlan, outcomes: ShardOutcomes, stage: str) -> list[str | None]:
    """Per row of the shard: why `stage` may not run it (an upstream failure, however far up), or None."""
    reasons: list[str | None] = [None] * len(outcomes.shard.rows)
    for provider in [p for p in plan.upstream[stage].values() if p is not None]:
        own = outcomes.tables[provider]
        earlier = blocked_reason(plan, outcomes, provider)
        for row, (status, error) in enumerate(zip(own.column("status").to_pylist(), own.column("error").to_pylist())):
            if reasons[row] is not None:
                continue
            if earlier[row] is not None:
                reasons[row] = earlier[row]
            elif status == "failed":
                reasons[row] = f"{provider} failed: {error}"
            elif status is None:
                reasons[row] = f"{provider} has no result"
    return reasons


def _enhanced(outcomes: ShardOutcomes, before: list[str], mine: np.ndarray) -> pa.Table | None:
    """enhance's prompt pair for these rows when it ran before this stage: each image's recipe
    records it, so `catalogen reproduce` makes the image again without asking an LLM."""
    answers = outcomes.tables.get("enhance") if "enhance" in before[:-1] else None
    columns = [c for c in ("prompt", "negative_prompt") if answers is not None and c in answers.column_names]
    return answers.select(columns).filter(pa.array(mine)) if columns else None


def stage_input(plan: RunPlan, stage: str, outcomes: ShardOutcomes, masks: Mapping[str, np.ndarray]) -> pa.Table | None:
    """The planned rows of `stage` that this shard must (re)compute, with upstream values filled in.

    `skip_reason` is non-null for rows the stage will not run: their upstream failed, or the
    stage's own plan said so (its `skip_reason` column, e.g. a row that brings its own image
    skips generation). They are recorded as skipped, with the reason. Returns None when the
    shard has nothing to do in this stage.
    """
    mine = masks[stage][outcomes.shard.rows]
    if not mine.any():
        return None
    table = plan.planned[stage].take(pa.array(outcomes.shard.rows[mine]))
    for column, (role, source) in registry.stages()[stage].FROM_UPSTREAM.items():
        provider = plan.upstream[stage].get(role)
        if provider is None or source not in outcomes.tables[provider].column_names:
            continue
        values = outcomes.tables[provider].column(source).filter(pa.array(mine))
        index = table.schema.get_field_index(column)
        table = table.set_column(index, column, pc.coalesce(pc.cast(values, table.schema.field(column).type), table.column(column)))
    blocked = pa.array([r for r, keep in zip(blocked_reason(plan, outcomes, stage), mine) if keep], pa.string())
    if stage in plan.held:  # not approved, under `only: approved` (see `approved_only`)
        blocked = pc.coalesce(blocked, pa.array(plan.held[stage][outcomes.shard.rows[mine]], pa.string()))
    from catalogen.run.recipe import chain, recipe_columns

    # Each row's catalog fields, for the provenance its images carry (`catalogen reproduce`); the
    # runner takes these columns off before the stage sees the rows. Only the columns of this stage
    # and those before it: a later stage's column (style's scene_prompt) must not change the bytes
    # of generate's image.
    modules = stage_modules(plan.config)
    before = chain(plan.config.stages, stage)
    own = {c for name in before for c in modules[name].rules(plan.config)} | set(CORE_RULES)
    later = {c for name, module in modules.items() if name not in before
             for c in (*module.rules(plan.config), *getattr(module, "PATH_COLUMNS", ()))} - own
    rows = plan.rows.take(pa.array(outcomes.shard.rows[mine]))
    rows = rows.drop_columns([c for c in rows.column_names if c in later])
    for name, values in recipe_columns(rows, plan.config, stage, _enhanced(outcomes, before, mine)).items():
        table = table.append_column(name, values)
    if SKIP_COLUMN in table.column_names:
        own = table.column(SKIP_COLUMN)
        return table.set_column(table.schema.get_field_index(SKIP_COLUMN), SKIP_COLUMN, pc.coalesce(blocked, own))
    return table.append_column(SKIP_COLUMN, blocked)

