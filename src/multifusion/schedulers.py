"""Schedulers by name, and where a step lies on the trajectory.

Users name schedulers the way A1111 and the diffusers docs do (`ddim`, `euler_a`, `dpm++`) or by
diffusers class name. Fusion windows are fractions of the trajectory on the scheduler's
timestep axis (0 = pure noise, 1 = clean), so they mean the same under every scheduler and step
count (DESIGN: "time windows are given on the scheduler's timestep axis").
"""

from __future__ import annotations

import torch

from multifusion.errors import RecipeError, did_you_mean

# Short names users know -> diffusers scheduler class names.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpm_single": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
}


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name or a class name; RecipeError otherwise."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        options = sorted(SCHEDULERS) + sorted(set(SCHEDULERS.values()))
        raise RecipeError(f"sampling.scheduler: unknown scheduler {name!r} (use one of {', '.join(sorted(SCHEDULERS))} "
                          f"or a diffusers class name){did_you_mean(name, options)}")
    return cls


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of kind `name` with the noise schedule of `base_config`, set to epsilon
    prediction: handles convert every model's output to eps before it reaches a scheduler."""
    return scheduler_class(name).from_config(base_config, prediction_type="epsilon")


def timestep_fraction(t: torch.Tensor | float, num_train_timesteps: int) -> float:
    """Progress along the trajectory on the scheduler's timestep axis: 0 = pure noise
    (t = T-1), 1 = clean (t = 0)."""
    return 1.0 - float(t) / float(num_train_timesteps - 1)


def in_window(fraction: float, window: tuple[float, float]) -> bool:
    """Whether a trajectory fraction lies in `window` = [start, end), closed at end = 1 so a
    window reaching 1 includes the last step. Half-open, so that a window and its complement
    ([0, a) and [a, 1]) never both hold at the same step."""
    start, end = window
    return start <= fraction and (fraction < end or end >= 1.0)
