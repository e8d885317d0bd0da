"""Weight merges as pure tensor maths: weighted sum, add-difference, block-weighted.

The static baselines of the AFA paper ("Ensembling Diffusion Models via Adaptive Feature
Aggregation", arXiv 2405.17082, Sec. 5: weighted merging and merge-block-weighted) and what
A1111's checkpoint merger, SuperMerger, merge-block-weighted, ComfyUI's ModelMerge nodes and
sd-mecha (`weighted_sum`, `add_difference`) compute, one parameter tensor at a time:

    weighted sum     sum_i w_i theta_i / sum_i w_i        (A1111: (1 - M) A + M B)
    add difference   A + alpha (B - C)                    (A1111 "Add difference")
    block weighted   either of the above with its weight picked per parameter from the
                     block that holds it (A1111 MBW notation, `multifusion.families.blocks`)

Tensors of any shape; the arithmetic runs in float32 (float64 stays float64) and the result
takes the first tensor's dtype, so half-precision checkpoints merge without half-precision
rounding in between. Degenerate cases are exact: terms with weight 0 are skipped, so weights
(1, 0) return the first tensor bit for bit, and so does add-difference with alpha 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from multifusion.errors import RecipeError
from multifusion.recipe import weights_problem


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i: weight i belongs to tensor i; weights are normalised.

    Weights must be finite and >= 0 with a positive sum (a merge interpolates; use
    add-difference to extrapolate)."""
    if len(tensors) != len(weights):
        raise RecipeError(f"{len(weights)} weights for {len(tensors)} models; give one weight per model")
    check_weights(weights)
    total = float(sum(weights))
    terms = [(w / total, t) for w, t in zip(weights, tensors) if w != 0]
    if len(terms) == 1:
        return terms[0][1].to(tensors[0].dtype)
    out = _work(terms[0][1]).mul(terms[0][0])  # a new tensor: inputs may be read-only file maps
    for w, t in terms[1:]:
        out.add_(_work(t), alpha=w)  # in place: one buffer per parameter, whatever N
    return out.to(tensors[0].dtype)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    """a + alpha (b - c): the difference a fine-tune (b) made to its base (c), added to a.
    Any finite alpha (negative subtracts the difference)."""
    if not math.isfinite(alpha):
        raise RecipeError(f"add-difference alpha {alpha!r} is not a finite number")
    if alpha == 0:
        return a
    return (_work(a) + alpha * (_work(b) - _work(c))).to(a.dtype)


def check_weights(weights: Sequence[float]) -> None:
    """Weighted-sum weights: finite, not negative, a positive and finite sum (`recipe.weights_problem`,
    the rule `average` follows too); RecipeError quoting the value."""
    problem = weights_problem(weights)
    if problem:
        raise RecipeError(problem)


def merge_tensor(tensors: Sequence[torch.Tensor], method: str, weight: float | Sequence[float]) -> torch.Tensor:
    """One parameter merged by `method`: "weighted_sum" with one weight per tensor, or with a
    single block weight w between two tensors ((1 - w) A + w B); "add_difference" of (A, B, C)
    with alpha `weight`."""
    if method == "add_difference":
        return add_difference(*tensors, float(weight))
    if isinstance(weight, (int, float)):
        return weighted_sum(tensors, (1.0 - weight, float(weight)))
    return weighted_sum(tensors, weight)


def block_weighted(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    block_of: Callable[[str], str],
    block_weights: Mapping[str, float],
    method: str = "weighted_sum",
) -> dict[str, torch.Tensor]:
    """Merge-block-weighted: every parameter k merged by `method` with the weight of its block,
    `block_weights[block_of(k)]`: two state dicts for a weighted sum ((1 - w) A + w B), three
    for add-difference (A + w (B - C)). Keys are the first state dict's."""
    return {k: merge_tensor([sd[k] for sd in state_dicts], method, block_weights[block_of(k)]) for k in state_dicts[0]}
