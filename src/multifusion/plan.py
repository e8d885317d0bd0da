"""Shared types between the registry, the methods and the run: what a method builds.

A method turns a `BuildContext` (loaded models, the recipe, batch and latent sizes) and its
validated `Params` into a `Plan` that the shared loop runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict

from multifusion.handles import Guided, ModelHandle, NoiseFn


class Params(BaseModel):
    """Base of every method's parameters: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Plan:
    """What the shared loop runs: one denoiser per trajectory, an optional latent `meet`
    (`loop.sample`), and an optional `init_noise(noise) -> noise` applied to the unit-variance
    initial noise before sampling."""

    denoise: list[NoiseFn]
    meet: Callable | None = None
    init_noise: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(eq=False)
class BuildContext:
    """What a method may use to build its plan for one batch of images."""

    handles: list[ModelHandle]
    recipe: Any  # multifusion.recipe.Recipe
    seeds: list[int]  # one per image of the batch
    latent_shape: tuple[int, int, int]  # (C, h, w)
    vae_scale_factor: int
    cache: dict[str, Any] = field(default_factory=dict)  # per-run values methods may reuse across batches

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @cached_property
    def guided(self) -> list[Guided]:
        """Each model conditioned on its own prompt, negative prompt and guidance scale."""
        r = self.recipe
        return [
            h.guide(r.prompt_of(i), negative_prompt=r.negative_of(i), guidance_scale=r.guidance_of(i), batch_size=self.batch_size)
            for i, h in enumerate(self.handles)
        ]
