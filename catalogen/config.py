"""Run configuration: one pydantic model, loaded from YAML, overridden from the command line.

Everything a run does is decided here, so `run.json` can record it whole and a stage's
idempotency key can hash exactly the settings that change its output. The run-wide settings are
declared below; each stage adds its own section (`generate:`, `enhance:` …) from its module's
`Settings`, so adding a stage never edits this file (see `config_model`). The registry attaches
those sections (`attach_stage_sections`): the configuration never asks for the stages.

A value's origin (the YAML file, a `--set`, a named flag) is remembered, so an error says which
one to fix.
"""

from __future__ import annotations

import copy

import difflib
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from catalogen.media.credentials import CredentialSettings
from catalogen.media.duplicates import DuplicatesSettings
from catalogen.media.images import ImageSettings
from catalogen.prompting.templates import TemplateSettings

# The model profiles every stage maps to its own models (see each stage's `PROFILES`).
PROFILES = ("tiny", "tiny-sdxl", "sd15", "sdxl")
ProfileName = Literal["tiny", "tiny-sdxl", "sd15", "sdxl"]


class Strict(BaseModel):
    """Settings refuse unknown keys (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """Where a model comes from.

    `repo` is a Hub repository id, a local folder, or `tiny:<name>` for the built-in tiny profile.
    `revision` pins a branch, tag or commit; the resolved commit is recorded per row.
    """

    repo: str
    kind: str = Field(description="what loads it: sd15, sdxl, llm, …; decides the files a folder must hold")
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant such as 'fp16'")
    files: list[str] | None = Field(
        None, description="glob patterns of the files to fetch from the Hub (huggingface_hub's allow_patterns); "
        "default: what the stage loads, else every safetensors, JSON and tokenizer file",
    )


def as_model_spec(value: Any, kind: str) -> Any:
    """A setting that names only a repo id or folder (`caption.model: Salesforce/blip2-opt-6.7b`) as a
    model spec of the kind the setting loads; a full spec is left as it is (a `mode="before"` validator)."""
    if isinstance(value, str):
        return {"repo": value, "kind": kind}
    return value


class DiffusionSpec(ModelSpec):
    """A Stable Diffusion pipeline, and the image sizes it can make."""

    kind: Literal["sd15", "sdxl"]
    default_size: int = Field(512, ge=8)
    min_size: int = Field(256, ge=8)
    max_size: int = Field(1024, ge=8)
    has_safety_checker: bool = False

    @model_validator(mode="after")
    def _sizes_consistent(self) -> "DiffusionSpec":
        if not self.min_size <= self.default_size <= self.max_size:
            raise ValueError("expected min_size <= default_size <= max_size")
        return self


class OutputSettings(Strict):
    """What the finished images carry besides their pixels."""

    credentials: CredentialSettings | None = Field(
        None, description="sign every final image and rendition with a C2PA manifest (content credentials): "
        "certificate chain and private key, see catalogen/media/credentials.py; null: off",
    )


class DaskSettings(Strict):
    """Where the dask runner sends shards: a running cluster, or a local one it starts for the run."""

    address: str | None = Field(
        None, description="scheduler of a running cluster, e.g. tcp://host:8786; none: start a local cluster",
    )
    workers: int | None = Field(
        None, ge=1, le=1024, description="worker processes of a local cluster; default one per GPU, else 2 on the CPU",
    )


Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Amount = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class BudgetSettings(Strict):
    """What one invocation of `catalogen run` may spend; reaching any one stops it as a stop does."""

    device_hours: Amount | None = Field(None, description="device time held by the stages, in hours")
    cost: Amount | None = Field(None, description="money, in the unit of `costs:` prices (needs `costs:`)")
    wall_hours: Amount | None = Field(None, description="wall-clock time of the invocation, in hours")


class SelectSettings(Strict):
    """Best-of-N: which candidates (variants) of each id ship. Rules are checked against the run's
    columns before any work (catalogen/review/rules.py); selection is computed when results.parquet
    is written, so a change here re-ranks and re-runs no stage."""

    by: str | None = Field(
        None, description="the score candidates are ranked by, highest first: a numeric column or + - * / of "
        "columns and numbers, e.g. `score_aesthetic + 0.05 * score_clip`; none: by variant, lowest first",
    )
    require: list[str] = Field(
        [], description="rules a candidate must pass to be chosen, as `export --where`: `product_identical == true`",
    )
    keep: int = Field(1, ge=1, le=64, description="candidates chosen per id")

    def is_set(self) -> bool:
        """Whether the run chooses at all: without `by` or `require`, every candidate that succeeded ships."""
        return self.by is not None or bool(self.require)


class ReviewSettings(Strict):
    """Quality gates over the chosen candidates: rejected when any `reject_if` rule holds, approved
    when every `approve_if` rule holds (none listed: nothing is approved without a person), else
    needs_review. No `review:` section: every chosen candidate is approved."""

    approve_if: list[str] = Field([], description="rules that, all holding, approve a chosen candidate")
    reject_if: list[str] = Field([], description="rules of which any, holding, rejects a chosen candidate")


class RunConfig(Strict):
    """The run-wide settings; `config_model()` adds one section per registered stage."""

    profile: ProfileName = "tiny"
    seed: int = Field(0, ge=0, le=2**63 - 1, description="run seed; rows without a seed derive theirs from it")
    stages: tuple[str, ...] = Field(("generate",), min_length=1, description="the stages to run, in order")
    num_variants: int = Field(1, ge=1, le=64, description="images per catalog row (a row's `num_variants` column overrides)")
    rows_per_shard: int = Field(64, ge=1, le=100_000)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    offline: bool = Field(False, description="never contact the Hub (as HF_HUB_OFFLINE=1)")
    cache_dir: Path | None = Field(None, description="where the tiny profile is built; default ~/.cache/catalogen")
    lease_timeout_s: float = Field(
        3600, gt=0, description="how long a shard waits for a free device before it fails (the holder is logged)"
    )
    stop_grace_s: float = Field(
        25, ge=0, le=3600,
        description="on SIGINT / SIGTERM (a Prefect cancel), how long shards in flight may finish before they are "
        "abandoned (their rows stay pending). A Prefect worker sends SIGKILL 30 s after its SIGTERM",
    )
    runner: Literal["threads", "dask"] = Field(
        "threads", description="threads: shards run in this process; dask: in the worker processes of a Dask "
        "cluster (one per GPU), models resident per worker",
    )
    dask: DaskSettings = Field(DaskSettings(), description="the dask runner's cluster")
    model_memory_gb: float | None = Field(
        None, gt=0,
        description="models kept loaded per device and process; past it the least recently used is released. "
        "Default: 80% of a GPU's memory, 50% of RAM on the CPU",
    )
    template: TemplateSettings = Field(
        TemplateSettings(), description="Jinja2 templates that make each row's prompt from its columns"
    )
    images: ImageSettings = Field(
        ImageSettings(), description="where a catalog's `image` paths may point, URL schemes allowed, size limit"
    )
    outputs: OutputSettings = Field(OutputSettings(), description="what the finished images carry (content credentials)")
    duplicates: DuplicatesSettings = Field(
        DuplicatesSettings(), description="near-duplicate final images, found by pHash at the end of a run"
    )

    costs: dict[str, Price] = Field(
        {}, description="price per device-hour by device kind (cpu, cuda) or name ('NVIDIA H100 80GB HBM3'); "
        "a name wins over a kind. None: costs are null, not 0",
    )
    budget: BudgetSettings = Field(BudgetSettings(), description="what one invocation may spend; none: no limit")
    select: SelectSettings = Field(SelectSettings(), description="best-of-N: which candidates of each id ship")
    review: ReviewSettings | None = Field(None, description="quality gates; none: every chosen candidate is approved")

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.expanduser(value))

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")

    @field_validator("runner")
    @classmethod
    def _runner_devices(cls, value: str, info: ValidationInfo) -> str:
        # A Dask worker sees only its own GPU (CUDA_VISIBLE_DEVICES), always as cuda:0.
        device = info.data.get("device", "auto")
        if value == "dask" and device.startswith("cuda:"):
            raise ValueError(f"runner dask gives each worker its own GPU: use device auto or cuda, not {device!r}, "
                             "and choose the GPUs with CUDA_VISIBLE_DEVICES")
        return value

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: tuple[str, ...]) -> tuple[str, ...]:
        # A field validator, not a model one: its error then sits at `stages`, whose origin
        # (`--stages`, `--set stages=…`, the file) the message names.
        known = stage_sections()
        unknown = [s for s in stages if s not in known]
        if unknown:
            named = "; ".join(f"unknown stage {name!r}" + _did_you_mean(name, list(known)) for name in unknown)
            raise ValueError(f"{named}{'' if named.endswith('?') else '.'} Known stages: {', '.join(known)}")
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice in {list(stages)}")
        return stages

    def origin(self, dotted: str) -> str:
        """Where a setting's value came from: a file, a flag, or the defaults."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            found = self._origins.get(".".join(parts[:end]))
            if found:
                return found
        return self._origins.get("", "defaults")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("CATALOGEN_HOME", Path.home() / ".cache" / "catalogen")).expanduser()

    def is_offline(self) -> bool:
        return self.offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


_stage_sections: Callable[[], Mapping[str, type[BaseModel]]] | None = None


def attach_stage_sections(sections: Callable[[], Mapping[str, type[BaseModel]]]) -> None:
    """Where the stages' sections come from: name -> `Settings`, in pipeline order (catalogen.registry
    attaches its own as it is imported, so this module sits below the stages it configures)."""
    global _stage_sections
    _stage_sections = sections
    config_model.cache_clear()


def stage_sections() -> Mapping[str, type[BaseModel]]:
    """Each stage's settings section by name, in pipeline order, as attached."""
    if _stage_sections is None:
        raise RuntimeError("no stages attached to the configuration: import catalogen.registry first")
    return _stage_sections()


@lru_cache(maxsize=1)
def config_model() -> type[RunConfig]:
    """`RunConfig` with one section per registered stage (attached by catalogen.registry), each defaulting to its `Settings()`."""
    sections: dict[str, Any] = {name: (settings, settings()) for name, settings in stage_sections().items()}
    return create_model("RunConfig", __base__=RunConfig, **sections)


def field_bounds(model: type[BaseModel], name: str) -> tuple[float, float]:
    """A field's inclusive (ge, le) limits, so catalog rows are checked against the same numbers."""
    lo, hi = -math.inf, math.inf
    for constraint in model.model_fields[name].metadata:
        lo = getattr(constraint, "ge", lo)
        hi = getattr(constraint, "le", hi)
    return lo, hi


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the setting and where it came from."""


def parse_override(item: str) -> tuple[str, Any]:
    """`generate.steps=30` -> ("generate.steps", 30); the value is read as (safe) YAML, except one
    starting with `#` (`color=#000000`), which YAML would read as a comment, i.e. as no value at all."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not of the form key.path=value")
    if raw.strip().startswith("#"):
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"--set {item}: the value is not valid YAML ({problem}); quote it if it is text") from None
    return key.strip(), value


def _set_path(data: dict, dotted: str, value: Any, origin: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"{origin}: cannot set {dotted!r}, because {where!r} is not a section")
        node = child
    node[leaf] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, found {type(loaded).__name__}")
    return loaded or {}


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The setting names a section accepts, to suggest one for a misspelled key."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # An optional section (`X | None`, e.g. outputs.credentials) suggests X's settings.
        annotation = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                          annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _did_you_mean(word: str, known: list[str], prefix: str = "") -> str:
    """`; did you mean 'x'?` for the closest known name to a misspelled one (settings, stages), else ''."""
    close = difflib.get_close_matches(word, known, n=1)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _explain(exc: ValidationError, model: type[RunConfig], origins: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            section = "".join(f"{part}." for part in loc[:-1])
            message = "unknown setting" + _did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]), section)
        probe = RunConfig.model_construct()
        probe._origins = dict(origins)
        lines.append(f"  {dotted or '(top level)'}: {message} (from {probe.origin(dotted)})")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    origins: Mapping[str, str] | None = None,
    base: tuple[Mapping[str, Any], str] | None = None,
) -> RunConfig:
    """Read the YAML file (if any), apply dotted overrides, validate once.

    `origins` names where each override came from (e.g. "--profile"); by default "--set KEY".
    A None override means "not given" and leaves the file's or the default value alone.
    `base` is (settings, where they came from) to start from instead of the defaults when no file
    is given: a run folder's recorded settings.
    """
    model = config_model()
    data: dict[str, Any] = {}
    seen: dict[str, str] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        seen[""] = str(path)
    elif base is not None:
        data = copy.deepcopy(dict(base[0]))
        seen[""] = base[1]
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        source = (origins or {}).get(key) or f"--set {key}={value}"
        _set_path(data, key, value, source)
        seen[key] = source
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid configuration:\n" + _explain(exc, model, seen)) from None
    cfg._origins = seen
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """A configuration recorded in run.json, read back by the tasks."""
    return config_model().model_validate(dict(data))
