"""Memory of two SD3.5 or two FLUX.1 models, counted from their published configs.

Each component is instantiated on the `meta` device (shapes, no storage, nothing downloaded) and
its parameters counted. Fine-tunes of one base share their text encoders and VAE, which the
loader holds once (`multifusion.loading.share_components`), so two models hold two transformers
and one set of the rest. Weights only: activations come on top (attention over 4096 image tokens
at 1024 px, several GB at batch 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Published config values (the diffusers folders of stabilityai/stable-diffusion-3.5-large and
# -medium, black-forest-labs/FLUX.1-dev; CLIP ViT-L/14, OpenCLIP bigG/14 and T5 v1.1 XXL text towers).
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE_16 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

GB = 1e9


def count_parameters(build) -> int:
    """Parameters of the module `build()` makes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def component_counts(family: str, config: dict) -> dict[str, int]:
    """Parameters per component of one model of `family` ("sd3" or "flux") with transformer
    `config`: {"transformer": n, "text encoders": n, "vae": n}."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    transformer = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    if family == "sd3":
        texts = [lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                 lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))]
    else:
        texts = [lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))]
    texts.append(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    return {"transformer": count_parameters(lambda: transformer(**config)),
            "text encoders": sum(count_parameters(b) for b in texts),
            "t5": count_parameters(texts[-1]),
            "vae": count_parameters(lambda: AutoencoderKL(**VAE_16))}


@dataclass(frozen=True)
class MemoryRow:
    model: str
    transformer: int  # parameters of one transformer
    shared: int  # text encoders + VAE, held once for fine-tunes of one base
    largest_module: int  # the most a one-module-at-a-time offload puts on the device

    def two_models_gb(self, bytes_per_param: float = 2.0) -> float:
        return (2 * self.transformer + self.shared) * bytes_per_param / GB

    def offload_gb(self, bytes_per_param: float = 2.0) -> float:
        return self.largest_module * bytes_per_param / GB


def memory_rows() -> list[MemoryRow]:
    rows = []
    for name, family, config in (("SD3.5 Large", "sd3", SD35_LARGE), ("SD3.5 Medium", "sd3", SD35_MEDIUM),
                                 ("FLUX.1 dev", "flux", FLUX_DEV)):
        c = component_counts(family, config)
        rows.append(MemoryRow(name, c["transformer"], c["text encoders"] + c["vae"], max(c["transformer"], c["t5"])))
    return rows


def fits(gb: float, device_gb: float, headroom: float = 0.8) -> str:
    """"yes" when weights take at most `headroom` of the device (the rest for activations)."""
    return "yes" if gb <= headroom * device_gb else "no"


def memory_table() -> str:
    """The markdown table of docs/flow.md: bf16 weights of two fine-tunes of one base."""
    header = ("| two models of | transformer (each) | shared encoders + VAE | two models, all resident | "
              "24 GB | 80 GB | offload (largest module) | 24 GB offloaded |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in memory_rows():
        total, off = r.two_models_gb(), r.offload_gb()
        lines.append(f"| {r.model} | {r.transformer / 1e9:.2f} B ({r.transformer * 2 / GB:.1f} GB) | "
                     f"{r.shared / 1e9:.2f} B ({r.shared * 2 / GB:.1f} GB) | {total:.1f} GB | {fits(total, 24)} | "
                     f"{fits(total, 80)} | {off:.1f} GB | {fits(off, 24)} |")
    return "\n".join(lines)
