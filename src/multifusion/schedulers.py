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
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}

# Names that sample a flow-matching model (SD3, FLUX): all select its own flow-matching Euler
# scheduler. DDIM at eta 0 and Euler are that same step on a flow-matching schedule, written in
# other coordinates (docs/flow.md); the other samplers have no flow-matching form here.
FLOW_SAMPLERS = frozenset({"ddim", "euler", "flow_euler", "flowmatcheulerdiscretescheduler"})


# diffusers class names accepted: the samplers of an epsilon (or v) model on a DDPM noise schedule
# with `alphas_cumprod`, i.e. the schedulers diffusers declares compatible with
# StableDiffusionPipeline (`KarrasDiffusionSchedulers`) less EDMEulerScheduler (EDM sigmas,
# no alphas_cumprod), plus the DDPM-schedule samplers LCM, TCD, SA-Solver and the parallel
# DDIM/DDPM. Refused although diffusers has them: flow-matching schedulers (FlowMatch*; the flow
# Euler one samples flow-matching models, see FLOW_SAMPLERS), inverse
# ones (DDIMInverseScheduler runs image -> noise), and those of other model kinds (VQ-Diffusion,
# score SDE, consistency models, aMUSEd, unCLIP, RePaint, video); each failed or gave a wrong
# image on these models when tried.
SAMPLING_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
        "DPMSolverSDEScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "SASolverScheduler",
        "DDIMParallelScheduler",
        "DDPMParallelScheduler",
    }
)


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name or a class name; RecipeError otherwise,
    also for diffusers classes that are not samplers for these models (see SAMPLING_SCHEDULERS)."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    if cls_name == "FlowMatchEulerDiscreteScheduler":  # for flow-matching models only (see make_scheduler)
        return diffusers.FlowMatchEulerDiscreteScheduler
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        options = sorted(SCHEDULERS) + sorted(SAMPLING_SCHEDULERS)
        raise RecipeError(
            f"sampling.scheduler: unknown scheduler {name!r} (use one of {', '.join(sorted(SCHEDULERS))} "
            f"or a diffusers class name){did_you_mean(name, options)}"
        )
    if cls_name not in SAMPLING_SCHEDULERS:
        raise RecipeError(
            f"sampling.scheduler: {cls_name} is a diffusers scheduler, but not a sampler for these models "
            "(epsilon or v prediction on a DDPM noise schedule); use one of "
            f"{', '.join(sorted(SCHEDULERS))} or {', '.join(sorted(SAMPLING_SCHEDULERS - set(SCHEDULERS.values())))}"
        )
    if type(cls).__name__ == "DummyObject":  # diffusers' placeholder for a class whose extra is missing
        raise RecipeError(
            f"sampling.scheduler: {cls_name} needs a package that is not installed "
            "(DPMSolverSDEScheduler: pip install torchsde); install it or choose another scheduler"
        )
    return cls


def check_steps(name: str, base_config: dict, num_inference_steps: int) -> None:
    """RecipeError when scheduler `name` on the DDPM schedule of `base_config` cannot take
    `num_inference_steps` steps (PNDM without skip_prk_steps needs 4 or more; LCM and TCD at most
    their original steps): found before loading, where the config is local. (A family's
    `check_steps` calls this; flow-matching families take any step count.)"""
    problem = _steps_problem(name, base_config, num_inference_steps)
    if problem:
        fewer = next(
            (
                k
                for k in range(num_inference_steps - 1, max(num_inference_steps - 16, 0), -1)
                if _steps_problem(name, base_config, k) is None
            ),
            None,
        )
        hint = f"use at most {fewer} steps" if fewer else "change the step count"
        raise RecipeError(
            f"sampling.num_inference_steps: {num_inference_steps} steps do not work with scheduler {name!r} "
            f"on this model's schedule ({problem}); {hint} or change the scheduler"
        ) from None


def _steps_problem(name: str, base_config: dict, num_inference_steps: int) -> str | None:
    """Why scheduler `name` cannot take the step count, or None. Setting the timesteps is not
    enough: DDIM's "leading" spacing with steps_offset 1 sets 1000 steps on a 1000-step schedule
    without complaint, then indexes timestep 1000 of 1000 at the first step."""
    try:
        scheduler = make_scheduler(name, base_config)
        scheduler.set_timesteps(num_inference_steps)
    except (ValueError, IndexError) as err:
        return str(err)
    n = int(scheduler.config.get("num_train_timesteps", 1000))
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float64)
    if len(timesteps) and (timesteps.max() > n - 1 or timesteps.min() < 0):
        return f"its timesteps reach {timesteps.max().item():g}, beyond the schedule's last, {n - 1}"
    return None


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of kind `name` with the noise schedule of `base_config`, set to epsilon
    prediction: handles convert every model's output to eps before it reaches a scheduler.
    Flow-matching models build their schedulers through their handle (`ModelHandle.scheduler`)."""
    cls = scheduler_class(name)
    if cls.__name__.startswith("FlowMatch"):
        raise RecipeError(
            f"sampling.scheduler: {name!r} samples flow-matching models (SD3, FLUX), and this model has a "
            f"DDPM noise schedule; use one of {', '.join(sorted(set(SCHEDULERS) - {'flow_euler'}))}"
        )
    return cls.from_config(base_config, prediction_type="epsilon")


def check_flow_sampler(name: str) -> None:
    """RecipeError unless `name` samples a flow-matching model (see FLOW_SAMPLERS)."""
    if name.lower() not in FLOW_SAMPLERS:
        raise RecipeError(
            f"sampling.scheduler: {name!r} has no flow-matching form; SD3 and FLUX models sample with "
            "their flow-matching Euler scheduler, which 'flow_euler', 'euler' and 'ddim' select "
            "(the same step on that schedule)"
        )


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar(t) for integer or fractional timesteps t (any shape).

    Fractional t (Euler-type schedules) interpolate log sigma linearly, sigma = sqrt((1-a)/a),
    as k-diffusion's discrete-schedule wrapper does; integer t index the table exactly.
    """
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    a = alphas_cumprod.to(torch.float64)
    log_sigma = 0.5 * torch.log((1 - a) / a)
    lo = t.floor().long()
    hi = t.ceil().long()
    w = t - lo
    ls = (1 - w) * log_sigma[lo] + w * log_sigma[hi]
    exact = a[lo]
    return torch.where(w == 0, exact, 1 / (1 + torch.exp(2 * ls)))


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
