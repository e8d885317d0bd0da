"""MagicFusion: saliency-aware noise blending (SNB).

Zhao, Zheng, Wang, Lan, Yang, "MagicFusion: Boosting Text-to-Image Generation Performance by
Fusing Diffusion Models", ICCV 2023, arXiv 2303.13126 (Sec. 3.2, Eq. 3-5).

At a step inside the fusion window every model i sees the same x_t with its own prompt:

    eps_i = u_i + s_i (c_i - u_i)                          guided prediction
    S_i   = mean_channels(blur(|s_i (c_i - u_i)|))         salience of the guidance response
    M_i   = softmax over all H*W positions of k_i * S_i    sums to one per image
    mask  = onehot(argmax_i M_i)                           per pixel, same for every channel
    eps   = sum_i mask_i * eps_i

Outside the window only the first (base, "general") model runs.

Deviations from the authors' code (ldm/models/diffusion/ddim.py of the MagicFusion release):
- The authors compute the expert's salience against the base model's unconditional
  prediction, s (c_expert - u_general); here each model's map uses its own u_i, as the paper's
  Eq. 3 states, which keeps a model fused with itself equal to that model.
- The authors' box blur is a 4x4 stride-1 average with zero padding followed by a bilinear
  resize back to 64x64; here the box average keeps the size (replicate padding), so no zeros
  dim the borders and any latent size works.
- N >= 2 models (argmax over N maps); an optional soft mask, mask_i proportional to
  M_i ** (1 / temperature), which tends to the hard mask as temperature -> 0.
- Each model encodes its own prompt with its own text encoder (the authors feed both models
  the base model's embeddings).
- Before the window opens only the base model is evaluated (the authors evaluate both).

Beyond the paper (off by default), `gate_by_base`: ``gate="base"`` multiplies every other
model's map by the base model's map rescaled to [0, 1] per image, so an expert can win only
where the base model itself responds; ``gate="region"`` also renormalises the gated map to sum
to one, i.e. the expert's spatial softmax runs over the base's response instead of the whole
image. Without a gate, an expert that was never told where its object goes claims the pixels
where the base responds least (the background) and draws a second object there
(docs/results.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from multifusion.errors import FieldError
from multifusion.handles import Guided, predict_many
from multifusion.schedulers import in_window, timestep_fraction

Blur = Literal["box", "gaussian", "none"]
Gate = Literal["none", "base", "region"]


def blur2d(x: torch.Tensor, kind: Blur = "box", size: int = 4, sigma: float = 1.0) -> torch.Tensor:
    """Same-size spatial blur of (B, C, H, W): a size x size box average, a Gaussian of std
    `sigma` (kernel 2*ceil(2 sigma)+1, separable), or nothing. Borders are replicated."""
    if kind == "none":
        return x
    if kind == "box":
        k = size
        # Even kernels cannot be centred: pad one more on the bottom/right, as 'same' padding does.
        x = F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="replicate")
        return F.avg_pool2d(x, k, stride=1)
    if kind == "gaussian":
        r = math.ceil(2 * sigma)
        taps = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        g = torch.exp(-0.5 * (taps / sigma) ** 2)
        g = g / g.sum()
        c = x.shape[1]
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    raise ValueError(f"must be 'box', 'gaussian' or 'none', got {kind!r}")


def salience(response: torch.Tensor, blur: Blur = "box", size: int = 4, sigma: float = 1.0) -> torch.Tensor:
    """Salience map of a guidance response s (c - u): (B, C, H, W) -> (B, 1, H, W),
    |response| blurred and averaged over latent channels."""
    return blur2d(response.abs(), blur, size, sigma).mean(dim=1, keepdim=True)


def spatial_softmax(s: torch.Tensor, k: float) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H, W): softmax of k * s over all H*W positions of each image."""
    b, _, h, w = s.shape
    return torch.softmax(k * s.reshape(b, h * w), dim=1).reshape(b, 1, h, w)


def gate_by_base(maps: torch.Tensor, renormalise: bool = False) -> torch.Tensor:
    """(N, B, 1, H, W) normalised maps -> (N, B, 1, H, W): map 0 (the base model) unchanged,
    every other map multiplied by g = (M_0 - min M_0) / (max M_0 - min M_0), min and max over
    each image's H*W positions; g = 1 where M_0 is constant over the image (no information, no
    gate). Since 0 <= g <= 1 a gated model never gains pixels under `blend_mask`; where the base
    responds least (g = 0) the base always wins. With `renormalise`, each gated map is divided
    by its sum over H*W (so it sums to one again, as a spatial softmax over the base's response
    would): the gated model still never wins where g = 0, but gains where the base responds."""
    base = maps[0]
    lo = base.amin(dim=(-2, -1), keepdim=True)
    span = base.amax(dim=(-2, -1), keepdim=True) - lo  # (B, 1, 1, 1)
    g = torch.where(span > 0, (base - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(base))
    gated = maps[1:] * g  # (N - 1, B, 1, H, W)
    if renormalise:
        total = gated.sum(dim=(-2, -1), keepdim=True)
        gated = gated / torch.where(total > 0, total, torch.ones_like(total))  # a map gated to zero stays zero
    return torch.cat([maps[:1], gated])


def blend_mask(maps: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """(N, B, 1, H, W) normalised maps -> (N, B, 1, H, W) mask over models, summing to one at
    every pixel: one-hot argmax (the paper), or M_i^(1/T) / sum_j M_j^(1/T) for temperature T."""
    if temperature is None:
        return F.one_hot(maps.argmax(dim=0), maps.shape[0]).movedim(-1, 0).to(maps.dtype)
    return torch.softmax(torch.log(maps.clamp_min(torch.finfo(maps.dtype).tiny)) / temperature, dim=0)


def blend(eps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """eps (N, B, C, H, W), mask (N, B, 1, H, W) -> (B, C, H, W): per-pixel mixture, the same
    for every channel. A one-hot mask picks values exactly (no arithmetic on the chosen eps)."""
    if torch.all((mask == 0) | (mask == 1)):
        index = mask.argmax(dim=0, keepdim=True).expand(1, *eps.shape[1:])  # (1, B, C, H, W)
        return torch.gather(eps, 0, index)[0]
    return (mask * eps).sum(dim=0)


def check_arguments(
    n_models: int | None,
    k: Sequence[float],
    window: tuple[float, float],
    temperature: float | None,
    blur: str,
    blur_size: int,
    blur_sigma: float,
    gate: str = "none",
) -> None:
    """Every check of SNB's arguments, in one place (the recipe's params and the combinator
    built directly both run it); FieldError (a ValueError) naming the argument."""
    if n_models is not None and n_models < 2:
        raise FieldError("models", f"fuses at least two models, got {n_models}")
    if n_models is not None and len(k) != n_models:
        raise FieldError("k", f"has {len(k)} entries for {n_models} models; give one k per model or a single number")
    if any(not x > 0 for x in k):
        raise FieldError("k", f"must all be > 0 (got {list(k)}); k scales the salience before the spatial softmax")
    if not 0.0 <= window[0] <= window[1] <= 1.0:
        raise FieldError(
            "window", f"must be [start, end] with 0 <= start <= end <= 1 (0 = pure noise, 1 = clean), got {list(window)}"
        )
    if temperature is not None and not temperature > 0:
        raise FieldError("temperature", f"must be > 0 (or None for the hard argmax mask), got {temperature}")
    if blur not in ("box", "gaussian", "none"):
        raise FieldError("blur", f"must be 'box', 'gaussian' or 'none', got {blur!r}")
    if blur_size < 1:
        raise FieldError("blur_size", f"must be >= 1, got {blur_size}")
    if not blur_sigma > 0:
        raise FieldError("blur_sigma", f"must be > 0, got {blur_sigma}")
    if gate not in ("none", "base", "region"):
        raise FieldError("gate", f"must be 'none' (the paper's method), 'base' or 'region', got {gate!r}")


def check_blur_fits(blur: str, blur_size: int, blur_sigma: float, latent_hw: tuple[int, int]) -> None:
    """FieldError when the blur kernel is wider than the latent (h, w)."""
    h, w = latent_hw
    if blur == "box" and blur_size > min(h, w):
        raise FieldError("blur_size", f"{blur_size} is larger than the latent ({h}x{w}); use at most {min(h, w)} or blur 'none'")
    if blur == "gaussian" and 2 * math.ceil(2 * blur_sigma) + 1 > min(h, w):
        raise FieldError("blur_sigma", f"a Gaussian of std {blur_sigma} is wider than the latent ({h}x{w})")


@dataclass(eq=False)
class SNB:
    """Noise function blending guided models by salience (see module docstring).

    `window` is [start, end) on the trajectory axis, 0 = pure noise, 1 = clean (closed at 1);
    the paper's "late" fusion for t <= t_s is [1 - t_s / (T - 1), 1], the authors' "early"
    option, t > t_s, is [0, 1 - t_s / (T - 1)). `gate` "base" / "region" applies `gate_by_base`
    (without / with renormalising) to the maps before the mask. `record` receives `snb/maps` (before any gate) and `snb/mask` (N, B, 1, H, W).
    """

    guided: Sequence[Guided]
    k: Sequence[float]
    blur: Blur = "box"
    blur_size: int = 4
    blur_sigma: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    temperature: float | None = None
    gate: Gate = "none"

    def __post_init__(self):
        check_arguments(
            len(self.guided), self.k, self.window, self.temperature, self.blur, self.blur_size, self.blur_sigma, self.gate
        )
        self.num_train_timesteps = len(self.guided[0].handle.alphas_cumprod)

    def windowed(self, box: tuple[int, int, int, int], canvas: tuple[int, int]) -> SNB:
        """This blend with every model conditioned on the latent window `box` of a canvas (a
        Mixture-of-Diffusers region; see `ModelHandle.for_window`)."""
        return dataclasses.replace(self, guided=[g.windowed(box, canvas) for g in self.guided])

    def active(self, t: torch.Tensor) -> bool:
        return in_window(timestep_fraction(t, self.num_train_timesteps), self.window)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        if not self.active(t):
            return self.guided[0](x_t, t, record)
        check_blur_fits(self.blur, self.blur_size, self.blur_sigma, tuple(x_t.shape[-2:]))
        preds = predict_many(self.guided, x_t, t, need_uncond=True)  # models of one base in one call
        maps = torch.stack(
            [spatial_softmax(salience(p.response, self.blur, self.blur_size, self.blur_sigma), k) for p, k in zip(preds, self.k)]
        )  # (N, B, 1, H, W)
        gated = maps if self.gate == "none" else gate_by_base(maps, renormalise=self.gate == "region")
        mask = blend_mask(gated, self.temperature)
        if record is not None:
            record["snb/maps"] = maps
            record["snb/mask"] = mask
        return blend(torch.stack([p.eps for p in preds]), mask)
