"""Weighted average of guided noise predictions.

The "weighted sum" baseline of MagicFusion (Zhao et al., ICCV 2023, arXiv 2303.13126, Sec. 4)
and the across-models form of Composable Diffusion (Liu et al., ECCV 2022, arXiv 2206.01714,
Eq. 11 with each concept's guided prediction from its own model): every model sees the same
x_t with its own prompt and guidance scale, and the predictions are averaged with fixed weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from multifusion.handles import NoiseFn, call_all


def weighted_average(eps: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i eps_i / sum_i w_i, eps_i (B, C, H, W) in eps space.

    Weights are normalised first, so one model (or all weight on one model) returns its
    prediction exactly (w = 1.0), and equal weights on identical predictions return them exactly.
    """
    total = float(sum(weights))
    if total == 0:
        raise ValueError("weights sum to zero; the average is undefined")
    out = (weights[0] / total) * eps[0]
    for w, e in zip(weights[1:], eps[1:]):
        if w != 0:
            out = out + (w / total) * e
    return out


@dataclass(eq=False)
class Average:
    """Noise function averaging `fns` with `weights` (one weight per function)."""

    fns: Sequence[NoiseFn]
    weights: Sequence[float]

    def __post_init__(self):
        if len(self.fns) != len(self.weights):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.fns)} models; give one weight per model")

    def windowed(self, box: tuple[int, int, int, int], canvas: tuple[int, int]) -> Average:
        """This average with each function that can be conditioned on the latent window `box`
        of a canvas conditioned so (a Mixture-of-Diffusers region; see `ModelHandle.for_window`)."""
        fns = [f.windowed(box, canvas) if hasattr(f, "windowed") else f for f in self.fns]
        return Average(fns, self.weights)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        # Models with zero weight are not called at all; LoRA models of one base share calls (`call_all`).
        pairs = [(f, w) for f, w in zip(self.fns, self.weights) if w != 0]
        return weighted_average(call_all([f for f, _ in pairs], x_t, t, record), [w for _, w in pairs])
