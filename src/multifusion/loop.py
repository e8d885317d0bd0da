"""The one sampling loop every method shares, written against the diffusers scheduler contract.

    x_k = noise_k * init_noise_sigma                                      for each trajectory k
    for step i:
        for each running trajectory k:
            eps_k = denoise_k(scale_model_input(x_k, t_k), t_k)          # noise slot
            x_k   = scheduler_k.step(eps_k, t_k, x_k).prev_sample
        xs = meet(Step(...))                                              # latent slot

Noise combiners (average, SNB, regions) are one trajectory's `denoise`; trajectory combiners
(AMDM) run one trajectory per model and meet them after the step. Every trajectory owns its
scheduler (multistep schedulers keep history between steps), so models with different noise
schedules can run side by side as long as they take the same number of steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from multifusion.errors import SamplingError
from multifusion.handles import NoiseFn
from multifusion.schedulers import alpha_bar_at, timestep_fraction


@dataclass(eq=False)
class Trajectory:
    """One latent trajectory: its noise function, its own scheduler and its unit-variance initial
    noise (B, C, H, W). A method's plan may leave `scheduler` or `noise` as None; the run then
    gives it a fresh scheduler of the recipe's kind and the batch's noise. A trajectory whose
    noise is not the images' own should bring its own `generators` for an ancestral
    scheduler's draws, so that it does not consume the images' streams."""

    denoise: NoiseFn
    scheduler: Any = None
    noise: torch.Tensor | None = None
    generators: Sequence[torch.Generator] | None = None  # for the scheduler's own draws (default: the images')


@dataclass(eq=False)
class Step:
    """One step of every trajectory: what `meet` and the step callback receive. Lists are
    indexed by trajectory; a stopped trajectory has None in each of them."""

    step: int  # 0-based index into the timesteps
    num_steps: int
    t: list[torch.Tensor | None]  # each trajectory's timestep at this step
    t_next: list[torch.Tensor | None]  # its timestep after this step (None after the last)
    # Where t lies on each trajectory, computed once by the loop (`trajectory_positions`):
    fraction: list[float | None]  # of the way from noise: 0 = pure noise, 1 = clean (`schedulers.timestep_fraction`)
    sigma: list[float | None]  # noise level: sqrt((1 - alpha_bar(t)) / alpha_bar(t)), 1 / sqrt(SNR); inf at pure noise
    model_input: list[torch.Tensor | None]  # scale_model_input(x_t): the variance-preserving latent the model saw
    eps: list[torch.Tensor | None]  # each trajectory's prediction (eps; velocity for flow-matching models)
    latents: list[torch.Tensor | None]  # x after its own scheduler step; after `meet`, what meet returned
    schedulers: list[Any]
    record: dict[str, Any] = field(default_factory=dict)  # named extras from combiners (masks, maps)
    recording: bool = False  # whether a callback will read `record` (skip building extras otherwise)

    def x0(self, k: int) -> torch.Tensor:
        """Trajectory k's prediction of the clean latent, (x - sqrt(1 - a) eps) / sqrt(a) with
        x the model's (variance-preserving) input and a = alpha_bar(t): the same formula for
        every scheduler, whatever its own step does. Flow-matching schedules (whose predictions are
        velocities) give x - sigma v (`multifusion.families.flowmatch.FlowMatchSampler.predicted_x0`)."""
        if hasattr(self.schedulers[k], "predicted_x0"):
            return self.schedulers[k].predicted_x0(self.model_input[k], self.eps[k], self.step)
        a = alpha_bar_at(self.schedulers[k].alphas_cumprod, self.t[k]).to(self.eps[k].device, torch.float32)
        return (self.model_input[k] - (1 - a).sqrt() * self.eps[k]) / a.sqrt()


Meet = Callable[[Step], Sequence[torch.Tensor | None]]


def initial_noise(shape: tuple[int, int, int], generators: Sequence[torch.Generator], dtype=torch.float32) -> torch.Tensor:
    """(B, C, H, W) standard normal noise, image i drawn from generators[i] alone, as
    diffusers' `randn_tensor` does with a list of generators (so image i is reproducible from
    its seed regardless of batch)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])


def stream_seed(stream: int, seed: int) -> int:
    """A seed for noise stream `stream` of the image of `seed`: a fixed odd multiplier
    (2^64 / golden ratio) spreads nearby streams apart."""
    return (stream * 0x9E3779B97F4A7C15 + seed) % (2**63)


def stream_generators(seeds: Sequence[int], stream: int) -> list[torch.Generator]:
    """One CPU generator per image for noise stream `stream`: not the images' own streams, yet
    reproducible from their seeds whatever the batch."""
    return [torch.Generator("cpu").manual_seed(stream_seed(stream, s)) for s in seeds]


def derived_noise(shape: tuple[int, int, int], seeds: Sequence[int], stream: int) -> torch.Tensor:
    """(B, C, H, W) standard normal noise of stream `stream` (see `stream_generators`)."""
    return initial_noise(shape, stream_generators(seeds, stream))


def trajectory_positions(scheduler) -> list[tuple[float, float]]:
    """(fraction, sigma) of each of the scheduler's timesteps (after `set_timesteps`), as `Step`
    carries them: the fraction on the scheduler's timestep axis (`timestep_fraction` over its
    `alphas_cumprod`, so the same value a method computes from its model's table) and the noise
    level of alpha_bar(t) (fractional t interpolated as `alpha_bar_at` does). A scheduler on
    another axis places its own timesteps (`position(t)`: the flow-matching sampler)."""
    if hasattr(scheduler, "position"):
        return [scheduler.position(t) for t in scheduler.timesteps]
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"{type(scheduler).__name__} has neither alphas_cumprod (a DDPM noise schedule) nor position(t): "
            "the loop cannot tell where its timesteps lie on the trajectory"
        )
    timesteps = scheduler.timesteps.cpu()
    alpha_bar = alpha_bar_at(scheduler.alphas_cumprod, timesteps)
    n = len(scheduler.alphas_cumprod)
    return [(timestep_fraction(t, n), float(((1 - a) / a).sqrt())) for t, a in zip(timesteps, alpha_bar)]


def _step_kwargs(scheduler, eta: float, generators) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted and generators is not None:
        kwargs["generator"] = list(generators)
    return kwargs


def _not_finite(step: Step, k: int, n_trajectories: int) -> str:
    eps = step.eps[k]
    where = (
        "the noise prediction" if eps is not None and not bool(torch.isfinite(eps).all()) else "the scheduler step or the meeting"
    )
    which = f" of trajectory {k}" if n_trajectories > 1 else ""
    return (
        f"sampling step {step.step + 1} of {step.num_steps} (timestep {float(step.t[k]):g}): the latents{which} are no "
        f"longer finite (NaN or inf), first in {where}. Likely causes: a guidance scale or method weight so large "
        "that values overflow, float16 weights overflowing (try runtime.dtype float32 or bfloat16), eta or a "
        "scheduler unsuited to these models, or a checkpoint with NaN weights. No image was written"
    )


def sample(
    trajectories: Sequence[Trajectory],
    *,
    num_inference_steps: int,
    generators: Sequence[torch.Generator] | None = None,
    eta: float = 0.0,
    meet: Meet | None = None,
    callback: Callable[[Step], None] | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> list[torch.Tensor | None]:
    """Run the reverse process of every trajectory in lock-step and return each one's final
    latents (None for a trajectory that `meet` stopped).

    Each trajectory's noise is unit-variance; it is scaled by its scheduler's `init_noise_sigma`
    after `set_timesteps`, as diffusers pipelines do. `generators` (one per image) and `eta` go
    to `scheduler.step` where it takes them. `meet(step)` sees every trajectory after its step
    and returns the latents to continue from; None for a trajectory stops it (it is no longer
    evaluated). `callback` gets the same `Step` after `meet`.

    Every trajectory's latents are checked finite after each step (one reduction per step):
    NaN or inf raises SamplingError naming the step, before anything is decoded or written.
    """
    if not trajectories:
        raise ValueError("sample needs at least one trajectory")
    schedulers = []
    for k, tr in enumerate(trajectories):
        if tr.scheduler is None or tr.noise is None:
            raise ValueError(f"trajectory {k} has no {'scheduler' if tr.scheduler is None else 'initial noise'}")
        if any(tr.scheduler is s for s in schedulers):
            raise ValueError(
                f"trajectory {k} shares its scheduler object with another; give each its own (schedulers keep state)"
            )
        try:
            tr.scheduler.set_timesteps(num_inference_steps, device=tr.noise.device)
        except (ValueError, IndexError) as err:  # e.g. PNDM under 4 steps, LCM over its original steps
            raise SamplingError(
                f"sampling.scheduler: {type(tr.scheduler).__name__} cannot take {num_inference_steps} steps "
                f"({err}); change sampling.num_inference_steps or the scheduler"
            ) from None
        schedulers.append(tr.scheduler)
    counts = {len(s.timesteps) for s in schedulers}
    if len(counts) != 1:
        raise ValueError(
            f"the trajectories' schedulers take different numbers of steps ({sorted(counts)}); they must run in lock-step"
        )
    n = counts.pop()
    positions = [trajectory_positions(s) for s in schedulers]
    xs: list[torch.Tensor | None] = [tr.noise * s.init_noise_sigma for tr, s in zip(trajectories, schedulers)]
    kwargs = [
        _step_kwargs(s, eta, tr.generators if tr.generators is not None else generators)
        for tr, s in zip(trajectories, schedulers)
    ]
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        running = [k for k, x in enumerate(xs) if x is not None]
        nothing = [None] * len(xs)
        step = Step(
            i,
            n,
            t=list(nothing),
            t_next=list(nothing),
            fraction=list(nothing),
            sigma=list(nothing),
            model_input=list(nothing),
            eps=list(nothing),
            latents=list(nothing),
            schedulers=schedulers,
            recording=callback is not None,
        )
        record = step.record if step.recording else None
        for k in running:
            s = schedulers[k]
            t = s.timesteps[i]
            x_in = s.scale_model_input(xs[k], t)
            eps = trajectories[k].denoise(x_in, t, record)
            xs[k] = s.step(eps, t, xs[k], **kwargs[k], return_dict=False)[0]
            step.t[k], step.model_input[k], step.eps[k] = t, x_in, eps
            step.t_next[k] = s.timesteps[i + 1] if i + 1 < n else None
            step.fraction[k], step.sigma[k] = positions[k][i]
        step.latents = list(xs)
        if meet is not None:
            met = list(meet(step))
            if len(met) != len(xs):
                raise ValueError(f"meet returned {len(met)} latents for {len(xs)} trajectories")
            xs = [None if xs[k] is None else met[k] for k in range(len(xs))]
            step.latents = list(xs)
        for k in running:
            if xs[k] is not None and not bool(torch.isfinite(xs[k]).all()):
                raise SamplingError(_not_finite(step, k, len(trajectories)))
        if callback is not None:
            callback(step)
    return xs
