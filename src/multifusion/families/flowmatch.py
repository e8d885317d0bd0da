"""Flow-matching maths and schedule: velocity <-> eps <-> x0, the shift of the sigmas, and
diffusers' flow-matching Euler scheduler behind the shared loop's scheduler contract.

Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", arXiv 2403.03206, Sec. 2-3; the same process for FLUX.1, Black Forest Labs 2024):

    x_s = (1 - s) x0 + s e,   s in [0, 1] (the sigma), e ~ N(0, I)
    v   = dx_s / ds = e - x0                                    what the transformer predicts

so at one (x_s, s) the three parameterisations are affine images of each other:

    x0 = x_s - s v,    e = x_s + (1 - s) v,    v = (e - x_s) / (1 - s) = (x_s - x0) / s

Trajectories of these models run in velocity, the models' own space (docs/flow.md says why: e
carries nothing about x0 at s = 1, where every sample starts). The scheduler time is t = 1000 s.

The sigmas of a run are shifted toward noise: s' = shift s / (1 + (shift - 1) s) with a static
shift (SD3: 3.0), or s' = e^mu / (e^mu + (1 / s - 1)) with mu linear in the number of image
tokens (FLUX; SD3 configs that ask for it), as diffusers' pipelines compute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from multifusion.handles import ModelHandle

FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def velocity_to_eps(v: torch.Tensor, x_t: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """e = x_t + (1 - s) v: the noise a velocity implies at sigma s. (B, C, H, W) each."""
    return x_t + (1 - sigma) * v


def velocity_to_x0(v: torch.Tensor, x_t: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x0 = x_t - s v: the clean latent a velocity implies at sigma s. (B, C, H, W) each."""
    return x_t - sigma * v


def eps_to_velocity(eps: torch.Tensor, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """v = (e - x_t) / (1 - s), for s < 1 only: at s = 1, x_t = e whatever x0 is, so e carries
    no velocity (the reason trajectories of these models run in velocity)."""
    if not float(sigma) < 1.0:
        raise ValueError(f"eps determines the velocity only for sigma < 1, got sigma {float(sigma)}")
    return (eps - x_t) / (1 - sigma)


def x0_to_velocity(x0: torch.Tensor, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """v = (x_t - x0) / s, for s > 0 only (at s = 0, x_t = x0 and the velocity is not seen)."""
    if not float(sigma) > 0.0:
        raise ValueError(f"x0 determines the velocity only for sigma > 0, got sigma {float(sigma)}")
    return (x_t - x0) / sigma


def resolution_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens, base_shift at
    base_seq_len tokens and max_shift at max_seq_len (FLUX.1's schedule; extrapolated outside)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def vp_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """(N + 1,) alpha_bar of the variance-preserving process with the same signal-to-noise ratio
    as x_s at s = t / N, t = 0..N: (1 - s)^2 / ((1 - s)^2 + s^2) (x_s divided by its scale
    sqrt((1 - s)^2 + s^2) is that VP latent). It indexes the flow timestep axis, so its length
    N + 1 is the number of positions on it and t / N maps to trajectory fractions as the DDPM
    axis does; 1 at t = 0, 0 at t = N."""
    s = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def is_flow_config(config: dict) -> bool:
    """Whether a scheduler config is a flow-matching one: by the class name a saved config
    records, or by the key only flow-matching schedulers register (`use_dynamic_shifting`)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch") or "use_dynamic_shifting" in config


def schedule_difference(a: dict, b: dict) -> str | None:
    """The first setting in which two flow-matching scheduler configs differ ("shift 3.0 vs
    2.0"), or None. Every setting of FlowMatchEulerDiscreteScheduler changes its sigmas or its
    step, so trajectories of two such configs do not pass the same noise levels step by step."""
    for key in sorted(set(a) | set(b)):
        if not key.startswith("_") and a.get(key) != b.get(key):
            return f"{key} {a.get(key)!r} vs {b.get(key)!r}"
    return None


class FlowMatchSampler:
    """diffusers' `FlowMatchEulerDiscreteScheduler` as the shared loop drives schedulers.

    What the loop expects and the flow scheduler lacks: `init_noise_sigma` (1: x at s = 1 is the
    noise itself) and `scale_model_input` (the identity: the transformer sees x_s). What the
    pipelines add at `set_timesteps`, done here: FLUX passes sigmas linspace(1, 1/n, n)
    (`pipeline_sigmas`), and a config with dynamic shifting needs mu from the image's token
    count, (h / patch) (w / patch) for latents (h, w) (`latent_hw`, `patch`). The first step
    index is fixed at 0, as FluxPipeline does. `predicted_x0` and `add_noise` are the flow forms
    of what the loop and methods compute from alphas under DDPM schedules.
    """

    init_noise_sigma = 1.0
    order = 1

    def __init__(
        self,
        config: dict,
        *,
        latent_hw: tuple[int, int] | None = None,
        patch: int = 2,
        pipeline_sigmas: bool = False,
        default_max_shift: float = 1.15,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.inner = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.latent_hw = latent_hw
        self.patch = patch
        self.pipeline_sigmas = pipeline_sigmas
        self.default_max_shift = default_max_shift

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def timesteps(self) -> torch.Tensor:
        return self.inner.timesteps

    @property
    def sigmas(self) -> torch.Tensor:
        return self.inner.sigmas

    def mu(self) -> float | None:
        """The dynamic shift for this latent size, or None for a static shift."""
        c = self.inner.config
        if not c.get("use_dynamic_shifting", False):
            return None
        if self.latent_hw is None:
            raise ValueError(
                "this flow-matching schedule shifts with the image size (use_dynamic_shifting); "
                "build the scheduler with latent_hw (the latent height and width)"
            )
        h, w = self.latent_hw
        tokens = (h // self.patch) * (w // self.patch)
        return resolution_shift(
            tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", self.default_max_shift),
        )

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"needs at least one step, got {num_inference_steps}")
        sigmas = None
        if self.pipeline_sigmas and not self.inner.config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = self.mu()
        self.inner.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, **({} if mu is None else {"mu": mu}))
        self.inner.set_begin_index(0)

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator: Any = None,
        return_dict: bool = True,
    ):
        """One Euler step on the flow ODE, x_{s'} = x_s + (s' - s) v (the scheduler's own)."""
        return self.inner.step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """The sigma of one of this run's timesteps (exactly the scheduler's, not t / 1000)."""
        hits = (self.inner.timesteps == torch.as_tensor(timestep).to(self.inner.timesteps)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this run's timesteps")
        return self.inner.sigmas[int(hits[0])]

    def position(self, timestep: torch.Tensor) -> tuple[float, float]:
        """(fraction, sigma) of one of this run's timesteps, as the loop's `Step` carries them: the
        fraction 1 - t / N on the flow axis t = 0..N (its N + 1 positions, as `vp_alphas_cumprod`
        counts them and a flow handle's `alphas_cumprod` holds them), and the noise level of the
        VP latent with x_s's signal-to-noise ratio, s / (1 - s) for the exact sigma s (inf at s = 1)."""
        from multifusion.schedulers import timestep_fraction

        s = float(self.sigma_of(timestep))
        return timestep_fraction(timestep, self.inner.config.num_train_timesteps + 1), (s / (1 - s) if s < 1 else float("inf"))

    def predicted_x0(self, x_t: torch.Tensor, v: torch.Tensor, step_index: int) -> torch.Tensor:
        """x0 = x_s - s v at step `step_index` of this run."""
        return velocity_to_x0(v, x_t, self.inner.sigmas[step_index].to(x_t))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) x0 + s e at the sigma of `timesteps` (one value, or one per image)."""
        t = torch.as_tensor(timesteps).reshape(-1)
        s = torch.stack([self.sigma_of(ti) for ti in t]).to(x0).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise

    def latent_move_to_x0(self, timestep_next: torch.Tensor) -> float:
        """How far x0 moves per unit move of the latent after a step to `timestep_next`, e fixed:
        1 / (1 - s_next)."""
        return 1.0 / (1.0 - float(self.sigma_of(timestep_next)))


def tokens(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """(B, max_length) token ids, padded and truncated to `max_length`, as the pipelines ask."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


@dataclass(eq=False)
class FlowHandle(ModelHandle):
    """A flow-matching transformer model: `eps` returns the velocity v = e - x0 (the models' own
    output, which every combiner is exact in; docs/flow.md), timesteps are t = 1000 sigma."""

    prediction_space: ClassVar[str] = "velocity"
    denoiser_folder: ClassVar[str] = "transformer"
    load_kwargs: ClassVar[dict[str, Any]] = {}
    takes_eta: ClassVar[bool] = False  # the flow Euler step is deterministic (docs/flow.md)
    single_file: ClassVar[bool] = False  # written as diffusers folders only
    # How the family's pipeline sets its sigmas: FLUX passes linspace(1, 1/n, n) and falls back to
    # max_shift 1.15, SD3 lets the scheduler space them and falls back to 1.16.
    pipeline_sigmas: ClassVar[bool] = False
    default_max_shift: ClassVar[float] = 1.16
    patch: ClassVar[int] = 2  # latent pixels per side of one image token

    @classmethod
    def example_inputs(cls, config: dict, batch: int, latent: tuple[int, int, int], tokens: int) -> dict[str, Any]:
        """The transformer's inputs as the SD3 handle passes them: latents, the text tokens, the
        pooled projection and sigma as the timestep."""
        return dict(
            hidden_states=torch.randn(batch, *latent),
            encoder_hidden_states=torch.randn(batch, tokens, config["joint_attention_dim"]),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"]),
            timestep=torch.full((batch,), 0.5),
        )

    @classmethod
    def schedule_table(cls, scheduler_config: Any) -> torch.Tensor:
        """The flow timestep axis t = 0..N as an alpha_bar table of equal signal-to-noise
        (`vp_alphas_cumprod`): its length N + 1 counts the axis' positions."""
        return vp_alphas_cumprod(int(scheduler_config.get("num_train_timesteps", 1000)))

    @classmethod
    def check_steps(cls, scheduler: str, scheduler_config: Any, steps: int) -> None:
        """A flow-matching schedule takes any step count; only the sampler's name is checked."""
        from multifusion.schedulers import check_flow_sampler

        check_flow_sampler(scheduler)

    @classmethod
    def schedule_difference(cls, a: Any, b: Any) -> str | None:
        """The first setting in which two flow-matching schedules differ (`schedule_difference`)."""
        return schedule_difference(a, b)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the training target) at integer timesteps t (B,) (docs/flow.md): s = t / 1000,
        x_s = (1 - s) x0 + s e, the target the velocity e - x0."""
        s = (t.float() / (len(self.alphas_cumprod) - 1)).view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, noise - x0

    def scheduler(self, name: str, latent_hw: tuple[int, int]) -> FlowMatchSampler:
        from multifusion.schedulers import check_flow_sampler

        check_flow_sampler(name)
        return FlowMatchSampler(
            self.scheduler_config,
            latent_hw=tuple(latent_hw),
            patch=self.patch,
            pipeline_sigmas=self.pipeline_sigmas,
            default_max_shift=self.default_max_shift,
        )

    def _exec_device(self, module: torch.nn.Module) -> torch.device:
        """Bring `module` where it runs (under offload) and return that device."""
        self._on_device(module)
        return self.offloader.device if self.offloader else self.device
