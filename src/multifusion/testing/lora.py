"""Test LoRAs: random non-zero adapters on a pipeline folder's denoiser (and text encoders), saved
as diffusers saves a trained LoRA; the same LoRA in kohya/A1111 key names; a copy of the base
with a LoRA fused into its weights (what a user bakes by hand today).

Built with peft's `LoraConfig` and diffusers' `save_lora_weights`, so the files are what training
scripts write. peft initialises lora_B at zero (a LoRA that changes nothing); here every lora_A
and lora_B is drawn from a seeded generator so the adapter changes the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _pipeline(folder: str | Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)


def _randomise(module: torch.nn.Module, adapter: str, generator: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if f"lora_A.{adapter}." in name or f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def write_random_lora(
    pipeline_folder: str | Path,
    out_folder: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    std: float = 0.1,
    text_encoders: bool = False,
    denoiser_targets: list[str] | None = None,
) -> Path:
    """A random LoRA for the pipeline in `pipeline_folder`, saved by the pipeline's
    `save_lora_weights` into `out_folder` (pytorch_lora_weights.safetensors, diffusers/peft keys):
    rank `rank` (alpha = rank, so its own scale is 1) on the denoiser's attention projections and,
    with `text_encoders`, on every CLIP text encoder's. Returns the file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline(pipeline_folder)
    generator = torch.Generator().manual_seed(seed)
    denoiser_name = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=denoiser_targets or DENOISER_TARGETS)
    denoiser.add_adapter(config, adapter_name="test")
    _randomise(denoiser, "test", generator, std)
    layers = {
        f"{denoiser_name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name="test"))
    }
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is None or "CLIP" not in type(encoder).__name__:
                continue
            # peft's own injection: transformers' `add_adapter` asks for a newer peft than diffusers does.
            inject_adapter_in_model(
                LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS), encoder, adapter_name="test"
            )
            _randomise(encoder, "test", generator, std)
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(encoder, adapter_name="test")
            )
    out = Path(out_folder)
    type(pipe).save_lora_weights(str(out), safe_serialization=True, **layers)
    return out / "pytorch_lora_weights.safetensors"


def to_kohya(lora_file: str | Path, out_file: str | Path) -> Path:
    """A Stable Diffusion 1.x/2.x LoRA in diffusers/peft key names rewritten in kohya/A1111's
    (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_...` for the
    text encoder), the layout of most LoRAs shared as single files."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_file))
    out: dict[str, torch.Tensor] = {}
    ends = {
        **{f".{layer}.{part}.weight": part for layer in ("lora", "lora_linear_layer") for part in ("down", "up")},
        ".lora_A.weight": "down",
        ".lora_B.weight": "up",
    }
    for key, value in state.items():
        # diffusers' training scripts write "unet.down_blocks.1....to_q.lora.down.weight" and
        # "text_encoder.encoder.layers.0....q_proj.lora_linear_layer.down.weight"; peft "...lora_A.weight"
        end = next(e for e in ends if key.endswith(e))
        prefix, path = key.removesuffix(end).split(".", 1)
        if prefix == "unet":
            stem = "lora_unet_" + path.replace(".", "_")
        else:  # kohya names CLIP's modules from its text_model
            stem = "lora_te_" + ("" if path.startswith("text_model.") else "text_model_") + path.replace(".", "_")
        out[f"{stem}.lora_{ends[end]}.weight"] = value.contiguous()
        if ends[end] == "down":
            out[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scale 1, as written
    save_file(out, str(out_file))
    return Path(out_file)


def write_fused(pipeline_folder: str | Path, lora: str | Path, out_folder: str | Path, *, scale: float = 1.0) -> Path:
    """A copy of the pipeline with `lora` fused into its weights at `scale` (diffusers'
    `load_lora_weights`, `fuse_lora`, `unload_lora_weights`, `save_pretrained`): the full
    fine-tune a LoRA model stands for."""
    pipe = _pipeline(pipeline_folder)
    lora = Path(lora)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="fused")
    # Every component the LoRA may touch: FluxPipeline's fuse_lora fuses the transformer only by default.
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules), lora_scale=scale, adapter_names=["fused"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(out_folder), safe_serialization=True)
    return Path(out_folder)
