"""Tiny Stable-Diffusion-3- and FLUX-shaped pipelines built from config, with no network access:
random transformers of a few ten thousand parameters, small CLIP and T5 encoders with tokenizers
written locally, and a 16-channel VAE with the shift and scaling factors of the real ones, saved
through the real `save_pretrained` so the loaders under test read them as a real checkpoint.

The T5 tokenizer is a Unigram model over a few whole words (each a piece with the word-start
mark) and single letters, built with the `tokenizers`-backed T5Tokenizer (no sentencepiece).
"""

from __future__ import annotations

from pathlib import Path

import torch

from multifusion.zoo.tokenizer import WORDS, write_clip_tokenizer

SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # SD3's VAE config
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's VAE config


def write_t5_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = WORDS) -> Path:
    """Save a small T5 (Unigram) tokenizer into `folder`: <pad> 0, </s> 1, <unk> 2, then each word
    of `words` as one piece, the word-start mark and the letters a-z (any other text is <unk>)."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)] + [("\u2581", -2.0)]
    vocab += [(chr(c), -3.0) for c in range(ord("a"), ord("z") + 1)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return folder


def _clip(tokenizer, hidden: int, seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()


def _vae(factors: dict, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **factors,
    ).eval()


def _tokenizers(folder: Path):
    from transformers import CLIPTokenizer, T5Tokenizer

    clip_dir, t5_dir = write_clip_tokenizer(folder / "_clip_build"), write_t5_tokenizer(folder / "_t5_build")
    out = CLIPTokenizer.from_pretrained(clip_dir), T5Tokenizer.from_pretrained(t5_dir)
    for d in (clip_dir, t5_dir):
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    return out


def _perturb_output(module: torch.nn.Module) -> None:
    # The final projection starts at zero in these transformers; random weights there make
    # different seeds predict clearly different velocities.
    with torch.no_grad():
        module.weight.normal_(0.0, 0.05)


def build_tiny_sd3_pipeline(
    folder: str | Path,
    *,
    seed: int = 0,
    text_seed: int | None = None,
    vae_seed: int | None = None,
    t5: bool = True,
    shift: float = 3.0,
) -> Path:
    """Build and save a tiny `StableDiffusion3Pipeline` folder: VAE factor 2 (16-px images per
    8x8 latent), 16 latent channels, 2x2 patches, two CLIPs (width 16, projected 16) and a T5 of
    width 32 (left out with `t5=False`). `seed` sets the transformer; `text_seed` and `vae_seed`
    (default `seed`) the encoders and the VAE, so several pipelines can share them as fine-tunes do."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    folder = Path(folder)
    text_seed = seed if text_seed is None else text_seed
    clip_tok, t5_tok = _tokenizers(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=32,
    ).eval()
    _perturb_output(transformer.proj_out)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(SD3_VAE, seed if vae_seed is None else vae_seed),
        text_encoder=_clip(clip_tok, 16, text_seed, True),
        tokenizer=clip_tok,
        text_encoder_2=_clip(clip_tok, 16, text_seed + 1000, True),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5(t5_tok, 32, text_seed) if t5 else None,
        tokenizer_3=t5_tok if t5 else None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_flux_pipeline(
    folder: str | Path, *, seed: int = 0, text_seed: int | None = None, vae_seed: int | None = None, guidance_embeds: bool = True
) -> Path:
    """Build and save a tiny `FluxPipeline` folder: VAE factor 2, 16 latent channels packed 2x2
    (64 per token), one double- and one single-stream block, CLIP width 16 and T5 width 32;
    guidance-distilled (dev-like) unless `guidance_embeds=False` (schnell-like). The scheduler
    shifts with the image size as FLUX.1-dev's config does."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    folder = Path(folder)
    text_seed = seed if text_seed is None else text_seed
    clip_tok, t5_tok = _tokenizers(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    _perturb_output(transformer.proj_out)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(FLUX_VAE, seed if vae_seed is None else vae_seed),
        text_encoder=_clip(clip_tok, 16, text_seed, False),
        tokenizer=clip_tok,
        text_encoder_2=_t5(t5_tok, 32, text_seed),
        tokenizer_2=t5_tok,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
