"""Schedulers by name, built from the model's own scheduler configuration.

Starting from the model's config keeps its training schedule (betas, timestep spacing, offsets),
so `euler_a` on SD1.5 is exactly what `EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)`
gives in plain diffusers.
"""

from __future__ import annotations

from typing import Any

import diffusers

from catalogen.config import SCHEDULERS

# name -> (diffusers class, overrides applied on top of the model's config)
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
assert set(_TABLE) == set(SCHEDULERS), "config.SCHEDULERS and the scheduler table disagree"


def make_scheduler(name: str, model_config: Any):
    """A fresh scheduler of kind `name` configured like the model's own."""
    try:
        cls_name, overrides = _TABLE[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}") from None
    return getattr(diffusers, cls_name).from_config(model_config, **overrides)
