"""What a method is, and the two steps in which it runs: `prepare` once per run, `plan` per batch.

    recipe --validate--> params --load--> RunContext --prepare--> prepared --plan(batch)--> Plan
                                                                               --> loop.sample

- `prepare(ctx, params)` runs once per run, after the models load: place regions, encode
  reference images, build ensembles, load trained parts. What it returns is the method's own.
- `plan(prepared, batch)` runs per batch of images: one `Trajectory` per latent trajectory
  (usually one), an optional `meet` after each step, and which trajectory is the image.

Methods register themselves in their package's `methods.py` (see `multifusion.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from multifusion.errors import RecipeError, format_validation_error
from multifusion.handles import Guided, ModelHandle
from multifusion.loop import Meet, Step, Trajectory
from multifusion.recipe import Recipe


class Params(BaseModel):
    """Base of every method's parameters: frozen, unknown fields rejected, every float (at any
    depth: lists, tuples, nested models) finite. Validators see the number of models as
    `info.context["n_models"]` (see `Method.parse_params`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


P = TypeVar("P", bound=Params)

SAMPLING_KEYS = ("num_inference_steps", "scheduler", "seed", "num_images", "height", "width", "eta")
RUN_KEYS = ("runtime", "batch_size", "callback", "progress")
RESERVED = frozenset(
    SAMPLING_KEYS + RUN_KEYS + ("method", "models", "prompts", "negative_prompt", "guidance_scale", "true_cfg_scale", "devices")
)
"""Keywords of `multifusion.fuse` that are not method parameters: no method may take these names."""


@dataclass(frozen=True)
class Batch:
    """One batch of images: their seeds, their index in the run (for per-image prompts), and the
    unit-variance initial noise (B, C, h, w) drawn from the seeds' generators."""

    seeds: list[int]
    indices: list[int]
    noise: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.seeds)


@dataclass
class Plan:
    """What the shared loop runs for one batch. `trajectories[k].scheduler` / `.noise` left None
    get a fresh scheduler of the recipe's kind (the first model's schedule) and the batch's
    noise; `output` names the trajectory whose final latents are the images."""

    trajectories: list[Trajectory]
    meet: Meet | None = None
    output: int = 0


@dataclass(eq=False)
class RunContext:
    """What a method may use when it prepares a run: the loaded models, the recipe, sizes, and
    each model's conditioning (text encoded once per distinct batch of prompts)."""

    handles: list[ModelHandle]
    recipe: Recipe
    latent_shape: tuple[int, int, int]  # (C, h, w)
    vae_scale_factor: int
    _guided: dict[tuple, Guided] = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.recipe.models]

    @property
    def canvas_px(self) -> tuple[int, int]:
        return self.latent_shape[1] * self.vae_scale_factor, self.latent_shape[2] * self.vae_scale_factor

    def guide(
        self,
        i: int,
        prompts: Sequence[str],
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        handle: ModelHandle | None = None,
    ) -> Guided:
        """Model i conditioned on one prompt per image (negative prompt and guidance default to
        the recipe's for that model), or `handle` (a model the method built, e.g. a merge)
        conditioned as recipe model i is. Encoded once per run for each distinct batch of prompts."""
        handle = self.handles[i] if handle is None else handle
        neg = self.recipe.negative_of(i) if negative_prompt is None else negative_prompt
        scale = self.recipe.guidance_of(i) if guidance_scale is None else guidance_scale
        key = (id(handle), tuple(prompts), neg, scale)
        if key not in self._guided:
            self._guided[key] = handle.guide(list(prompts), negative_prompt=neg, guidance_scale=scale)
        return self._guided[key]

    def guided(self, batch: Batch) -> list[Guided]:
        """Every model conditioned on its own recipe prompt for the images of `batch`."""
        return [self.guide(i, self.recipe.prompts_of(i, batch.indices)) for i in range(len(self.handles))]


@dataclass(frozen=True)
class Prepared(Generic[P]):
    """What `prepare` returns for methods with nothing to prepare."""

    ctx: RunContext
    params: P


def prepare_nothing(ctx: RunContext, params: P) -> Prepared[P]:
    return Prepared(ctx, params)


class Recorder(Protocol):
    """A method's step pictures (`multifusion.viz` has the built-in ones): a step callback
    keeping what the method puts in `Step.record`, then `save` writing the pictures of batch
    image `image` beside `stem` (`{stem}-masks.png`, ...) and returning their paths ([] when
    nothing was recorded)."""

    def __call__(self, step: Step) -> None: ...

    def save(self, stem: str | Path, image: int = 0, model_names: list[str] | None = None) -> list[Path]: ...


def no_recorders(vae: Any) -> list[Recorder]:
    return []


@dataclass(frozen=True)
class Method:
    """A method, named once and found by name. See the module docstring for the two steps."""

    name: str
    summary: str
    meets: str  # "noise" | "latents" | "features" | "weights": where the models meet
    params: type[Params]
    plan: Callable[[Any, Batch], Plan]
    prepare: Callable[[RunContext, Any], Any] = prepare_nothing
    min_models: int = 1
    max_models: int | None = None
    model_prompts: bool = True  # every model needs a prompt (False: the params carry prompts)
    # check(params, canvas_px (H, W), vae_factor, model labels): what needs the canvas size;
    # run before loading when the first model's config is local, else after loading
    check: Callable[[Any, tuple[int, int], int, list[str]], None] | None = None
    # canvas(params) -> (H, W) in pixels when the method fixes the canvas size itself
    canvas: Callable[[Any], tuple[int, int] | None] | None = None
    # regions(params, canvas_px (H, W), vae_factor) -> [(where, latent box (r0, r1, c0, c1), weights
    # (h, w))]: the denoising regions the method places, as its run mixes them (the UI's canvas
    # draws them and counts coverage from them)
    regions: Callable[[Any, tuple[int, int], int], list[tuple[str, tuple[int, int, int, int], torch.Tensor]]] | None = None
    # recorders(vae) -> fresh `Recorder`s of the pictures the method draws, one set per batch (what
    # `--export-masks` and the UI write); `vae` decodes latents for those that show images
    recorders: Callable[[Any], list[Recorder]] = no_recorders
    # Why the method needs each model's own denoiser weights, when it does (AFA walks the
    # denoisers side by side, merges read their tensors): models on a shared base differing in
    # LoRAs (`multifusion.lora`) are then refused with this reason, before loading. "" = any model.
    own_denoisers: str = ""
    # The role of each LoRA every model must carry, in order (k-lora: subject, style); () = any LoRAs.
    lora_roles: tuple[str, ...] = ()

    def __post_init__(self):
        clash = RESERVED & set(self.params.model_fields)
        if clash:
            raise ValueError(f"method {self.name!r}: parameter(s) {sorted(clash)} clash with the API's own keywords; rename them")
        if self.meets not in ("noise", "latents", "features", "weights"):
            raise ValueError(f"method {self.name!r}: meets must be noise, latents, features or weights, got {self.meets!r}")
        if not self.name or not self.name.replace("-", "_").isidentifier():
            raise ValueError(f"method name {self.name!r} must be a word (letters, digits, _ or -)")

    def lora_problem(self, count: int) -> str:
        """Why a model with `count` LoRAs cannot run this method when it names the LoRAs' roles, or ""."""
        roles = self.lora_roles
        if not roles or count == len(roles):
            return ""
        return (
            f"method {self.name!r} takes exactly {len(roles)} LoRAs per model, in this order: {', '.join(roles)}; "
            f"the model has {count}"
        )

    def parse_params(self, raw: dict, n_models: int, **context: Any) -> Params:
        """The recipe's `params` validated for `n_models` models; RecipeError naming each field.
        Validators see `n_models` and `context` (from a recipe: `labels`, the models' names,
        `models`, their references, and `num_inference_steps`) in `info.context`."""
        try:
            return self.params.model_validate(raw, context={"n_models": n_models, **context})
        except ValidationError as err:

            def unknown(loc: list) -> str:
                top = "" if len(loc) > 1 else f" (it takes: {', '.join(self.params.model_fields) or 'none'})"
                return f"unknown parameter of method {self.name!r}{top}"

            raise RecipeError(format_validation_error(err, "params", unknown)) from None
