"""What the flow-matching families share: velocity as the prediction space, the flow timestep
axis, and their schedule built per run (docs/flow.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from multifusion.flow.schedule import FlowMatchSampler, vp_alphas_cumprod
from multifusion.handles import ModelHandle


def tokens(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """(B, max_length) token ids, padded and truncated to `max_length`, as the pipelines ask."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


@dataclass(eq=False)
class FlowHandle(ModelHandle):
    """A flow-matching transformer model: `eps` returns the velocity v = e - x0 (the models' own
    output, which every combiner is exact in; docs/flow.md), timesteps are t = 1000 sigma."""

    prediction_space: ClassVar[str] = "velocity"
    denoiser_folder: ClassVar[str] = "transformer"
    # How the family's pipeline sets its sigmas: FLUX passes linspace(1, 1/n, n) and falls back to
    # max_shift 1.15, SD3 lets the scheduler space them and falls back to 1.16.
    pipeline_sigmas: ClassVar[bool] = False
    default_max_shift: ClassVar[float] = 1.16
    patch: ClassVar[int] = 2  # latent pixels per side of one image token

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The flow timestep axis t = 0..N as an alpha_bar table of equal signal-to-noise
        (`vp_alphas_cumprod`): its length N + 1 counts the axis' positions."""
        if not hasattr(self, "_alphas_cumprod"):
            self._alphas_cumprod = vp_alphas_cumprod(int(self.scheduler_config.get("num_train_timesteps", 1000)))
        return self._alphas_cumprod

    @property
    def patch_px(self) -> int:
        return self.vae_scale_factor * self.patch

    def scheduler(self, name: str, latent_hw: tuple[int, int]) -> FlowMatchSampler:
        from multifusion.schedulers import check_flow_sampler

        check_flow_sampler(name)
        return FlowMatchSampler(self.scheduler_config, latent_hw=tuple(latent_hw), patch=self.patch,
                                pipeline_sigmas=self.pipeline_sigmas, default_max_shift=self.default_max_shift)

    def _exec_device(self, module: torch.nn.Module) -> torch.device:
        """Bring `module` where it runs (under offload) and return that device."""
        self._on_device(module)
        return self.offloader.device if self.offloader else self.device
