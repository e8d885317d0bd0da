"""What the integration tests compare the methods against, written out by hand: each formula
from the paper or the reference code (cited at each function), in float64, using nothing from
the library's maths modules, so that a wrong constant, centre or order there makes a test fail
instead of agreeing with itself. Also hand-set AFA aggregators whose logits are known.

Tests import it as `handmade`: pytest puts this folder on the import path because it holds the
root conftest.py (and no __init__.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# --------------------------------------------------------------------------- Mixture of Diffusers


def gaussian_profile(n: int, variance: float = 0.01) -> torch.Tensor:
    """(n,) float64: the reference `mixdiff` Gaussian along one side of a region,
    exp(-((x - (n - 1) / 2) / n)^2 / (2 var)) / sqrt(2 pi var) at pixel x = 0..n-1, so the
    peak sits on the middle pixel (between the two middle pixels when n is even)."""
    mid = (n - 1) / 2
    return torch.tensor(
        [math.exp(-(((x - mid) / n) ** 2) / (2 * variance)) / math.sqrt(2 * math.pi * variance) for x in range(n)],
        dtype=torch.float64,
    )


def quartic_profile(n: int) -> torch.Tensor:
    """(n,) float64: the biweight 15/16 (1 - u^2)^2 with u stepping evenly from -0.995 to
    0.995 across the region (the peak value 15/16 for a one-pixel side)."""
    if n == 1:
        return torch.tensor([15 / 16], dtype=torch.float64)
    return torch.tensor([15 / 16 * (1 - (-0.995 + 1.99 * x / (n - 1)) ** 2) ** 2 for x in range(n)], dtype=torch.float64)


def region_weight(h: int, w: int, mask_type: str = "gaussian", mask_weight: float = 1.0) -> torch.Tensor:
    """(h, w) float64 weight of one region: the outer product of its two side profiles (the
    constant profile is all ones) times `mask_weight`."""
    profile = {
        "gaussian": gaussian_profile,
        "quartic": quartic_profile,
        "constant": lambda n: torch.ones(n, dtype=torch.float64),
    }[mask_type]
    return torch.outer(profile(h), profile(w)) * mask_weight


def shares(boxes: Sequence[tuple[int, int, int, int]], weights: Sequence[torch.Tensor], canvas: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) float64: region i's share w_i / sum_j w_j of every latent pixel of the canvas
    (boxes (r0, r1, c0, c1) in latent pixels; Mixture of Diffusers Eq. 2)."""
    padded = torch.zeros(len(boxes), *canvas, dtype=torch.float64)
    for i, ((r0, r1, c0, c1), w) in enumerate(zip(boxes, weights)):
        padded[i, r0:r1, c0:c1] = w
    return padded / padded.sum(0)


def mixed(
    predictions: Sequence[torch.Tensor],
    boxes: Sequence[tuple[int, int, int, int]],
    weights: Sequence[torch.Tensor],
    canvas: tuple[int, int],
) -> torch.Tensor:
    """(B, C, H, W) float64: each region's prediction (B, C, h_i, w_i) placed in its box and
    weighted by its share of each pixel."""
    share = shares(boxes, weights, canvas)
    out = torch.zeros(*predictions[0].shape[:2], *canvas, dtype=torch.float64)
    for s, p, (r0, r1, c0, c1) in zip(share, predictions, boxes):
        out[:, :, r0:r1, c0:c1] += s[r0:r1, c0:c1] * p.double()
    return out


# --------------------------------------------------------------------------- DDIM


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_next: float, clip: bool = False
) -> torch.Tensor:
    """float64 deterministic DDIM step (Song et al. 2021, Eq. 12 with sigma = 0): the clean
    latent x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), re-noised to the next level,
    sqrt(a_next) x0 + sqrt(1 - a_next) eps. `clip` clamps x0 to [-1, 1] first, as diffusers'
    DDIMScheduler does when its config has clip_sample (its default, so a DDIM built from a
    config that does not say otherwise clips)."""
    x0 = (x_t.double() - math.sqrt(1 - alpha_bar_t) * eps.double()) / math.sqrt(alpha_bar_t)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return math.sqrt(alpha_bar_next) * x0 + math.sqrt(1 - alpha_bar_next) * eps.double()


# --------------------------------------------------------------------------- AFA


def set_constant_logits(aggregators: torch.nn.Module, logits: Sequence[float]) -> torch.nn.Module:
    """Make every SABW point of `aggregators` output the same `logits` (one per model) at every
    pixel, as ordinary saved weights: its input convolution ignores the features (weight 0) and
    emits a constant (bias e_0); the resnet's second convolution and the transformer's output
    projection are zeroed, so both pass that constant through their residual paths; the output
    convolution's first column is `logits`. Returns `aggregators`, changed in place."""
    with torch.no_grad():
        for point in aggregators.points:
            point.conv_in.weight.zero_()
            point.conv_in.bias.zero_()
            point.conv_in.bias[0] = 1.0
            for p in (*point.resnet.conv2.parameters(), *point.transformer.proj_out.parameters()):
                p.zero_()
            point.conv_out.weight.zero_()
            point.conv_out.weight[:, 0, 0, 0] = torch.tensor(list(logits), dtype=point.conv_out.weight.dtype)
    return aggregators


ONE_HOT = 1000.0
"""A logit gap whose softmax is exactly one-hot in float32 (exp(-1000) underflows to 0)."""
