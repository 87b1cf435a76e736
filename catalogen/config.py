"""Run configuration: one pydantic model, loaded from YAML, overridden from the command line.

Everything a run does is decided here, so `run.json` can record it whole and a stage's
idempotency key can hash exactly the settings that change its output.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEDULERS = (
    "euler",
    "euler_a",
    "dpm++_2m",
    "dpm++_2m_karras",
    "ddim",
    "pndm",
    "lms",
    "heun",
    "unipc",
)
SchedulerName = Literal[
    "euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim", "pndm", "lms", "heun", "unipc"
]
SafetyMode = Literal["off", "flag", "withhold"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Where a model comes from and the sizes it can make.

    `repo` is a Hub repository id, a local diffusers folder, or `tiny:<name>` for the built-in
    tiny profile. `revision` pins a branch, tag or commit; the resolved commit is recorded per row.
    """

    repo: str
    kind: Literal["sd15", "sdxl"]
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant such as 'fp16'")
    default_size: int = Field(512, ge=8)
    min_size: int = Field(256, ge=8)
    max_size: int = Field(1024, ge=8)
    has_safety_checker: bool = False

    @model_validator(mode="after")
    def _sizes_consistent(self) -> "ModelSpec":
        if not self.min_size <= self.default_size <= self.max_size:
            raise ValueError("expected min_size <= default_size <= max_size")
        return self


PROFILES: dict[str, dict[str, ModelSpec]] = {
    "tiny": {
        "generate": ModelSpec(
            repo="tiny:sd15", kind="sd15", default_size=64, min_size=16, max_size=512,
            has_safety_checker=True,
        )
    },
    "tiny-sdxl": {
        "generate": ModelSpec(
            repo="tiny:sdxl", kind="sdxl", default_size=64, min_size=16, max_size=512
        )
    },
    "sd15": {
        "generate": ModelSpec(
            repo="stable-diffusion-v1-5/stable-diffusion-v1-5", kind="sd15",
            default_size=512, min_size=256, max_size=1024, has_safety_checker=True,
        )
    },
    "sdxl": {
        "generate": ModelSpec(
            repo="stabilityai/stable-diffusion-xl-base-1.0", kind="sdxl", variant="fp16",
            default_size=1024, min_size=512, max_size=2048,
        )
    },
}


class GenerateConfig(_Strict):
    """Text-to-image defaults; any catalog row may override the per-image ones."""

    model: ModelSpec | None = Field(None, description="overrides the profile's model")
    scheduler: SchedulerName = "euler"
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    width: int | None = Field(None, description="defaults to the model's native size")
    height: int | None = None
    negative_prompt: str = ""
    num_variants: int = Field(1, ge=1, le=64)
    batch_size: int = Field(
        4, ge=1, le=256,
        description="images per pipeline call, always run at this size so results do not depend on "
        "neighbours (short batches are padded); halved on out-of-memory",
    )
    safety_checker: SafetyMode | None = Field(
        None,
        description="off: don't run it; flag: record its verdict and keep the image; withhold: "
        "record it and write no image. Default: flag when the model has one, else off.",
    )


class RunConfig(_Strict):
    profile: str = "tiny"
    seed: int = Field(0, ge=0, le=2**63 - 1, description="run seed; rows without a seed derive theirs from it")
    stages: tuple[Literal["generate"], ...] = ("generate",)
    rows_per_shard: int = Field(64, ge=1, le=100_000)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    offline: bool = Field(False, description="never contact the Hub (as HF_HUB_OFFLINE=1)")
    cache_dir: Path | None = Field(None, description="where the tiny profile is built; default ~/.cache/catalogen")
    generate: GenerateConfig = GenerateConfig()

    @model_validator(mode="after")
    def _known_profile(self) -> "RunConfig":
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        model = self.model_for("generate")
        if self.generate.safety_checker not in (None, "off") and not model.has_safety_checker:
            raise ValueError(f"generate.safety_checker={self.generate.safety_checker!r} but {model.repo} has no safety checker")
        return self

    def model_for(self, stage: str) -> ModelSpec:
        override = getattr(self, stage).model
        return override if override is not None else PROFILES[self.profile][stage]

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("CATALOGEN_HOME", Path.home() / ".cache" / "catalogen"))

    def is_offline(self) -> bool:
        return self.offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def field_bounds(model: type[BaseModel], name: str) -> tuple[float, float]:
    """A field's inclusive (ge, le) limits, so catalog rows are checked against the same numbers."""
    lo, hi = -math.inf, math.inf
    for constraint in model.model_fields[name].metadata:
        lo = getattr(constraint, "ge", lo)
        hi = getattr(constraint, "le", hi)
    return lo, hi


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the file and the field."""


def parse_override(item: str) -> tuple[str, Any]:
    """`generate.steps=30` -> ("generate.steps", 30); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Read the YAML file (if any), apply dotted overrides, validate once."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError(f"invalid configuration ({source}):\n" + "\n".join(lines)) from None
