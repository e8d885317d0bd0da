"""Tiny Stable-Diffusion-shaped pipelines built from config, with no network access: the zoo's
component builders at random initialisation and a few hundred thousand parameters, for tests,
benchmarks and `multifusion demo --tiny`.

A diffusers pipeline folder needs a tokenizer, a text encoder, a VAE, a UNet and a scheduler.
Here each is built from a small config with a fixed seed and saved through the real
`save_pretrained`, so the loaders under test read them exactly as they read a real checkpoint.
The tokenizer's vocabulary is written locally: the 256 byte symbols of CLIP's byte-level BPE
(each also with the end-of-word mark), the two special tokens, and merges for a few whole words.
"""

from __future__ import annotations

from pathlib import Path

import torch

from multifusion.zoo.tokenizer import write_clip_tokenizer


def build_tiny_pipeline(
    folder: str | Path,
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    text_seed: int | None = None,
    vae_seed: int | None = None,
    cross_attention_dim: int = 32,
    latent_channels: int = 4,
    vae_factor: int = 4,
    sample_size: int = 8,
) -> Path:
    """Build and save a tiny `StableDiffusionPipeline` folder (about 0.3M parameters).

    `seed` sets the UNet's weights; `text_seed` and `vae_seed` (default: `seed`) set the text
    encoder's and the VAE's, so several pipelines can share (or not) those components the way
    fine-tunes of one base model do. `vae_factor` is 2**(number of VAE blocks - 1).
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from multifusion.zoo.models import build_scheduler, clip_text_encoder, kl_vae

    folder = Path(folder)
    tok_dir = write_clip_tokenizer(folder / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    text_encoder = clip_text_encoder(tokenizer, cross_attention_dim, 64, 2, seed if text_seed is None else text_seed)
    n_vae_blocks = {1: 1, 2: 2, 4: 3, 8: 4}[vae_factor]
    vae = kl_vae(
        (8, 16, 16, 16)[:n_vae_blocks], latent_channels, 4, sample_size * vae_factor, seed if vae_seed is None else vae_seed
    ).eval()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    # Random weights give near-zero outputs of the zero-initialised conv_out; perturb it so
    # different seeds give clearly different predictions.
    with torch.no_grad():
        unet.conv_out.weight.normal_(0.0, 0.05)

    scheduler = build_scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder
