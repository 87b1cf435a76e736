"""Run a rebuilt one-row catalog (catalogen/run/reproduce.py) through the same check, plan and flow as
`catalogen run`, in its own folder, and compare the image it makes with the original.

Models: every Hub model is pinned to the commit the image records (`hub_pins`: the stage's model
setting, `generate.model`, `style.ip_adapter`, `upscale.controlnet`), resolved offline; then every
model's resolved revision must equal the recorded one, else each missing one is named and nothing
runs. enhance is not run again (its recorded answer is the row's prompt), so no LLM is resolved.

A stop (SIGINT, SIGTERM; the caller holds `stopping.on_signals()`) ends it between steps, or the
flow's shards at once (`stop_grace_s` 0), with `Stopped`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from catalogen import stopping
from catalogen.config import ConfigError
from catalogen.models.loading import MissingModelsError
from catalogen.run.prefect_api import prefect_environment, start_prefect_api
from catalogen.run.reproduce import (RECORDED_BY, Local, Reproduction, Unusable, Verdict, compare, missing_named, model_faults,
                                 read_provenance, rebuild)
from catalogen.run.plan import prepare
from catalogen.storage.store import RunStore


class Stopped(Exception):
    """SIGINT or SIGTERM arrived (catalogen.stopping): nothing is compared."""


def _check_stop() -> None:
    if stopping.STOPPING.is_set():
        raise Stopped(stopping.signal_name() or "a stop")


def reproduce_image(image: str | Path, folder: Path, local: Local | None = None) -> tuple[Reproduction, Verdict]:
    """Make `image` again in `folder` (empty, temporary) from its provenance; the verdict.

    Raises Unusable when the file cannot be made again here (see catalogen/run/reproduce.py), Stopped
    when a stop arrived (the caller holds `stopping.on_signals()`: a signal sets its flags).
    """
    from catalogen.catalog import CatalogError
    from catalogen.run.devices import DeviceError
    from catalogen.models.loading import ModelError

    job = rebuild(image, read_provenance(image), folder, local)
    _check_stop()
    prefect_environment()
    api = start_prefect_api()
    try:
        cfg = pin_hub_models(job)
        plan = prepare(job.catalog, cfg, job.out)
        _check_stop()
    except MissingModelsError as exc:
        api.abandon()
        raise Unusable("needs model(s) this machine does not have: " + "; ".join(missing_named(job.models, exc.missing))) from None
    except CatalogError as exc:  # the one-row catalog is the recipe's row: name that, not a temporary file
        api.abandon()
        raise Unusable(f"its recipe's row cannot be run here ({RECORDED_BY}): {'; '.join(map(str, exc.faults))}") from None
    except (ConfigError, DeviceError, ModelError) as exc:
        api.abandon()
        raise Unusable(f"its recipe cannot be run here: {' '.join(str(exc).split())}") from None
    except Stopped:
        api.abandon()
        raise
    faults = model_faults(job.models, plan.models)
    if faults:
        api.abandon()
        raise Unusable("needs model(s) at the revision it records: " + "; ".join(faults))
    url = api.ready()
    _check_stop()
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.run import catalogen_run, run_summary

    settings = {PREFECT_API_URL: url, PREFECT_UI_URL: ""} if url else {}
    with plan.store.exclusive(), temporary_settings(settings):
        state = catalogen_run(catalog=str(job.catalog), out=str(job.out), config=str(job.config), return_state=True)
    _check_stop()
    summary = run_summary(state)
    if isinstance(summary, BaseException):
        return job, Verdict(False, f"different: the re-run failed: {summary}")
    return job, _verdict(job)


# The setting that names each model role's spec: pinned to the commit an image records.
PIN_SETTINGS = {"pipeline": "generate.model", "ip_adapter": "style.ip_adapter", "controlnet": "upscale.controlnet"}


def hub_pins(cfg: Any, recorded: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Settings that make every Hub model resolve to the commit the image records.

    A tiny or local model's revision is a content hash: nothing to pin, it is compared once
    resolved (`model_faults`). LoRAs, embeddings and rembg's named models are compared only.
    """
    from catalogen import registry

    pins: dict[str, Any] = {}
    for stage, roles in recorded.items():
        module = registry.stages().get(stage)
        specs = module.models(cfg) if module is not None else {}
        for role, want in roles.items():
            spec, revision, setting = specs.get(role), want.get("revision"), PIN_SETTINGS.get(role)
            if spec is None or setting is None or not revision or str(revision).startswith("sha256:"):
                continue
            if spec.repo.startswith("tiny:") or Path(spec.repo).expanduser().exists() or spec.repo != want.get("repo"):
                continue
            if spec.revision == revision:
                continue
            pins[setting] = {**spec.model_dump(mode="json", exclude_none=True), "revision": revision}
    return pins


def pin_hub_models(job: Reproduction) -> Any:
    """The reproduction's configuration, its Hub models pinned (written: the flow reads the file)."""
    cfg = job.load()
    for dotted, value in hub_pins(cfg, job.models).items():
        section, name = dotted.split(".")
        job.settings.setdefault(section, {})[name] = value
    cfg = job.load()
    job.write(cfg)
    return cfg


def _verdict(job: Reproduction) -> Verdict:
    store = RunStore(job.out)
    results = store.read_table(store.results_path).to_pylist()
    row = results[0] if results else {}
    status, error = row.get(f"{job.stage}_status"), row.get(f"{job.stage}_error")
    relative = row.get(job.column)
    if relative is None:
        return Verdict(False, f"different: made again, the {job.stage} row is {status or 'missing'}"
                              + (f" ({error})" if error else ""))
    remade = store.read_bytes(relative)
    made_on = _made_on(job.provenance), _made_on(read_provenance(remade))
    if job.rendition is not None:
        remade = _rendition(job.rendition, remade)
    verdict = compare(job.source, remade)
    if not verdict.identical and made_on[0] != made_on[1]:  # e.g. float16 on a GPU, float32 on this CPU
        verdict.line += f" (made on {made_on[0]}, made again on {made_on[1]})"
    return verdict


def _made_on(provenance: dict) -> str:
    return " ".join(str(provenance[k]) for k in ("device", "dtype") if provenance.get(k)) or "an unrecorded device"


def _rendition(rendition: Any, source: bytes) -> bytes:
    """The rendition (tasks.renditions.Rendition, validated before the run) rendered and encoded
    from the re-made source image as the renditions stage does (its label aside: metadata changes
    no pixel)."""
    from catalogen.media.images import ImageSettings, decode_image
    from catalogen.media.labels import Label, encode
    from tasks.renditions import render

    image = decode_image(source, ImageSettings(), "the re-made source image")
    return encode(render(image, rendition), rendition.format, Label(None), rendition.quality, rendition.icc)
