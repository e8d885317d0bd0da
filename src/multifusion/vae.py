"""The VAE edge: latents to images and back, tiled for large canvases, as diffusers'
StableDiffusionPipeline does it (scaling factor, [-1, 1] <-> [0, 1], rounding to 8 bits)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _tiling(vae: torch.nn.Module, area_px: int, tiled: bool | None):
    """Switch diffusers' VAE tiling on for the block (default: when the image has more than 4x
    the VAE's native area), so memory stays near one tile's for large canvases; seams are
    blended by diffusers, and results differ slightly from a whole pass."""
    native = int(getattr(vae.config, "sample_size", 0) or 0)
    if tiled is None:
        tiled = native > 0 and area_px > 4 * native * native
    previous = getattr(vae, "use_tiling", False)
    if hasattr(vae, "use_tiling"):
        vae.use_tiling = bool(tiled)
    try:
        yield
    finally:
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = previous


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1]: divide by the VAE scaling
    factor (and add the shift factor of VAEs that have one, SD3's and FLUX's), decode, map
    [-1, 1] to [0, 1]; one image at a time, on the VAE's device."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    with _tiling(vae, latents.shape[-2] * latents.shape[-1] * f * f, tiled):
        images = [
            vae.decode(x[None].to(param.device, param.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
            for x in latents
        ]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def encode(vae: torch.nn.Module, image: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) float32 on the CPU: the
    posterior mean less the VAE's shift factor (if any) times the scaling factor (the mean, not a
    sample, so it is the same for every seed), on the VAE's device; tiled for large images, as
    `decode` is."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    with _tiling(vae, image.shape[-2] * image.shape[-1], tiled):
        mean = vae.encode(image.to(param.device, param.dtype)).latent_dist.mean
    return (mean.float().cpu() - shift) * vae.config.scaling_factor


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' image processor does."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
