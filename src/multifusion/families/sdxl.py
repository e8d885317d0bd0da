"""SDXL-family models: SDXL base and its fine-tunes (Pony, Illustrious, NoobAI, Juggernaut,
DreamBooth and style fine-tunes), as diffusers' `StableDiffusionXLPipeline` holds them.

Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis",
arXiv 2307.01952: Sec. 2.1 (two text encoders, CLIP ViT-L and OpenCLIP ViT-bigG, whose
penultimate hidden states are concatenated into the cross-attention context; the pooled,
projected embedding of the second is added to the time embedding) and Sec. 2.2
(micro-conditioning on the original image size, the crop's top-left corner and the target size,
each number embedded like a timestep). The conditioning is computed as diffusers'
`StableDiffusionXLPipeline` computes it (`encode_prompt`, `_get_add_time_ids`, its denoising
loop), so `single` reproduces that pipeline's latents; the tests compare them.

What the family adds to `ModelHandle`:
- `encode_prompt`: embeds (B, L, D1 + D2), and `extra["text_embeds"]` (B, P), the pooled one.
- `extra["time_ids"]` (B, 6): (original h, w, crop top, left, target h, w) in pixels. When a
  conditioning has none, the denoiser call conditions on the whole image it samples: original =
  target = the latents' size in pixels, crop (0, 0), the pipeline's default.
- `for_window`: a Mixture-of-Diffusers region is a crop of the canvas, so it is conditioned as
  one: original size = the canvas, crop top-left = the region's corner, target size = the
  region's size, the meaning these numbers had in SDXL's training on random crops (Sec. 2.2:
  the crop's corner in the image it was cut from, the size it was trained at). A region
  covering the whole canvas gets the default numbers, so it equals `single` exactly. Deviation:
  diffusers' community SDXL tiling pipeline gives every tile the whole image's numbers.
- `ready_vae`: a float16 VAE whose config sets `force_upcast` (SDXL base's) decodes in float32,
  as the pipeline does.
- `encode_negative`: with `force_zeros_for_empty_prompt` in the pipeline's config (SDXL base
  sets it), an empty negative prompt is all zeros (text sequence and pooled embedding).

Deviations: diffusers zeroes the negative only when `negative_prompt` is None and encodes an
explicitly given ""; here a negative prompt is "" by default (recipes, the API), so "" takes
None's place. The second encoder always reads the same prompt as the first (diffusers'
`prompt_2=None`). The refiner (`StableDiffusionXLImg2ImgPipeline`, one text encoder, an
aesthetic score in place of the target size) is not a text-to-image model and is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from multifusion.errors import ModelLoadError
from multifusion.families.sd import SDHandle
from multifusion.handles import Conditioning


def time_ids(original: tuple[int, int], top_left: tuple[int, int], target: tuple[int, int], batch: int) -> torch.Tensor:
    """(B, 6) float32 micro-conditioning rows (original h, w, crop top, left, target h, w), in
    the order of `StableDiffusionXLPipeline._get_add_time_ids`."""
    return torch.tensor([[*original, *top_left, *target]], dtype=torch.float32).expand(batch, 6)


@dataclass(eq=False)
class SDXLHandle(SDHandle):
    """A loaded SDXL-family model (module docstring)."""

    text_encoder_2: Any = None  # CLIPTextModelWithProjection
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True

    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "text_encoder_2")
    family_name: ClassVar[str] = "SDXL"
    load_kwargs: ClassVar[dict[str, Any]] = {}

    @classmethod
    def example_inputs(cls, config: dict, batch: int, latent: tuple[int, int, int], tokens: int) -> dict[str, Any]:
        """SDXL's UNet inputs with the pooled text embedding and the six time ids."""
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return {
            **super().example_inputs(config, batch, latent, tokens),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)},
        }

    @classmethod
    def ldm_state_dict(cls, folder) -> dict[str, torch.Tensor]:
        """The pipeline folder's UNet, VAE and both text encoders in the original (LDM) key names."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from multifusion.families.ldm import to_ldm_sdxl_state_dict

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", use_safetensors=True)
        return to_ldm_sdxl_state_dict(unet, vae, text_encoder, text_encoder_2)

    @classmethod
    def pipeline_parts(cls, pipe: Any) -> dict[str, Any]:
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise ModelLoadError(
                "this SDXL pipeline has no first text encoder (a refiner?); only SDXL base-shaped "
                "text-to-image models load (the refiner is not supported)"
            )
        return {
            **super().pipeline_parts(pipe),
            "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        }

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Both encoders' penultimate hidden states, concatenated (B, L, D1 + D2), and the pooled
        projection of the second (B, P) as `extra["text_embeds"]`. Each tokenizer pads to its
        max length and truncates, without an attention mask, as the pipeline does. Each distinct
        prompt is encoded once and its rows repeated, as the pipeline repeats one prompt's
        embedding for its images (a batch of one prompt is then bit-identical to it)."""
        dev = self.offloader.device if self.offloader else self.device
        distinct = list(dict.fromkeys(prompts))
        rows = torch.tensor([distinct.index(p) for p in prompts])
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            self._on_device(encoder)
            out = encoder(ids.to(dev), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (CLIPTextModelWithProjection)
                pooled = out[0]
            states.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError(
                f"model {self.name!r}: neither text encoder gives a pooled projection (text_encoder_2 should "
                "be a CLIPTextModelWithProjection)"
            )
        rows = rows.to(pooled.device)
        return Conditioning(torch.cat(states, dim=-1)[rows].to(self.dtype), {"text_embeds": pooled[rows].to(self.dtype)})

    def encode_negative(self, negatives: list[str], positive: Conditioning) -> Conditioning:
        """Empty negative prompts are zeros when the pipeline forces them (module docstring);
        other rows are encoded."""
        empty = torch.tensor([n == "" for n in negatives])
        if not self.force_zeros_for_empty_prompt or not bool(empty.any()):
            return self.encode_prompt(negatives)
        if bool(empty.all()):
            return Conditioning(torch.zeros_like(positive.embeds), {k: torch.zeros_like(v) for k, v in positive.extra.items()})
        enc = self.encode_prompt(negatives)

        def keep(v: torch.Tensor) -> torch.Tensor:
            return torch.where(empty.to(v.device).view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v)

        return Conditioning(keep(enc.embeds), {k: keep(v) for k, v in enc.extra.items()})

    def ready_vae(self, device: str | torch.device | None = None) -> torch.nn.Module:
        """As `ModelHandle.ready_vae`, and a float16 VAE whose config sets `force_upcast` (SDXL
        base's, which overflows in half precision) runs in float32, as the pipeline decodes it;
        the fp16-fix VAE (`vae:` in a recipe) clears that flag and stays in float16."""
        vae = super().ready_vae(device)
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        return vae

    def for_window(self, cond: Conditioning, box: tuple[int, int, int, int], canvas: tuple[int, int]) -> Conditioning:
        """`cond` with the micro-conditioning of a crop: original size = the canvas, crop
        top-left = the window's corner, target size = the window's size, in pixels."""
        f = self.vae_scale_factor
        r0, r1, c0, c1 = box
        ids = time_ids((canvas[0] * f, canvas[1] * f), (r0 * f, c0 * f), ((r1 - r0) * f, (c1 - c0) * f), len(cond))
        return Conditioning(cond.embeds, {**cond.extra, "time_ids": ids})

    def denoiser_kwargs(self, x_t: torch.Tensor, cond: Conditioning, device: torch.device) -> dict[str, Any]:
        """`added_cond_kwargs` of the SDXL UNet: the pooled text embedding and the time ids (the
        whole sampled image's, unless `cond` carries its own)."""
        ids = cond.extra.get("time_ids")
        if ids is None:
            size = (x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor)
            ids = time_ids(size, (0, 0), size, x_t.shape[0])
        return {
            "added_cond_kwargs": {"text_embeds": cond.extra["text_embeds"].to(device), "time_ids": ids.to(device, self.dtype)}
        }
