"""Mixture of Diffusers: regional prompts on one canvas, combined by smooth weights.

Barbero Jimenez, "Mixture of Diffusers for scene composition and high resolution image
generation", arXiv 2302.02412 (Sec. 3, Eq. 1-2 and Algorithms 1-2).

Each region i is a rectangle of the latent canvas with its own noise function (a model with
its own prompt and guidance). At every step each region's window of x_t is denoised and

    eps = sum_i w_i * pad_i(eps_i) / sum_i w_i

with w_i a weight map over region i (Gaussian, quartic or constant, times `mask_weight`) and
zero outside it; then one scheduler step runs on the whole canvas. Image-guided regions
(Algorithm 2) hold a region to a reference image's latents, noised to the current level with
the canvas' own initial noise, for the first `strength` of the trajectory.

Deviations from the reference code (the `mixdiff` package and diffusers' community
`mixture_tiling` pipeline):
- A region may name any model (or any noise function, e.g. an SNB fusion); regions of one
  model and one window size run as one UNet batch (`tile_batch_size` regions at a time).
- A region is conditioned on its window where the model family has such conditioning: an
  SDXL region as a crop of the canvas (original size = canvas, crop top-left = the region's
  corner, target size = the region's; `multifusion.families.sdxl`), also the models of an SNB
  or average painting a region. diffusers' community SDXL tiling pipeline gives every tile the
  same time ids.
- Pixels no region covers are an error (the reference divides 0 by 0 and zeroes the NaN)
  unless a background region covers the canvas.
- Image-guided latents are noised to the level the latents have *after* the step (the next
  timestep); the reference noises them to the level of the step just taken.
- Any scheduler: initial noise is scaled by `init_noise_sigma` and `eta` / generators reach the
  scheduler through the shared loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from multifusion.handles import Guided, NoiseFn, predict_together
from multifusion.loop import derived_noise

MaskType = Literal["gaussian", "quartic", "constant"]


def gaussian_weights(h: int, w: int, variance: float = 0.01) -> torch.Tensor:
    """(h, w) product of two Gaussians over the region, in coordinates normalised by the
    region's own height and width, centred at the middle pixel, with the given variance:
    g(i) = exp(-((i - (n - 1) / 2) / n)^2 / (2 var)) / sqrt(2 pi var)."""

    def g(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        z = (i - (n - 1) / 2) / n
        return torch.exp(-(z**2) / (2 * variance)) / math.sqrt(2 * math.pi * variance)

    return torch.outer(g(h), g(w)).float()


def quartic_weights(h: int, w: int) -> torch.Tensor:
    """(h, w) product of two quartic (biweight) kernels K(u) = 15/16 (1 - u^2)^2, with u running
    from -0.995 to 0.995 across the region (bounded support, positive on every pixel)."""

    def k(n: int) -> torch.Tensor:
        if n == 1:
            return torch.full((1,), 15 / 16, dtype=torch.float64)
        u = torch.arange(n, dtype=torch.float64) / (n - 1) * 1.99 - 0.995
        return 15 / 16 * (1 - u**2) ** 2

    return torch.outer(k(h), k(w)).float()


def region_weights(h: int, w: int, mask_type: MaskType = "gaussian", mask_weight: float = 1.0) -> torch.Tensor:
    """(h, w) weight map of one region: the named profile times `mask_weight`."""
    if mask_type == "gaussian":
        base = gaussian_weights(h, w)
    elif mask_type == "quartic":
        base = quartic_weights(h, w)
    elif mask_type == "constant":
        base = torch.ones(h, w)
    else:
        raise ValueError(f"mask_type must be 'gaussian', 'quartic' or 'constant', got {mask_type!r}")
    return base * mask_weight


def mix(
    eps_regions: Sequence[torch.Tensor],
    boxes: Sequence[tuple[int, int, int, int]],
    weights: Sequence[torch.Tensor],
    canvas: tuple[int, int],
) -> torch.Tensor:
    """sum_i w_i pad_i(eps_i) / sum_i w_i.

    eps_regions[i] (B, C, r1 - r0, c1 - c0) for boxes[i] = (r0, r1, c0, c1) in latent pixels;
    weights[i] (r1 - r0, c1 - c0); canvas (H, W). Returns (B, C, H, W). Every canvas pixel must
    have positive total weight (callers check coverage up front)."""
    if len(eps_regions) == 1 and tuple(boxes[0]) == (0, canvas[0], 0, canvas[1]):
        return eps_regions[0]  # one region over everything: exactly its prediction
    b, c = eps_regions[0].shape[:2]
    num = eps_regions[0].new_zeros(b, c, *canvas)
    den = eps_regions[0].new_zeros(1, 1, *canvas)
    for eps, (r0, r1, c0, c1), w in zip(eps_regions, boxes, weights):
        w = w.to(eps)
        num[:, :, r0:r1, c0:c1] += w * eps
        den[:, :, r0:r1, c0:c1] += w
    return num / den


def normalised_weights(
    boxes: Sequence[tuple[int, int, int, int]], weights: Sequence[torch.Tensor], canvas: tuple[int, int]
) -> torch.Tensor:
    """(N, H, W) each region's share of every latent pixel, w_i pad_i(1) / sum_j w_j: what `mix`
    gives each region's prediction (columns sum to 1 where any region covers, 0 elsewhere)."""
    total = coverage(boxes, weights, canvas)
    out = torch.zeros(len(boxes), *canvas)
    for k, ((r0, r1, c0, c1), w) in enumerate(zip(boxes, weights)):
        out[k, r0:r1, c0:c1] = w.float()
    return out / total.clamp_min(torch.finfo(torch.float32).tiny)


def coverage(
    boxes: Sequence[tuple[int, int, int, int]], weights: Sequence[torch.Tensor], canvas: tuple[int, int]
) -> torch.Tensor:
    """(H, W) total weight per latent pixel."""
    total = torch.zeros(canvas)
    for (r0, r1, c0, c1), w in zip(boxes, weights):
        total[r0:r1, c0:c1] += w
    return total


@dataclass(eq=False)
class Region:
    """One region of the canvas: a latent box (r0, r1, c0, c1), its noise function and weights."""

    box: tuple[int, int, int, int]
    fn: NoiseFn
    weights: torch.Tensor  # (r1 - r0, c1 - c0)
    name: str = ""  # how pictures label it (e.g. "regions[0]")

    @property
    def size(self) -> tuple[int, int]:
        r0, r1, c0, c1 = self.box
        return r1 - r0, c1 - c0


def tile_batch_for(budget_bytes: float, tile_bytes: int, tiles: int) -> int:
    """The largest number of tiles, 1..`tiles`, whose activations (`tile_bytes` each: a batched
    call's activations grow with its batch) fit in `budget_bytes`; 1 when not even one does (a
    tile has to run)."""
    return max(1, min(tiles, int(budget_bytes // max(tile_bytes, 1))))


@dataclass(eq=False)
class Canvas:
    """Noise function of a regional canvas (see module docstring).

    Regions whose `fn` is a `Guided` model are grouped by model and window size and run
    `tile_batch_size` regions per UNet call; other noise functions run one region at a time.
    `tile_batch_size` may be a function of those groups (each a list of regions, conditioned on
    their windows) returning the batch: the memory rule of `noise.methods` when the recipe sets none.
    A step that records gets `mod/weights` (N, H, W), each region's share of each latent pixel
    (`normalised_weights`, the same every step), and `mod/names`, the regions' names.
    """

    regions: Sequence[Region]
    canvas: tuple[int, int]  # latent (H, W)
    tile_batch_size: int | Callable[[list[list[Region]]], int] = 1
    _groups: list[list[int]] = field(init=False, repr=False)
    _shares: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # Each model conditioned on its own window (SDXL: the crop's micro-conditioning; the
        # same conditioning for families without one, see `ModelHandle.for_window`), also
        # inside combinators that can be (`windowed`: Guided, SNB, Average).
        self.regions = [
            replace(r, fn=r.fn.windowed(r.box, self.canvas)) if hasattr(r.fn, "windowed") else r for r in self.regions
        ]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.regions):
            key = (id(r.fn.handle), r.size) if isinstance(r.fn, Guided) else ("single", i)
            groups.setdefault(key, []).append(i)
        if callable(self.tile_batch_size):
            self.tile_batch_size = self.tile_batch_size([[self.regions[i] for i in g] for g in groups.values() if len(g) > 1])
        k = self.tile_batch_size
        self._groups = [g[j : j + k] for g in groups.values() for j in range(0, len(g), k)]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        eps: list[torch.Tensor | None] = [None] * len(self.regions)
        for group in self._groups:
            crops = [x_t[:, :, r0:r1, c0:c1] for r0, r1, c0, c1 in (self.regions[i].box for i in group)]
            first = self.regions[group[0]].fn
            if isinstance(first, Guided):
                preds = predict_together([self.regions[i].fn for i in group], crops, t)
                for i, p in zip(group, preds):
                    eps[i] = p.eps
            else:
                eps[group[0]] = first(crops[0], t, record)
        if record is not None:
            if self._shares is None:
                self._shares = normalised_weights([r.box for r in self.regions], [r.weights for r in self.regions], self.canvas)
            record["mod/weights"] = self._shares
            record["mod/names"] = [r.name or f"region {i}" for i, r in enumerate(self.regions)]
        return mix(eps, [r.box for r in self.regions], [r.weights for r in self.regions], self.canvas)


@dataclass(eq=False)
class ImageRegion:
    """A reference image's latents (B or 1, C, h, w) held in a latent box for the first
    `strength` of the trajectory (0 = pure noise, 1 = clean)."""

    box: tuple[int, int, int, int]
    latents: torch.Tensor
    strength: float


def hold_image_regions(
    latents: torch.Tensor,
    noise: torch.Tensor,
    regions: Sequence[ImageRegion],
    scheduler,
    t_next: torch.Tensor | None,
    fraction: float,
) -> torch.Tensor:
    """Replace each image region of `latents` (B, C, H, W) whose strength exceeds `fraction` (the
    progress of the step just taken) by its reference latents noised with the canvas' initial
    `noise` to the level of `t_next` (the clean reference when the trajectory has ended)."""
    out = latents
    for reg in regions:
        if fraction >= reg.strength:
            continue
        r0, r1, c0, c1 = reg.box
        ref = reg.latents.to(latents).expand(latents.shape[0], -1, -1, -1)
        if t_next is not None:
            ref = scheduler.add_noise(ref, noise[:, :, r0:r1, c0:c1], t_next.reshape(1).expand(ref.shape[0]))
        if out is latents:
            out = latents.clone()
        out[:, :, r0:r1, c0:c1] = ref
    return out


def reroll(
    noise: torch.Tensor,
    box: tuple[int, int, int, int],
    seed: int,
    image_seeds: Sequence[int],
    mode: Literal["reset", "epsilon"],
    eps: float = 0.0,
) -> torch.Tensor:
    """Initial noise (B, C, H, W) with a box redrawn ("reset") or nudged by `eps` times fresh
    noise ("epsilon"): change one part of an image and keep the rest. Image j's fresh noise comes
    from (seed, image_seeds[j]) alone, so it does not depend on the batch."""
    r0, r1, c0, c1 = box
    fresh = derived_noise((noise.shape[1], r1 - r0, c1 - c0), image_seeds, seed).to(noise)
    out = noise.clone()
    if mode == "reset":
        out[:, :, r0:r1, c0:c1] = fresh
    elif mode == "epsilon":
        out[:, :, r0:r1, c0:c1] += eps * fresh
    else:
        raise ValueError(f"reroll mode must be 'reset' or 'epsilon', got {mode!r}")
    return out
