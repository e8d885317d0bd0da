"""Stable Diffusion 3 / 3.5: an MMDiT transformer on 16-channel latents, conditioned on two CLIP
encoders and an optional T5 encoder, sampled on a flow-matching schedule with a static shift.

Esser, Kulal, Blattmann, Entezari, Mueller, Saini, Levi, Lorenz, Sauer, Boesel, Podell, Dockhorn,
English, Lacey, Goodwin, Marek, Rombach, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis", ICML 2024, arXiv 2403.03206 (Sec. 5.1: the text conditioning below).

The conditioning, as diffusers' StableDiffusion3Pipeline computes it:

    c_i, p_i = CLIP_i(prompt)         penultimate hidden states (B, 77, D_i), projected pooled (B, P_i)
    t5       = T5(prompt)             last hidden state (B, 256, D_T5); zeros without a T5 encoder
    embeds   = [pad(c_1 ++ c_2) ; t5]  CLIP features joined, zero-padded to D_T5, then T5's tokens
    pooled   = p_1 ++ p_2             (B, P_1 + P_2)

The transformer takes the timestep t = 1000 sigma and returns the velocity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from multifusion.families.blocks import BlockLayout
from multifusion.families.flowmatch import FlowHandle, tokens
from multifusion.handles import Conditioning


def sd3_layout(config: Mapping[str, Any]) -> BlockLayout:
    """Block layout of an `SD3Transformer2DModel` from its config: IN (pos_embed with its patch
    projection, context_embedder, time_text_embed: the original's x_embedder, pos_embed,
    context_embedder, t_embedder, y_embedder), J00.. (transformer_blocks.i, the original's
    joint_blocks.i), OUT (norm_out, proj_out: its final_layer). Leading weight: BASE (the two
    CLIPs and T5)."""
    members = {"IN": ("pos_embed", "context_embedder", "time_text_embed")}
    members |= {f"J{i:02d}": (f"transformer_blocks.{i}",) for i in range(int(config.get("num_layers", 18)))}
    members["OUT"] = ("norm_out", "proj_out")
    return BlockLayout(
        0, tuple(members), members, denoiser="transformer", kind="SD3 transformer", t5="text_encoder_3", resamples=False
    )


@dataclass(eq=False)
class SD3Handle(FlowHandle):
    """A `StableDiffusion3Pipeline` model. `unet` holds the SD3Transformer2DModel; `text_encoder_3`
    (T5) may be None, as diffusers allows (its tokens are then zeros)."""

    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    max_sequence_length: int = 256  # T5 tokens, the pipeline's default

    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    t5_component: ClassVar[str | None] = "text_encoder_3"
    family_name: ClassVar[str] = "Stable Diffusion 3"
    denoiser_class: ClassVar[str] = "SD3Transformer2DModel"

    @classmethod
    def config_facts(cls, denoiser: Mapping[str, Any]) -> tuple[int, int, int]:
        return int(denoiser.get("in_channels", 16)), int(denoiser.get("patch_size", 2)), int(denoiser.get("sample_size", 128))

    @classmethod
    def block_layout(cls, denoiser: Mapping[str, Any]) -> BlockLayout:
        return sd3_layout(denoiser)

    def _clip(self, encoder: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states (B, L, D), projected pooled embedding (B, P)) of one CLIP,
        padded to the first tokenizer's length as the pipeline pads both."""
        dev = self._exec_device(encoder)
        out = encoder(tokens(tokenizer, prompts, self.tokenizer.model_max_length).to(dev), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """embeds (B, 77 + 256, D_T5) and extra["pooled"] (B, P_1 + P_2); see the module docstring."""
        seq_1, pooled_1 = self._clip(self.text_encoder, self.tokenizer, prompts)
        seq_2, pooled_2 = self._clip(self.text_encoder_2, self.tokenizer_2, prompts)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(
                len(prompts),
                self.max_sequence_length,
                int(self.unet.config.joint_attention_dim),
                device=seq_1.device,
                dtype=seq_1.dtype,
            )
        else:
            dev = self._exec_device(self.text_encoder_3)
            t5 = self.text_encoder_3(tokens(self.tokenizer_3, prompts, self.max_sequence_length).to(dev))[0]
        clip = torch.cat([seq_1, seq_2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D_T5)
        embeds = torch.cat([clip.to(t5.device), t5], dim=-2)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1)
        return Conditioning(embeds.to(dtype=self.dtype), {"pooled": pooled.to(embeds.device, self.dtype)})

    def raw_prediction(
        self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The raw velocity (B, C, h, w) of `denoiser` (an SD3 transformer, or an AFA ensemble of
        them) at x_t and integer timesteps t (B,)."""
        return denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=t.float(),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            pooled_projections=cond.extra["pooled"].to(self.dtype),
        ).sample

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity (B, C, H, W) float32 at x_t (B, C, H, W), timestep t = 1000 sigma."""
        dev = self._exec_device(self.unet)
        timestep = torch.as_tensor(t, device=dev).expand(x_t.shape[0])
        out = self.unet(
            hidden_states=x_t.to(dev, self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond.embeds.to(dev),
            pooled_projections=cond.extra["pooled"].to(dev),
            return_dict=False,
        )[0]
        return out.to(x_t.device, torch.float32)
