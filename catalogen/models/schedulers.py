"""Schedulers by name, built from the model's own scheduler configuration.

Starting from the model's config keeps its training schedule (betas, timestep spacing, offsets),
so `euler_a` on SD1.5 is exactly what `EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)`
gives in plain diffusers.

People write scheduler names the way their tool does: A1111 (`Euler a`, `DPM++ 2M Karras`),
ComfyUI (`euler_ancestral`, `dpmpp_2m` with `karras`) or diffusers (`EulerDiscreteScheduler`).
All of these are accepted, case-insensitively, and the canonical name is what a run records.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator

# canonical name -> (diffusers class, overrides applied on top of the model's config)
_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULERS = tuple(_TABLE)

# Other spellings (A1111, ComfyUI, diffusers class names), compared after `_fold`.
_ALIASES = {
    "euler a": "euler_a",
    "euler ancestral": "euler_a",
    "eulerancestraldiscretescheduler": "euler_a",
    "eulerdiscretescheduler": "euler",
    "dpm++ 2m": "dpm++_2m",
    "dpmpp 2m": "dpm++_2m",
    "dpm++ 2m karras": "dpm++_2m_karras",
    "dpmpp 2m karras": "dpm++_2m_karras",
    "dpmsolvermultistepscheduler": "dpm++_2m",
    "ddimscheduler": "ddim",
    "plms": "pndm",
    "pndmscheduler": "pndm",
    "lmsdiscretescheduler": "lms",
    "heundiscretescheduler": "heun",
    "uni pc": "unipc",
    "unipc multistep": "unipc",
    "unipcmultistepscheduler": "unipc",
}


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_LOOKUP = {_fold(name): name for name in SCHEDULERS} | {_fold(alias): name for alias, name in _ALIASES.items()}


def canonical_scheduler(name: str) -> str | None:
    """The canonical name of a scheduler spelled any known way, or None if it is unknown."""
    return _LOOKUP.get(_fold(name))


def _validated(name: str) -> str:
    canonical = canonical_scheduler(name)
    if canonical is None:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return canonical


# A setting holding a scheduler name: any known spelling in, the canonical name kept.
SchedulerName = Annotated[str, AfterValidator(_validated)]
SCHEDULER_HELP = f"{', '.join(SCHEDULERS)}, or an A1111 / ComfyUI spelling"


def make_scheduler(name: str, model_config: Any):
    """A fresh scheduler of kind `name` configured like the model's own."""
    import diffusers

    canonical = canonical_scheduler(name)
    if canonical is None:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls_name, overrides = _TABLE[canonical]
    return getattr(diffusers, cls_name).from_config(model_config, **overrides)
