"""The one sampling loop every method shares, written against the diffusers scheduler contract.

    x_T ~ N(0, I) * init_noise_sigma
    for t in scheduler.timesteps:
        for each trajectory k:  eps_k = denoise_k(scale_model_input(x_k, t), t)    # noise slot
                                x_k   = scheduler_k.step(eps_k, t, x_k).prev_sample
        xs = meet(xs, t, step, schedulers)                                         # latent slot

Noise combiners (average, SNB, regions) are one `denoise` function; trajectory combiners
(AMDM) give one `denoise` per trajectory and a `meet`. Each trajectory has its own deep copy of
the scheduler, since multistep schedulers keep state between steps.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from multifusion.errors import RecipeError, did_you_mean
from multifusion.handles import NoiseFn

# Short names users know (A1111 / diffusers docs) -> diffusers scheduler class names.
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
        options = sorted(SCHEDULERS) + sorted({v for v in SCHEDULERS.values()})
        raise RecipeError(f"sampling.scheduler: unknown scheduler {name!r} (use one of {', '.join(sorted(SCHEDULERS))} or a diffusers class name){did_you_mean(name, options)}")
    return cls


def make_scheduler(name: str, base_config: dict):
    """A scheduler of kind `name` with the noise schedule of `base_config`, set to epsilon
    prediction: handles convert every model's output to eps before it reaches the scheduler."""
    return scheduler_class(name).from_config(base_config, prediction_type="epsilon")


@dataclass
class StepInfo:
    """What the per-step callback receives."""

    step: int  # 0-based index into scheduler.timesteps
    num_steps: int
    t: torch.Tensor  # scheduler timestep
    latents: list[torch.Tensor]  # x_{t-1} per trajectory, after `meet`
    eps: list[torch.Tensor]  # the noise prediction of each trajectory at this step
    record: dict[str, Any] = field(default_factory=dict)  # named extras from combiners


def initial_noise(
    shape: tuple[int, int, int], generators: Sequence[torch.Generator], dtype=torch.float32
) -> torch.Tensor:
    """(B, C, H, W) standard normal noise, image i drawn from generators[i] alone, as
    diffusers' `randn_tensor` does with a list of generators (so image i is reproducible
    from its seed regardless of batch)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])


def timestep_fraction(t: torch.Tensor | float, num_train_timesteps: int) -> float:
    """Progress along the trajectory on the scheduler's timestep axis: 0 = pure noise
    (t = T-1), 1 = clean (t = 0). Fusion windows are expressed in this unit."""
    return 1.0 - float(t) / float(num_train_timesteps - 1)


def in_window(fraction: float, window: tuple[float, float]) -> bool:
    """Whether a trajectory fraction lies in `window` = [start, end), closed at end = 1 so a
    window reaching 1 includes the last step. Half-open, so that a window and its complement
    ([0, a) and [a, 1]) never both hold at the same step."""
    start, end = window
    return start <= fraction and (fraction < end or end >= 1.0)


def sample(
    denoise: NoiseFn | Sequence[NoiseFn],
    scheduler,
    noise: torch.Tensor | Sequence[torch.Tensor],
    *,
    num_inference_steps: int,
    generators: Sequence[torch.Generator] | None = None,
    eta: float = 0.0,
    meet: Callable[[list[torch.Tensor], torch.Tensor, int, list], list[torch.Tensor]] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor | list[torch.Tensor]:
    """Run the reverse process. One `denoise` and one `noise` tensor (B, C, H, W) give a
    single trajectory and return its final latents; sequences give one trajectory each (with
    its own scheduler copy) and return a list.

    `noise` is unit-variance; it is scaled by the scheduler's `init_noise_sigma` here, after
    `set_timesteps`, as diffusers pipelines do. `generators` (one per image) and `eta` go to
    `scheduler.step` when it takes them. `meet(xs, t, step, schedulers)` sees all trajectories'
    latents (and their schedulers) after each step and returns them, possibly changed. `callback` gets a StepInfo after each step.
    """
    single = callable(denoise) and not isinstance(denoise, (list, tuple))
    denoisers = [denoise] if single else list(denoise)
    noises = [noise] if isinstance(noise, torch.Tensor) else list(noise)
    if len(noises) != len(denoisers):
        raise ValueError(f"got {len(denoisers)} denoisers but {len(noises)} initial latents")

    scheduler.set_timesteps(num_inference_steps, device=noises[0].device)
    schedulers = [scheduler] + [copy.deepcopy(scheduler) for _ in denoisers[1:]]
    xs = [n * s.init_noise_sigma for n, s in zip(noises, schedulers)]

    accepted = set(inspect.signature(scheduler.step).parameters)
    step_kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        step_kwargs["eta"] = eta
    if "generator" in accepted and generators is not None:
        step_kwargs["generator"] = list(generators)

    timesteps = scheduler.timesteps
    want_record = callback is not None
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        record: dict[str, Any] | None = {} if want_record else None
        eps_all = []
        for k, (fn, sched) in enumerate(zip(denoisers, schedulers)):
            x_in = sched.scale_model_input(xs[k], t)
            eps = fn(x_in, t, record)
            xs[k] = sched.step(eps, t, xs[k], **step_kwargs, return_dict=False)[0]
            eps_all.append(eps)
        if meet is not None:
            xs = meet(xs, t, i, schedulers)
        if callback is not None:
            callback(StepInfo(i, len(timesteps), t, xs, eps_all, record or {}))
    return xs[0] if single else xs


@contextlib.contextmanager
def _vae_tiling(vae: torch.nn.Module, area_px: int, tiled: bool | None):
    """Switch diffusers' VAE tiling on for the block (default: when the image has more than 4x
    the VAE's native area), so memory stays near one tile's for large canvases; seams are
    blended by diffusers, and results differ slightly from a whole pass."""
    native = int(getattr(vae.config, "sample_size", 0) or 0)
    if tiled is None:
        tiled = native > 0 and area_px > 4 * native * native
    previous = getattr(vae, "use_tiling", False)
    if hasattr(vae, "use_tiling"):
        vae.use_tiling = bool(tiled)
    try:
        yield
    finally:
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = previous


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1], as diffusers'
    StableDiffusionPipeline decodes them (divide by the VAE scaling factor, decode, map
    [-1, 1] to [0, 1]), one image at a time, on the VAE's device; tiled for large canvases."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    param = next(vae.parameters())
    with _vae_tiling(vae, latents.shape[-2] * latents.shape[-1] * f * f, tiled):
        images = [
            vae.decode(x[None].to(param.device, param.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            for x in latents
        ]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def encode(vae: torch.nn.Module, image: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) float32 on the CPU: the
    posterior mean times the scaling factor (the mean, not a sample, so it is the same for
    every seed), on the VAE's device; tiled for large images, as `decode` is."""
    param = next(vae.parameters())
    with _vae_tiling(vae, image.shape[-2] * image.shape[-1], tiled):
        mean = vae.encode(image.to(param.device, param.dtype)).latent_dist.mean
    return mean.float().cpu() * vae.config.scaling_factor


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' image processor does."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
