"""Model families: the one place where SD 1/2, SDXL, SD3 and FLUX differ.

A family is one module holding one `ModelHandle` subclass (`multifusion.handles`), which answers
every question the rest of the package asks about a model:

    how to condition and call the denoiser    encode_prompt, encode_negative, eps, denoiser_kwargs,
                                              for_window, guide, ready_vae
    its facts, read from configs              config_facts, schedule_table, prediction_space, patch
    what it supports                          takes_true_cfg, takes_eta, single_file, check_steps,
                                              scheduler (its samplers)
    how it is trained                         noised, raw_prediction
    how it is merged                          block_layout (merge block ids), ldm_state_dict
                                              (single-file key names)
    how it loads                              pipeline_class, pipeline_parts, load_kwargs,
                                              components, denoiser_folder

    sd.py     Stable Diffusion 1.x/2.x (`SDHandle`)
    sdxl.py   SDXL (`SDXLHandle`, an SDHandle with two encoders and micro-conditioning)
    sd3.py    Stable Diffusion 3 / 3.5 (`SD3Handle`)
    flux.py   FLUX.1 (`FluxHandle`)
    flowmatch.py  what SD3 and FLUX share: velocity, the flow-matching schedule (`FlowHandle`)
    blocks.py, ldm.py  the UNet block ids and the LDM key renames SD and SDXL share

This module keeps the registry (`FAMILIES`, by the diffusers pipeline class in a folder's
model_index.json) and the one compatibility check, run on `ModelFacts` read from configs before
loading and taken from the loaded handles after. A new family is one module whose handle class
is added to `FAMILIES`, and its tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multifusion.errors import IncompatibleModelsError
from multifusion.families.flux import FluxHandle
from multifusion.families.sd import SDHandle
from multifusion.families.sd3 import SD3Handle
from multifusion.families.sdxl import SDXLHandle
from multifusion.handles import ModelHandle

FAMILIES: dict[str, type[ModelHandle]] = {h.pipeline_class: h for h in (SDHandle, SDXLHandle, SD3Handle, FluxHandle)}
"""Handle classes by the diffusers pipeline class they are built from."""

DEFAULT_FAMILY = SDHandle
"""The family of a model whose pipeline class is not known before loading (a Hub id, a single
file without its config folder): diffusers' StableDiffusionPipeline reads it."""

REFUSED = {"StableDiffusionXLImg2ImgPipeline": "the SDXL refiner refines images and is not supported"}


def family_named(pipeline_class: str | None, what: str) -> type[ModelHandle]:
    """The family of a pipeline class (None: `DEFAULT_FAMILY`); IncompatibleModelsError naming
    `what` (the model) for a pipeline no family handles."""
    if pipeline_class is None:
        return DEFAULT_FAMILY
    if pipeline_class not in FAMILIES:
        why = f" ({REFUSED[pipeline_class]})" if pipeline_class in REFUSED else ""
        raise IncompatibleModelsError(
            f"{what} is a {pipeline_class}{why}; the models that can be combined are: " + ", ".join(sorted(FAMILIES))
        )
    return FAMILIES[pipeline_class]


@dataclass(frozen=True)
class ModelFacts:
    """What decides whether models can meet at noise or latent level: their family (and so the
    space their trajectories run in), latent space (channels, VAE factor, scaling and shift) and
    noise schedule. Read from configs before loading (`facts_from_configs`) and from a loaded
    handle (`facts_of`), so one check (`check_compatible`) serves both."""

    family: type[ModelHandle]
    latent_channels: int
    vae_scale_factor: int
    patch_px: int  # the pixel grid of canvas sizes and region boxes
    native_px: int  # the default canvas side
    scaling_factor: float
    shift_factor: float = 0.0
    scheduler: Mapping[str, Any] | None = None  # scheduler_config.json, None when not read

    @property
    def name(self) -> str:
        return self.family.family_name

    @property
    def alphas_cumprod(self) -> torch.Tensor | None:
        return None if self.scheduler is None else self.family.schedule_table(self.scheduler)


def vae_factor(vae_config: Mapping[str, Any]) -> int:
    """A VAE's downsampling factor from its config (a dict or a diffusers config)."""
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def facts_from_configs(
    family: type[ModelHandle], denoiser: Mapping[str, Any], vae: Mapping[str, Any], scheduler: Mapping[str, Any] | None
) -> ModelFacts:
    """A model's facts from its denoiser's, VAE's and scheduler's config.json, before loading."""
    channels, patch, native = family.config_facts(denoiser)
    factor = vae_factor(vae)
    return ModelFacts(
        family,
        channels,
        factor,
        factor * patch,
        factor * native,
        float(vae.get("scaling_factor", 0.18215)),  # diffusers' default
        float(vae.get("shift_factor") or 0.0),
        scheduler,
    )


def facts_of(handle: ModelHandle) -> ModelFacts:
    """A loaded model's facts."""
    return ModelFacts(
        type(handle),
        handle.latent_channels,
        handle.vae_scale_factor,
        handle.patch_px,
        handle.native_px,
        handle.scaling_factor,
        handle.shift_factor,
        dict(handle.scheduler_config),
    )


def check_compatible(facts: Sequence[tuple[str, ModelFacts]], field: str = "{}") -> None:
    """IncompatibleModelsError unless every model (label, facts) can meet the first at noise and
    latent level: one prediction space (and one family where it is velocity: flow-matching
    models of two families have different VAEs and schedules), latent channels, VAE factor,
    scaling and shift, and noise schedule. The message starts with `field` filled with the
    model's label (validation: "models[1]" -> "models[1].model"), names both models and, where
    their families differ, says so."""
    (first, a), *rest = facts
    for label, b in rest:
        where = field.format(label)
        spaces = a.family.prediction_space, b.family.prediction_space
        if spaces[0] != spaces[1] or ("velocity" in spaces and b.family is not a.family):
            predict = f", and they predict {spaces[1]} vs {spaces[0]}" if spaces[0] != spaces[1] else ""
            raise IncompatibleModelsError(
                f"{where}: a {b.name} model cannot meet {first}, a {a.name} model: they live in different latent spaces (their "
                f"VAEs) on different noise schedules{predict}; fuse models of one family"
            )
        kinds = f"{label} is {b.name} and {first} {a.name}: " if b.family is not a.family else ""
        pairs = [
            ("latent channels", b.latent_channels, a.latent_channels),
            ("VAE downsampling factor", b.vae_scale_factor, a.vae_scale_factor),
            ("VAE scaling_factor", round(b.scaling_factor, 6), round(a.scaling_factor, 6)),
            ("VAE shift_factor", round(b.shift_factor, 6), round(a.shift_factor, 6)),
        ]
        for what, mine, theirs in pairs:
            if mine != theirs:
                raise IncompatibleModelsError(
                    f"{where}: {kinds}their VAEs encode different latent spaces ({what} {mine} vs {theirs}), so their noise and "
                    "latents cannot meet; fuse models of one base (same VAE and schedule)"
                )
        table_a, table_b = a.alphas_cumprod, b.alphas_cumprod
        if (
            table_a is not None
            and table_b is not None
            and (len(table_a) != len(table_b) or not torch.allclose(table_a, table_b, atol=1e-6))
        ):
            raise IncompatibleModelsError(
                f"{where}: {kinds}its noise schedule differs from {first}'s (num_train_timesteps {len(table_b)} vs {len(table_a)}, "
                "or the betas): a timestep would mean different noise levels for them; fuse models of one base (same VAE and "
                "schedule)"
            )


def check_same_schedule(facts: Sequence[tuple[str, ModelFacts]], why: str, field: str = "{}") -> None:
    """For methods whose models meet after each of their own scheduler steps (AMDM; `why` says
    so): the schedules must agree where the family's steps depend on more than the betas that
    `check_compatible` compares (a flow-matching schedule's shift sets where each step lands),
    or the trajectories meet at different noise levels. Labels and `field` as in
    `check_compatible`."""
    facts = [(label, f) for label, f in facts if f.scheduler is not None]
    for label, f in facts[1:]:
        first, a = facts[0]
        diff = f.family.schedule_difference(a.scheduler, f.scheduler)
        if diff:
            raise IncompatibleModelsError(
                f"{field.format(label)}: its schedule differs from {first}'s ({diff} in scheduler_config.json), so {why}, their latents "
                "would meet at different noise levels; use models of one base (one scheduler config)"
            )


def check_same_latent_space(handles: Sequence[ModelHandle]) -> None:
    """`check_compatible` on loaded models, named "model 'NAME'"."""
    check_compatible([(f"model {h.name!r}", facts_of(h)) for h in handles])
