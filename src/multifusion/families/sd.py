"""Stable Diffusion 1.x/2.x: a UNet on 4-channel latents of a DDPM noise schedule, conditioned
on one CLIP text encoder, predicting epsilon or v, as diffusers' `StableDiffusionPipeline` holds
and runs it.

Rombach, Blattmann, Lorenz, Esser, Ommer, "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022, arXiv 2112.10752; SD 2.x's v-prediction: Salimans & Ho, "Progressive
Distillation for Fast Sampling of Diffusion Models", ICLR 2022, arXiv 2202.00512.

What the family holds: the handle (`SDHandle`: CLIP's last hidden state as the text sequence, one
UNet call converted to epsilon), its facts from the UNet config, its schedule (the DDPM
alpha_bar table), how training noises and predicts, its merge block ids (the A1111 UNet ids,
`families.blocks.unet_layout`) and its single-file key names (`families.ldm`). SDXL
(`families.sdxl`) extends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from multifusion.errors import IncompatibleModelsError
from multifusion.families.blocks import BlockLayout, unet_layout
from multifusion.handles import Conditioning, ModelHandle
from multifusion.schedulers import alpha_bar_at


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps from a v-prediction: with x_t = sqrt(a) x0 + sqrt(1-a) eps and
    v = sqrt(a) eps - sqrt(1-a) x0, eps = sqrt(a) v + sqrt(1-a) x_t (Salimans & Ho 2022).
    `x_t` is the variance-preserving latent, i.e. the UNet's (scaled) input."""
    a = alpha_bar.to(v.dtype)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


@dataclass(eq=False)
class SDHandle(ModelHandle):
    """A loaded Stable Diffusion 1.x/2.x model (module docstring); the base of SDXL's."""

    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    family_name: ClassVar[str] = "Stable Diffusion 1.x/2.x"
    # diffusers' pipeline asks for a safety checker and a feature extractor; the fused models
    # are run without them (as every other family is).
    load_kwargs: ClassVar[dict[str, Any]] = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    single_file: ClassVar[bool] = True
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"

    # --- facts from configs, before loading -----------------------------------------------
    @classmethod
    def config_facts(cls, denoiser: Mapping[str, Any]) -> tuple[int, int, int]:
        """(latent channels, patch side, native side in latent pixels) from the UNet's config."""
        return int(denoiser.get("in_channels", 4)), 1, int(denoiser.get("sample_size", 64))

    @classmethod
    def schedule_table(cls, scheduler_config: Mapping[str, Any]) -> torch.Tensor:
        """alpha_bar of every training timestep (T,), from the scheduler config's betas."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(dict(scheduler_config)).alphas_cumprod.clone()

    @classmethod
    def check_steps(cls, scheduler: str, scheduler_config: Mapping[str, Any], steps: int) -> None:
        """RecipeError when `scheduler` cannot take `steps` steps on this schedule."""
        from multifusion.schedulers import check_steps

        check_steps(scheduler, dict(scheduler_config), steps)

    @classmethod
    def schedule_difference(cls, a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
        """How two schedules differ beyond their betas (which `families.check_compatible`
        compares): for a DDPM schedule, in nothing a step depends on."""
        return None

    @classmethod
    def block_layout(cls, denoiser: Mapping[str, Any]) -> BlockLayout:
        """The merge block ids of the denoiser of config `denoiser` (A1111's UNet ids)."""
        return unet_layout(denoiser)

    @classmethod
    def ldm_state_dict(cls, folder) -> dict[str, torch.Tensor]:
        """The pipeline folder's UNet, VAE and text encoder in the original (LDM) key names."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from multifusion.families.ldm import to_ldm_state_dict

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
        return to_ldm_state_dict(unet, vae, CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True))

    @classmethod
    def example_inputs(cls, config: dict, batch: int, latent: tuple[int, int, int], tokens: int) -> dict[str, Any]:
        c, h, w = latent
        return dict(
            sample=torch.randn(batch, c, h, w),
            timestep=torch.tensor(500),
            encoder_hidden_states=torch.randn(batch, tokens, config["cross_attention_dim"]),
        )

    def scheduler(self, name: str, latent_hw: tuple[int, int]):
        from multifusion.schedulers import make_scheduler

        return make_scheduler(name, self.scheduler_config)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The conditioning for `prompts`: text embeddings (B, L, D) as diffusers'
        StableDiffusionPipeline computes them (padded to the tokenizer's max length, truncated,
        attention mask only where the text encoder's config asks for it, last hidden state).
        Families with further conditioning override this and `denoiser_kwargs`."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        self._on_device(self.text_encoder)
        dev = self.offloader.device if self.offloader else self.device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(dev)
        embeds = self.text_encoder(tok.input_ids.to(dev), attention_mask=mask)[0]
        return Conditioning(embeds.to(dtype=self.dtype))

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call converted to epsilon. x_t (B, C, H, W) float32, `cond` of batch B;
        returns eps (B, C, H, W) float32."""
        self._on_device(self.unet)
        dev = self.offloader.device if self.offloader else self.device
        out = self.unet(
            x_t.to(dev, self.dtype),
            t,
            encoder_hidden_states=cond.embeds.to(dev),
            return_dict=False,
            **self.denoiser_kwargs(x_t, cond, dev),
        )[0].to(x_t.device, torch.float32)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, x_t, alpha_bar_at(self.alphas_cumprod, t).to(x_t.device, torch.float32))
        elif self.prediction_type != "epsilon":
            raise IncompatibleModelsError(
                f"model {self.name!r} predicts {self.prediction_type!r}; only 'epsilon' and 'v_prediction' models can be combined"
            )
        return out

    # --- training ------------------------------------------------------------------------
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the training target) for clean latents x0 and noise (B, C, h, w) at integer
        timesteps t (B,): x_t = sqrt(a) x0 + sqrt(1 - a) e with a = alpha_bar(t), the target e
        (or v = sqrt(a) e - sqrt(1 - a) x0 for v-prediction)."""
        a = self.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return x_t, (a.sqrt() * noise - (1 - a).sqrt() * x0 if self.prediction_type == "v_prediction" else noise)

    def raw_prediction(
        self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The raw output (B, C, h, w) of `denoiser` (this family's, or an ensemble of them) at
        x_t and integer timesteps t (B,), with the further inputs `kwargs` (`denoiser_kwargs`)."""
        return denoiser(x_t.to(self.dtype), t, cond.embeds.to(self.dtype), **kwargs).sample
