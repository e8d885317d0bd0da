"""Architectures of the zoo's diffusion models: one tokenizer, text encoder, VAE and UNet design
shared by every zoo model, the way fine-tunes of one base model share them.

Each builder is a pure function of a seed (and a size preset), so a retrain makes the same
initial weights. ``"zoo"`` is the shipped size; ``"tiny"`` is for fast tests only.

Sizes (the ``"zoo"`` preset), chosen to train on 2 CPU cores:

- tokenizer: CLIP BPE with every ShapeWorld word one token, ``model_max_length`` 32 (the longest
  zoo caption, three objects in a cartoon scene, is 29 tokens with BOS/EOS);
- text encoder: CLIPTextModel, hidden 64, 2 layers, 2 heads, ~0.12M parameters, frozen at its
  seeded random initialisation (every zoo model shares it);
- VAE: AutoencoderKL of factor 4 (64x64x3 -> 16x16x4 latents), channels (16, 32, 64), ~0.68M
  parameters (32 channels at 64x64 cost 3 s per batch-32 step here; 16 keeps a step ~0.3 s);
- UNet: UNet2DConditionModel on 16x16x4 latents, channels (32, 64, 64), cross-attention only at
  the 8x8 and 4x4 levels (and the mid block), ~1.7M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multifusion.zoo import render

MAX_TOKENS = 32
"""Tokenizer ``model_max_length``: long enough for every zoo caption (checked in tests)."""


@dataclass(frozen=True)
class ZooSizes:
    """Widths of the shared components. ``zoo`` is shipped; ``tiny`` only makes tests fast."""

    text_hidden: int
    text_layers: int
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, int, int]
    attention_head_dim: int
    norm_groups: int


SIZES: dict[str, ZooSizes] = {
    "zoo": ZooSizes(64, 2, (16, 32, 64), (32, 64, 64), 16, 8),
    "tiny": ZooSizes(16, 1, (8, 16, 16), (8, 16, 16), 8, 4),
}


def vocabulary() -> list[str]:
    """Every word a ShapeWorld caption can use (each becomes one token)."""
    words: set[str] = {"a", "an", "and", "of", "cartoon"}
    words |= set(render.ALL_COLOURS) | set(render.TEXTURES) | set(render.SHAPES)
    for phrase in (*render.SLOT_PHRASES.values(), *render.SCENE_PHRASES.values(), *render.EMPTY_PHRASES.values()):
        words |= set(phrase.split())
    return sorted(words)


def build_tokenizer(folder: str | Path):
    """Write the shared CLIP tokenizer into ``folder`` and return it (loaded back)."""
    from transformers import CLIPTokenizer

    from multifusion.zoo.tokenizer import write_clip_tokenizer

    folder = Path(folder)
    # BPE applies merges by rank, so an early word's merge (t r, from "triangle") can block a
    # later word ("striped"). Order longest first, then move any word that still splits to the
    # front until every word is one token (two rounds for this vocabulary).
    words = sorted(vocabulary(), key=lambda w: (-len(w), w))
    for _ in range(len(words)):
        write_clip_tokenizer(folder, words=tuple(words))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
        if not split:
            break
        words = split + [w for w in words if w not in split]
    else:
        raise RuntimeError(f"could not make every ShapeWorld word a single token: {split}")
    # write_clip_tokenizer fixes model_max_length=16; three-object captions need more.
    tokenizer.model_max_length = MAX_TOKENS
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def clip_text_encoder(tokenizer, hidden: int, intermediate: int, layers: int, seed: int):
    """A CLIPTextModel for ``tokenizer`` at its seeded random initialisation (eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def kl_vae(channels: tuple[int, ...], latent_channels: int, groups: int, sample_size: int, seed: int):
    """An AutoencoderKL of factor 2**(len(channels) - 1), seeded, one layer per block."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        layers_per_block=1,
        sample_size=sample_size,
    )


def build_text_encoder(tokenizer, sizes: ZooSizes, seed: int):
    """The shared text encoder, never trained."""
    return clip_text_encoder(tokenizer, sizes.text_hidden, 2 * sizes.text_hidden, sizes.text_layers, seed)


def build_vae(sizes: ZooSizes, seed: int):
    """AutoencoderKL of factor 4: (N, 3, 64, 64) in [-1, 1] <-> (N, 4, 16, 16) latents."""
    return kl_vae(tuple(sizes.vae_channels), 4, min(8, sizes.vae_channels[0]), render.SIZE, seed)


def build_unet(sizes: ZooSizes, seed: int, cross_attention_dim: int):
    """The one UNet architecture of the zoo (epsilon prediction on 16x16x4 latents).

    Cross-attention only at the coarse levels (8x8, 4x4, and the mid block): it helped small
    models bind words to the scene in an earlier trial on this machine (issue 3).
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=render.SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=sizes.attention_head_dim,
        norm_num_groups=sizes.norm_groups,
    )


def build_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion's schedule (scaled_linear 0.00085-0.012, 1000 steps) as a DDIM config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def fast_cpu_attention(module: torch.nn.Module) -> None:
    """Use diffusers' plain ``AttnProcessor`` (bmm softmax) in place of SDPA.

    Deviation from diffusers' default: torch's CPU flash-attention kernel took a third of each
    training step at these tiny head sizes; the plain processor computes the same attention
    ~1.5x faster here. It is a runtime setting only: saved weights are unaffected.
    """
    from diffusers.models.attention_processor import AttnProcessor

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor())
