"""Run a rebuilt one-row catalog (catalogen/reproduce.py) through the same check, plan and flow as
`catalogen run`, in its own folder, and compare the image it makes with the original.

Models: every Hub model is pinned to the commit the image records (`hub_pins`: the stage's model
setting, `generate.model`, `style.ip_adapter`, `upscale.controlnet`, `enhance.model`/`revision`),
resolved offline; then every model's resolved revision must equal the recorded one, else each
missing one is named and nothing runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from catalogen.config import ConfigError, load_config
from catalogen.models import MissingModelsError
from catalogen.prefect_api import prefect_environment, start_prefect_api
from catalogen.reproduce import Reproduction, Unusable, Verdict, compare, missing_named, model_faults, read_provenance, rebuild
from catalogen.runplan import prepare
from catalogen.store import RunStore


def reproduce_image(image: str | Path, folder: Path) -> tuple[Reproduction, Verdict]:
    """Make `image` again in `folder` (empty, temporary) from its provenance; the verdict.

    Raises Unusable when the file cannot be made again here (see catalogen/reproduce.py).
    """
    from catalogen.catalog import CatalogError
    from catalogen.devices import DeviceError
    from catalogen.models import ModelError

    job = rebuild(image, read_provenance(image), folder)
    prefect_environment()
    api = start_prefect_api()
    try:
        cfg = pin_hub_models(job.config, job.recipe.get("models") or {})
        plan = prepare(job.catalog, cfg, job.out)
    except MissingModelsError as exc:
        api.abandon()
        raise Unusable("needs model(s) this machine does not have: "
                       + "; ".join(missing_named(job.recipe.get("models") or {}, exc.missing))) from None
    except (ConfigError, CatalogError, DeviceError, ModelError) as exc:
        api.abandon()
        raise Unusable(f"its recipe cannot be run here: {' '.join(str(exc).split())}") from None
    faults = model_faults(job.recipe.get("models") or {}, plan.models)
    if faults:
        api.abandon()
        raise Unusable("needs model(s) at the revision it records: " + "; ".join(faults))
    url = api.ready()
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.run import catalogen_run, run_summary

    settings = {PREFECT_API_URL: url, PREFECT_UI_URL: ""} if url else {}
    with plan.store.exclusive(), temporary_settings(settings):
        state = catalogen_run(catalog=str(job.catalog), out=str(job.out), config=str(job.config), return_state=True)
    summary = run_summary(state)
    if isinstance(summary, BaseException):
        return job, Verdict(False, f"different: the re-run failed: {summary}")
    return job, _verdict(job)


# The setting that names each model role's spec: pinned to the commit an image records.
PIN_SETTINGS = {"pipeline": "generate.model", "ip_adapter": "style.ip_adapter", "controlnet": "upscale.controlnet",
                "llm": "enhance.revision"}


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
            if setting == "enhance.revision":  # enhance's own revision counts with its own model only
                pins.update({"enhance.model": spec.repo, "enhance.revision": revision})
            else:
                pins[setting] = {**spec.model_dump(mode="json", exclude_none=True), "revision": revision}
    return pins


def pin_hub_models(config: Path, recorded: Mapping[str, Mapping[str, Mapping[str, Any]]]):
    """The reproduction's configuration, its Hub models pinned (written back: the flow reads the file)."""
    cfg = load_config(config)
    pins = hub_pins(cfg, recorded)
    if not pins:
        return cfg
    data = yaml.safe_load(config.read_text())
    for dotted, value in pins.items():
        section, name = dotted.split(".")
        data.setdefault(section, {})[name] = value
    config.write_text(yaml.safe_dump(data, sort_keys=True, allow_unicode=True))
    return load_config(config)


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
    if isinstance(job.provenance.get("rendition"), dict):
        remade = _rendition(job.provenance["rendition"], remade)
    verdict = compare(job.source, remade)
    if not verdict.identical and made_on[0] != made_on[1]:  # e.g. float16 on a GPU, float32 on this CPU
        verdict.line += f" (made on {made_on[0]}, made again on {made_on[1]})"
    return verdict


def _made_on(provenance: dict) -> str:
    return " ".join(str(provenance[k]) for k in ("device", "dtype") if provenance.get(k)) or "an unrecorded device"


def _rendition(made: dict, source: bytes) -> bytes:
    """The rendition `made` describes, rendered and encoded from the re-made source image as the
    renditions stage does (its label aside: metadata changes no pixel)."""
    from catalogen.images import ImageSettings, decode_image
    from catalogen.labels import Label, encode
    from tasks.renditions import Rendition, render

    rendition = Rendition.model_validate({k: v for k, v in made.items() if k not in ("source_path", "source_sha256")})
    image = decode_image(source, ImageSettings(), "the re-made source image")
    return encode(render(image, rendition), rendition.format, Label(None), rendition.quality, rendition.icc)
