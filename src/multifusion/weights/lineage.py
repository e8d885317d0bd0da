"""Whether two models share an ancestor, read from their weights.

A weight merge averages parameters element by element, which means something only between
fine-tunes of one base: networks trained apart from different initialisations hold unrelated
weights (their units need not even line up), and their average denoises to noise. How far two
models' denoisers lie apart tells the two cases apart: the cosine between their whole weight
vectors. Measured on the zoo (denoisers against the shipped `general`): fine-tunes of it 0.97-0.98
(`cartoon`, `toon`, `layout`), a model 1,500 steps apart from a common ancestor 0.81 (`slice0`),
a model trained from scratch 0.26 (`expert`), which is above 0 because normalisation scales start
at 1 in every network. `RELATED_COSINE` sits between.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

RELATED_COSINE = 0.5
"""Below this cosine between two denoisers' weights, the models are taken to share no ancestor."""


def weight_cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The cosine between two state dicts read as one vector each, over the tensors both hold
    with one shape (accumulated in float64, one tensor at a time: no copy of a whole model).
    nan when they share no such tensor or one of them is all zeros."""
    dot = na = nb = 0.0
    for name, x in a.items():
        y = b.get(name)
        if y is None or y.shape != x.shape or not x.is_floating_point():
            continue
        x, y = x.detach().double().flatten(), y.detach().to(x.device).double().flatten()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot / (na * nb) ** 0.5 if na > 0 and nb > 0 else float("nan")


def unrelated(states: list[Mapping[str, torch.Tensor]], threshold: float = RELATED_COSINE) -> list[tuple[int, float]]:
    """(index, cosine) of each state dict after the first whose weights lie further from the
    first's than `threshold` allows (or share no tensor with it): models a merge with the first
    would average without a common ancestor."""
    out = []
    for i, s in enumerate(states[1:], start=1):
        cos = weight_cosine(states[0], s)
        if not cos >= threshold:  # nan (nothing shared) counts as unrelated
            out.append((i, cos))
    return out
