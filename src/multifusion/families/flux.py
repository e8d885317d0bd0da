"""FLUX.1: a rectified-flow transformer (double- then single-stream blocks) on 16-channel latents
packed in 2x2 patches, conditioned on CLIP's pooled embedding and T5's tokens; the dev model and
its fine-tunes are guidance-distilled (the guidance scale is an input, one pass per step).

Black Forest Labs, FLUX.1 (2024; reference code github.com/black-forest-labs/flux, `sampling.py`:
`prepare`, `get_schedule`, `unpack`), as diffusers' FluxPipeline runs it:

    pooled = CLIP(prompt).pooler_output        (B, 768)
    embeds = T5(prompt)                        (B, 512, 4096), txt_ids zeros (512, 3)
    tokens = pack(x_t)                         (B, h/2 * w/2, 4C): one token per 2x2 patch
    img_ids[i, j] = (0, i, j)                  the patch's row and column (rotary positions)
    v      = unpack(T(tokens, t / 1000, guidance, pooled, embeds, ids))

Methods see unpacked latents (B, C, h, w); the handle packs at its edge. Positions are those of
the latents it is given, so a Mixture-of-Diffusers region is a whole image of its own size to
the model (ids from (0, 0)), as the tiled-diffusion tools for FLUX compute them.

Guidance: the recipe's guidance scale is the distilled guidance FluxPipeline calls
`guidance_scale` (ignored by models without a guidance embedding, e.g. schnell, as diffusers
ignores it). True classifier-free guidance (a negative prompt and a second pass, FluxPipeline's
`true_cfg_scale`) is the handle's `true_cfg_scale`, 1 (off) by default; methods that need the
unconditional prediction (SNB) run the negative pass whatever its value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from multifusion.families.blocks import BlockLayout
from multifusion.families.flowmatch import FlowHandle, tokens
from multifusion.handles import Conditioning, Guided


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): one token per 2x2 patch, row-major over patches, each
    token the patch's C x 2 x 2 values channel first."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents {h}x{w} do not split into 2x2 patches; both sides must be even")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack`."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"{n} tokens of width {d} are not the 2x2 patches of {h}x{w} latents")
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, d // 4, h, w)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 3) rotary positions of a rows x cols patch grid: (0, row, col), row-major."""
    r = torch.arange(rows).view(-1, 1).expand(rows, cols)
    c = torch.arange(cols).view(1, -1).expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3).float()


def flux_layout(config: Mapping[str, Any]) -> BlockLayout:
    """Block layout of a `FluxTransformer2DModel` from its config, in SuperMerger's FLUX ids: IN
    (x_embedder, context_embedder, time_text_embed: BFL's img_in, txt_in, time_in, vector_in,
    guidance_in), D00.. (transformer_blocks.i, BFL's double_blocks.i), S00..
    (single_transformer_blocks.i, BFL's single_blocks.i), OUT (norm_out, proj_out: BFL's
    final_layer). Leading weights: BASE (both text encoders) or CLIP, T5 (SuperMerger's)."""
    members = {"IN": ("x_embedder", "context_embedder", "time_text_embed")}
    members |= {f"D{i:02d}": (f"transformer_blocks.{i}",) for i in range(int(config.get("num_layers", 19)))}
    members |= {f"S{i:02d}": (f"single_transformer_blocks.{i}",) for i in range(int(config.get("num_single_layers", 38)))}
    members["OUT"] = ("norm_out", "proj_out")
    return BlockLayout(
        0,
        tuple(members),
        members,
        denoiser="transformer",
        kind="FLUX transformer",
        leads=(("BASE",), ("CLIP", "T5")),
        t5="text_encoder_2",
        resamples=False,
    )


@dataclass(eq=False)
class FluxHandle(FlowHandle):
    """A `FluxPipeline` model. `unet` holds the FluxTransformer2DModel, `text_encoder` CLIP and
    `text_encoder_2` T5."""

    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    max_sequence_length: int = 512  # T5 tokens, the pipeline's default
    true_cfg_scale: float = 1.0

    pipeline_class: ClassVar[str] = "FluxPipeline"
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "text_encoder_2")
    t5_component: ClassVar[str | None] = "text_encoder_2"
    family_name: ClassVar[str] = "FLUX.1"
    takes_true_cfg: ClassVar[bool] = True
    denoiser_class: ClassVar[str] = "FluxTransformer2DModel"

    pipeline_sigmas: ClassVar[bool] = True
    default_max_shift: ClassVar[float] = 1.15

    @classmethod
    def example_inputs(cls, config: dict, batch: int, latent: tuple[int, int, int], tokens: int) -> dict[str, Any]:
        """Packed 2x2 latent patches (B, h/2 * w/2, 4C), as `eps` passes them, with the guidance
        and the rotary ids."""
        c, h, w = latent
        n = (h // 2) * (w // 2)
        return {
            **super().example_inputs(config, batch, latent, tokens),
            "hidden_states": torch.randn(batch, n, 4 * c),
            "guidance": torch.full((batch,), 3.5) if config.get("guidance_embeds") else None,
            "txt_ids": torch.zeros(tokens, 3),
            "img_ids": torch.zeros(n, 3),
        }

    @classmethod
    def config_facts(cls, denoiser: Mapping[str, Any]) -> tuple[int, int, int]:
        """Channels of the unpacked latents (the transformer takes 2x2 patches of them, 4C wide);
        the native side is FluxPipeline's default_sample_size (128 latent pixels: 1024 px)."""
        return int(denoiser.get("in_channels", 64)) // 4, 2, 128

    @classmethod
    def block_layout(cls, denoiser: Mapping[str, Any]) -> BlockLayout:
        return flux_layout(denoiser)

    @property
    def distilled(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (dev, not schnell)."""
        return bool(self.unet.config.guidance_embeds)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """embeds (B, 512, D_T5) from T5 and extra["pooled"] (B, D_CLIP) from CLIP's pooler."""
        dev = self._exec_device(self.text_encoder)
        pooled = self.text_encoder(
            tokens(self.tokenizer, prompts, self.tokenizer.model_max_length).to(dev), output_hidden_states=False
        ).pooler_output
        dev = self._exec_device(self.text_encoder_2)
        embeds = self.text_encoder_2(
            tokens(self.tokenizer_2, prompts, self.max_sequence_length).to(dev), output_hidden_states=False
        )[0]
        return Conditioning(embeds.to(dtype=self.dtype), {"pooled": pooled.to(embeds.device, self.dtype)})

    def guide(
        self, prompt: str | list[str], *, negative_prompt: str | list[str] = "", guidance_scale: float = 3.5, batch_size: int = 1
    ) -> Guided:
        """`prompt` with the distilled guidance `guidance_scale` (an input of every pass, of the
        negative one too, as FluxPipeline gives it) and true CFG at `true_cfg_scale`."""
        g = super().guide(prompt, negative_prompt=negative_prompt, guidance_scale=self.true_cfg_scale, batch_size=batch_size)
        if not self.distilled:
            return g

        def with_guidance(c: Conditioning) -> Conditioning:
            return Conditioning(c.embeds, {**c.extra, "guidance": torch.full((len(c),), float(guidance_scale))})

        return dataclasses.replace(g, positive=with_guidance(g.positive), negative=with_guidance(g.negative))

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity (B, C, h, w) float32 at unpacked latents x_t (B, C, h, w), timestep
        t = 1000 sigma (the transformer takes sigma itself)."""
        b, _, h, w = x_t.shape
        dev = self._exec_device(self.unet)
        timestep = torch.as_tensor(t, device=dev).expand(b).to(self.dtype) / 1000
        guidance = cond.extra.get("guidance")
        out = self.unet(
            hidden_states=pack(x_t.to(dev, self.dtype)),
            timestep=timestep,
            guidance=None if guidance is None else guidance.to(dev, torch.float32),
            pooled_projections=cond.extra["pooled"].to(dev),
            encoder_hidden_states=cond.embeds.to(dev),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=dev, dtype=self.dtype),
            img_ids=image_ids(h // 2, w // 2).to(dev, self.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x_t.device, torch.float32)
