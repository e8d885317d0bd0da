"""Tiny SDXL-shaped pipelines built from config, with no network access, for tests.

An SDXL pipeline (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis", arXiv 2307.01952, Sec. 2.1-2.2) has two tokenizers and text encoders (a
CLIPTextModel and a CLIPTextModelWithProjection, whose penultimate hidden states are
concatenated into the cross-attention context and whose second gives the pooled embedding), a
UNet with `addition_embed_type="text_time"` (the pooled embedding and six micro-conditioning
numbers, each sinusoidally embedded, added to the time embedding), a VAE with SDXL's scaling
factor 0.13025 and an Euler schedule. Here every part is built at a small size with fixed seeds
and saved through `StableDiffusionXLPipeline.save_pretrained`, so the loaders read the folder
as they read a real SDXL checkpoint. The tokenizers are `multifusion.zoo.tiny`'s local CLIP
vocabulary; the second pads with "!" as SDXL's second tokenizer does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from multifusion.zoo.tokenizer import write_clip_tokenizer

SCALING_FACTOR = 0.13025  # SDXL's VAE (sd_xl_base.yaml `scale_factor`)
TIME_EMBED_DIM = 8  # per micro-conditioning number (SDXL: 256)
PROJECTION_DIM = 16  # text_encoder_2's pooled projection (SDXL: 1280)


def build_tiny_sdxl_pipeline(
    folder: str | Path,
    *,
    seed: int = 0,
    text_seed: int | None = None,
    vae_seed: int | None = None,
    prediction_type: str = "epsilon",
    force_zeros_for_empty_prompt: bool = True,
    levels: int = 2,
    layers_per_block: int = 1,
    sample_size: int = 8,
) -> Path:
    """Build and save a tiny `StableDiffusionXLPipeline` folder.

    `seed` sets the UNet's weights; `text_seed` (both text encoders) and `vae_seed` default to
    `seed`, so pipelines can share those components as fine-tunes of one base do. `levels` and
    `layers_per_block` shape the UNet (SDXL base: 3 and 2, which give its 20 block-weight ids);
    the VAE has factor 4.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    tok_dir = write_clip_tokenizer(folder / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")

    def text_config(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )

    torch.manual_seed(seed if text_seed is None else text_seed)
    text_encoder = CLIPTextModel(text_config(16)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config(24, projection_dim=PROJECTION_DIM)).eval()

    torch.manual_seed(seed if vae_seed is None else vae_seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=sample_size * 4,
        scaling_factor=SCALING_FACTOR,
        force_upcast=True,
    ).eval()

    torch.manual_seed(seed)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=(16, 32, 32)[:levels] if levels <= 3 else (16,) * levels,
        layers_per_block=layers_per_block,
        transformer_layers_per_block=tuple(range(1, levels + 1)),
        cross_attention_dim=16 + 24,  # both encoders' hidden states, concatenated
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    ).eval()
    with torch.no_grad():  # as in zoo/tiny.py: a zero-initialised conv_out would hide the seed
        unet.conv_out.weight.normal_(0.0, 0.05)

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder
