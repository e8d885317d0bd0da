"""Write a diffusers Stable Diffusion 1.x or SDXL pipeline as one original-layout (LDM) checkpoint.

Most SD-1.x and SDXL models are shared as a single ``.safetensors`` file with the key names of
the original code: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and for
SD-1.x ``cond_stage_model.transformer.*`` (CLIP text encoder); for SDXL (Stability AI's
`generative-models`, `sd_xl_base.yaml`) ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, in
transformers' names) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, in open_clip's
names: ``transformer.resblocks.{i}.attn.in_proj_weight`` holding q, k and v stacked,
``text_projection`` as (width, projection), ``positional_embedding``, ``ln_final``), and the
UNet's added-conditioning MLP as ``label_emb.0.0`` / ``label_emb.0.2``. `save_as_single_file`
turns a diffusers pipeline folder into such a file, so tests can exercise the single-file loader
offline and users can convert their own diffusers models (a fine-tune, a tiny test model) for
tools that expect single files. Diffusers' ``from_single_file`` reads the result back, given the
folder as config.

The key mapping is derived from the UNet's and VAE's configs (number of blocks, which have
attention, ``layers_per_block``), so it fits any SD-1.x-shaped pipeline, not one fixed size.
"""

from __future__ import annotations

import torch

from multifusion.errors import IncompatibleModelsError

# Module renames inside one residual block or VAE attention block, diffusers -> LDM.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Prefixes = dict[str, tuple[str, dict[str, str]]]  # diffusers module -> (LDM module, renames inside)


def _layers_per_block(cfg: dict) -> int:
    lpb = cfg["layers_per_block"]
    if not isinstance(lpb, int):
        raise IncompatibleModelsError(f"layers_per_block must be one integer for the LDM layout, got {lpb!r}")
    return lpb


def unet_prefixes(cfg: dict) -> Prefixes:
    """Map each UNet submodule to its LDM name: ``input_blocks`` hold conv_in, then per down block
    `layers_per_block` (resnet, attention) pairs and a downsampler (all but the last block);
    ``output_blocks`` hold per up block `layers_per_block + 1` pairs, the upsampler last."""
    lpb = _layers_per_block(cfg)
    m: Prefixes = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),  # SDXL's text_time conditioning MLP
        "add_embedding.linear_2": ("label_emb.0.2", {}),
    }
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    for b, kind in enumerate(down):
        for layer in range(lpb):
            i = 1 + b * (lpb + 1) + layer
            m[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{i}.0", _UNET_RESNET)
            if "CrossAttn" in kind:
                m[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{i}.1", {})
        if b < len(down) - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op", {})
    mid = ["resnets.0", "attentions.0", "resnets.1"]
    if "CrossAttn" not in (cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        mid.remove("attentions.0")
    for i, name in enumerate(mid):
        m[f"mid_block.{name}"] = (f"middle_block.{i}", _UNET_RESNET if name.startswith("resnets") else {})
    for b, kind in enumerate(up):
        attn = "CrossAttn" in kind
        for layer in range(lpb + 1):
            i = b * (lpb + 1) + layer
            m[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{i}.0", _UNET_RESNET)
            if attn:
                m[f"up_blocks.{b}.attentions.{layer}"] = (f"output_blocks.{i}.1", {})
        if b < len(up) - 1:
            m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{i}.{2 if attn else 1}.conv", {})
    return m


def vae_prefixes(cfg: dict) -> Prefixes:
    """Map each VAE submodule to its LDM name. The LDM decoder numbers its ``up`` blocks from the
    lowest resolution's end, the reverse of diffusers' ``up_blocks``."""
    lpb = _layers_per_block(cfg)
    m: Prefixes = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = (f"{side}.conv_in", {})
        m[f"{side}.conv_out"] = (f"{side}.conv_out", {})
        m[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        m[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET)
        m[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET)
        m[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTN)
    n = len(cfg["down_block_types"])
    for b in range(n):
        for layer in range(lpb):
            m[f"encoder.down_blocks.{b}.resnets.{layer}"] = (f"encoder.down.{b}.block.{layer}", _VAE_RESNET)
        if b < n - 1:
            m[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = (f"encoder.down.{b}.downsample.conv", {})
    n = len(cfg["up_block_types"])
    for b in range(n):
        u = n - 1 - b
        for layer in range(lpb + 1):
            m[f"decoder.up_blocks.{b}.resnets.{layer}"] = (f"decoder.up.{u}.block.{layer}", _VAE_RESNET)
        if b < n - 1:
            m[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = (f"decoder.up.{u}.upsample.conv", {})
    return m


def rename(key: str, prefixes: Prefixes) -> str:
    """LDM name of one diffusers state-dict key: its longest mapped module prefix is replaced,
    and the module path after it renamed (``norm1`` -> ``in_layers.0``); the last part (weight,
    bias) is kept."""
    parts = key.split(".")
    for k in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:k])
        if head in prefixes:
            ldm, inner = prefixes[head]
            middle = ".".join(parts[k:-1])
            middle = inner.get(middle, middle)
            return ".".join(p for p in (ldm, middle, parts[-1]) if p)
    raise IncompatibleModelsError(f"no LDM name for {key!r}: not an SD-1.x-shaped model")


def to_ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One state dict with the original key names. The VAE's mid-block attention projections
    become the 1x1 convolutions of the original, (C, C) -> (C, C, 1, 1); the text encoder's keys
    are those of transformers' CLIPTextModel (``text_model.encoder.layers.0...``)."""
    out: dict[str, torch.Tensor] = {}
    unet_map, vae_map = unet_prefixes(dict(unet.config)), vae_prefixes(dict(vae.config))
    for key, t in unet.state_dict().items():
        out["model.diffusion_model." + rename(key, unet_map)] = t
    for key, t in vae.state_dict().items():
        if ".mid_block.attentions." in key and t.ndim == 2:
            t = t[:, :, None, None]
        out["first_stage_model." + rename(key, vae_map)] = t
    for key, t in text_encoder.state_dict().items():
        # transformers >= 5.6 dropped CLIPTextModel's `text_model.` wrapper; the original keeps it.
        out["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


# OpenCLIP's names inside one transformer layer, from transformers' CLIP ones.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModelWithProjection` state dict in open_clip's names (the layout of
    SDXL's second text encoder): the q, k, v projections of each layer stacked into
    ``attn.in_proj_weight`` / ``in_proj_bias`` (3 W, W) / (3 W), the projection transposed to
    (W, P)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T,
    }
    sd.pop("embeddings.position_ids", None)  # a buffer, not a weight
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        pre = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{pre}self_attn.{p}_proj.{kind}") for p in "qkv"]
            )
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{theirs}.{kind}"] = sd.pop(f"{pre}{ours}.{kind}")
    if sd:
        raise IncompatibleModelsError(f"no open_clip name for {sorted(sd)[:3]}: not a CLIP text model with projection")
    return out


def to_ldm_sdxl_state_dict(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """One SDXL state dict with the original key names (module docstring)."""
    out = {k: v for k, v in to_ldm_state_dict(unet, vae, text_encoder).items() if not k.startswith("cond_stage_model.")}
    for key, t in text_encoder.state_dict().items():
        out["conditioner.embedders.0.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = t
    for key, t in open_clip_state_dict(text_encoder_2).items():
        out["conditioner.embedders.1.model." + key] = t
    return {k: v.detach().contiguous() for k, v in out.items()}
