"""The noise-level methods as the registry sees them: parameters, checks, prepare and plan.

The maths lives in `average.py`, `snb.py` and `regions.py`; this module only validates
parameters (errors name the recipe field) and wires models to combiners.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from multifusion.canvas import Box, check_box_on_patch_grid, check_covered
from multifusion.errors import FieldError, RecipeError
from multifusion.io import image_is_whole, read_rgb_image
from multifusion.loop import Step, Trajectory
from multifusion.memory import RESERVE, GiB, activations_per_input, free_bytes
from multifusion.method import Batch, Method, Params, Plan, Prepared, Recorder, RunContext
from multifusion.noise.average import Average
from multifusion.noise.multilora import Switch
from multifusion.noise.regions import (
    Canvas,
    ImageRegion,
    Region,
    coverage,
    hold_image_regions,
    region_weights,
    reroll,
    tile_batch_for,
)
from multifusion.noise.snb import SNB, check_arguments, check_blur_fits
from multifusion.recipe import Runtime, weights_problem
from multifusion.schedulers import timestep_fraction
from multifusion.vae import encode
from multifusion.viz import MaskRecorder, RegionWeightRecorder

# --------------------------------------------------------------------------- single, average


class NoParams(Params):
    pass


def plan_single(prep: Prepared[NoParams], batch: Batch) -> Plan:
    return Plan([Trajectory(prep.ctx.guided(batch)[0])])


class AverageParams(Params):
    weights: list[float] | None = Field(None, description="one weight per model; default: equal")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None, info: ValidationInfo):
        n = (info.context or {}).get("n_models")
        if v is None:
            return v
        if n is not None and len(v) != n:
            raise ValueError(f"has {len(v)} entries for {n} models; give one weight per model, in the order of `models`")
        problem = weights_problem(v)  # the rule a merge's weighted sum follows too
        if problem:
            raise ValueError(problem)
        return v


def plan_average(prep: Prepared[AverageParams], batch: Batch) -> Plan:
    guided = prep.ctx.guided(batch)
    return Plan([Trajectory(Average(guided, prep.params.weights or [1.0] * len(guided)))])


# --------------------------------------------------------------------------- LoRA Switch, LoRA Composite


class SwitchParams(Params):
    tau: int = Field(
        5, ge=1, strict=True, description="steps each model keeps its turn before the next takes over (the paper's tau)"
    )
    order: list[int | str] | None = Field(
        None, description="the models in the order they take turns (indices or names), each once; default: the recipe's order"
    )

    @field_validator("order")
    @classmethod
    def _order(cls, v: list[int | str] | None, info: ValidationInfo):
        context = info.context or {}
        if v is not None and context.get("n_models") is not None:
            turn_order(v, context["n_models"], context.get("labels"))
        return v


def turn_order(order: list[int | str] | None, n: int, labels: list[str] | None) -> list[int]:
    """`order` as model indices, every one of the n models exactly once (ValueError saying which
    entry is wrong, or which model is missing, otherwise); None is the recipe's order. Names
    need `labels` (the models' names); without them only indices are checked."""
    if order is None:
        return list(range(n))
    out = []
    for j, m in enumerate(order):
        if isinstance(m, int):
            if not 0 <= m < n:
                raise ValueError(f"entry {j} is index {m} but the recipe has {n} model(s) (indices 0..{n - 1})")
            out.append(m)
        elif labels is None:
            return list(range(n))  # names are resolved once the models' names are known (`prepare_switch`)
        elif labels.count(m) != 1:
            found = "names two models; give indices, or give the models distinct `name`s" if m in labels else "names no model"
            raise ValueError(f"entry {j} ({m!r}) {found} (names: {', '.join(labels)})")
        else:
            out.append(labels.index(m))
    repeated = sorted({i for i in out if out.count(i) > 1})
    if repeated:
        raise ValueError(f"model {repeated[0]} takes two turns; list every model exactly once")
    missing = sorted(set(range(n)) - set(out))
    if missing:
        who = f" ({labels[missing[0]]!r})" if labels else ""
        raise ValueError(f"model {missing[0]}{who} is missing; list every model exactly once (or leave `order` out)")
    return out


def prepare_switch(ctx: RunContext, params: SwitchParams) -> Prepared[SwitchParams]:
    try:
        turn_order(params.order, len(ctx.handles), ctx.labels)
    except ValueError as err:
        raise RecipeError(f"params.order: {err}") from None
    return Prepared(ctx, params)


def plan_switch(prep: Prepared[SwitchParams], batch: Batch) -> Plan:
    guided = prep.ctx.guided(batch)
    # A fresh Switch per batch: it counts the steps of its one sampling run.
    return Plan([Trajectory(Switch(guided, prep.params.tau, turn_order(prep.params.order, len(guided), prep.ctx.labels)))])


def plan_composite(prep: Prepared[NoParams], batch: Batch) -> Plan:
    # LoRA Composite is the equal-weight average of the models' guided predictions (multilora.py).
    guided = prep.ctx.guided(batch)
    return Plan([Trajectory(Average(guided, [1.0] * len(guided)))])


# --------------------------------------------------------------------------- SNB


class SNBParams(Params):
    k: float | list[float] = Field(1.0, description="softmax temperature k_i per model (one value for all, or a list)")
    blur: Literal["box", "gaussian", "none"] = "box"
    blur_size: int = Field(4, description="box blur width in latent pixels")
    blur_sigma: float = Field(1.0, description="Gaussian blur std in latent pixels")
    window: tuple[float, float] = Field((0.0, 1.0), description="fusion window on the trajectory, 0 = noise, 1 = clean")
    fusion_timestep: int | None = Field(None, ge=0, description="t_s in training timesteps; replaces `window`")
    fusion: Literal["late", "early"] = Field(
        "late", description="with fusion_timestep: fuse for t <= t_s (late) or t > t_s (early)"
    )
    temperature: float | None = Field(None, description="soft mask over models instead of argmax (> 0)")
    gate: Literal["none", "base", "region"] = Field(
        "none",
        description="'base': every other model's map times the first model's map rescaled to [0, 1], so the others "
        "win only where the first model responds; 'region': the same, renormalised to sum to one (the others' softmax over "
        "the first model's response); beyond the paper, 'none' is MagicFusion as published",
    )

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        n = (info.context or {}).get("n_models")
        if self.fusion_timestep is not None and "window" in self.model_fields_set:
            raise FieldError("window", "give either `window` (trajectory fractions) or `fusion_timestep` (t_s), not both")
        check_arguments(n, self.ks(n or 1), self.window, self.temperature, self.blur, self.blur_size, self.blur_sigma, self.gate)
        return self

    def ks(self, n: int) -> list[float]:
        """One k per model."""
        return list(self.k) if isinstance(self.k, list) else [self.k] * n

    def fusion_window(self, num_train_timesteps: int) -> tuple[float, float]:
        """[start, end) on the trajectory axis (see `loop.in_window`): "late" fuses for
        t <= t_s, "early" for t > t_s, so the two never both hold at one step."""
        if self.fusion_timestep is None:
            return self.window
        if self.fusion_timestep > num_train_timesteps - 1:
            raise RecipeError(
                f"params.fusion_timestep: {self.fusion_timestep} is beyond the models' training timesteps "
                f"(0..{num_train_timesteps - 1}); give a timestep in that range, or `window` as fractions"
            )
        edge = timestep_fraction(self.fusion_timestep, num_train_timesteps)
        return (edge, 1.0) if self.fusion == "late" else (0.0, edge)


def prepare_snb(ctx: RunContext, params: SNBParams) -> Prepared[SNBParams]:
    params.fusion_window(len(ctx.handles[0].alphas_cumprod))  # t_s within the models' schedule
    return Prepared(ctx, params)


def plan_snb(prep: Prepared[SNBParams], batch: Batch) -> Plan:
    p, guided = prep.params, prep.ctx.guided(batch)
    window = p.fusion_window(len(guided[0].handle.alphas_cumprod))
    return Plan([Trajectory(SNB(guided, p.ks(len(guided)), p.blur, p.blur_size, p.blur_sigma, window, p.temperature, p.gate))])


def check_snb(params: SNBParams, canvas_px: tuple[int, int], factor: int, labels: list[str]) -> None:
    try:
        check_blur_fits(params.blur, params.blur_size, params.blur_sigma, (canvas_px[0] // factor, canvas_px[1] // factor))
    except FieldError as err:
        raise RecipeError(f"params.{err}") from None


# --------------------------------------------------------------------------- Mixture of Diffusers


class _Conditioning(Params):
    model: int | str = Field(0, description="index or name of one of the recipe's models")
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(None, ge=0)


class FusedModel(_Conditioning):
    prompt: str


class RegionSNB(Params):
    """A region painted by SNB: the region's own model and prompt are the base (first) model,
    `models` the others, `params` SNB's (a k list has one entry per model, the region's first)."""

    models: list[FusedModel] = Field(
        min_length=1, description="the models fused with the region's own model, each with its prompt"
    )
    params: dict = Field(default_factory=dict, description="SNB's parameters (as the snb method's `params`)")

    @model_validator(mode="after")
    def _params(self):
        self.snb_params()
        return self

    def snb_params(self) -> SNBParams:
        """`params` validated for 1 + len(models) models; ValueError naming the field otherwise."""
        from pydantic import ValidationError

        try:
            return SNBParams.model_validate(self.params, context={"n_models": 1 + len(self.models)})
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")  # a FieldError's message starts with its field
            raise ValueError(f"params.{field}: {msg}" if field else f"params.{msg}") from None


class RegionParams(Box, _Conditioning):
    prompt: str
    mask_type: Literal["gaussian", "quartic", "constant"] = "gaussian"
    mask_weight: float = Field(1.0, ge=0)
    snb: RegionSNB | None = Field(None, description="paint the region with SNB of its model and these (combinators nest)")


class TilesParams(_Conditioning):
    prompts: list[list[str]] = Field(min_length=1, description="rows of prompts, one per tile")
    tile_height: int = Field(gt=0)
    tile_width: int = Field(gt=0)
    tile_row_overlap: int = Field(0, ge=0)
    tile_col_overlap: int = Field(0, ge=0)
    mask_type: Literal["gaussian", "quartic", "constant"] = "gaussian"
    mask_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _grid(self):
        if len({len(r) for r in self.prompts}) != 1 or not self.prompts[0]:
            raise ValueError("prompts must be a rectangular grid: every row with the same, non-zero number of prompts")
        if self.tile_row_overlap >= self.tile_height or self.tile_col_overlap >= self.tile_width:
            raise ValueError("overlaps must be smaller than the tile size")
        return self

    def canvas(self) -> tuple[int, int]:
        rows, cols = len(self.prompts), len(self.prompts[0])
        return (
            rows * self.tile_height - (rows - 1) * self.tile_row_overlap,
            cols * self.tile_width - (cols - 1) * self.tile_col_overlap,
        )

    def regions(self) -> list[RegionParams]:
        """The grid as regions, row-major (the tiling of the Mixture of Diffusers paper, Sec. 4)."""
        out = []
        for i, row in enumerate(self.prompts):
            for j, prompt in enumerate(row):
                r0, c0 = i * (self.tile_height - self.tile_row_overlap), j * (self.tile_width - self.tile_col_overlap)
                out.append(
                    RegionParams(
                        row_init=r0,
                        row_end=r0 + self.tile_height,
                        col_init=c0,
                        col_end=c0 + self.tile_width,
                        prompt=prompt,
                        model=self.model,
                        negative_prompt=self.negative_prompt,
                        guidance_scale=self.guidance_scale,
                        mask_type=self.mask_type,
                        mask_weight=self.mask_weight,
                    )
                )
        return out


class BackgroundParams(_Conditioning):
    prompt: str
    mask_weight: float = Field(0.01, gt=0, description="constant weight over the whole canvas")


class ImageRegionParams(Box):
    image: str = Field(description="RGB image file placed in the box (resized to it)")
    strength: float = Field(0.8, description="fraction of the trajectory during which the region is held to the image")
    model: int | str = Field(0, description="model whose VAE encodes the image")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str):
        # Checked with the recipe, before any model loads (the file is local by definition).
        if not Path(v).is_file():
            raise ValueError(f"{v!r} does not exist (relative paths are read from the working folder)")
        if not image_is_whole(v):
            raise ValueError(f"{v!r} is not an image PIL can read (or it is damaged); give a PNG or JPEG file")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must lie in [0, 1] (0: image ignored, 1: held to the end), got {v}")
        return v


class RerollParams(Box):
    mode: Literal["reset", "epsilon"] = "reset"
    seed: int = Field(0, ge=0)
    eps: float = Field(0.1, ge=0, description="size of the nudge in 'epsilon' mode")


class ModParams(Params):
    regions: list[RegionParams] = Field(default_factory=list)
    tiles: TilesParams | None = None
    background: BackgroundParams | None = None
    image_regions: list[ImageRegionParams] = Field(default_factory=list)
    rerolls: list[RerollParams] = Field(default_factory=list)
    tile_batch_size: int | None = Field(
        None,
        ge=1,
        description="regions of one model and size denoised per UNet call; default: as many as fit "
        "`runtime.max_memory_gib` (or the device's free memory)",
    )

    @model_validator(mode="after")
    def _some_region(self):
        if not self.regions and self.tiles is None:
            raise ValueError("give `regions` or `tiles` (or both)")
        return self

    def all_regions(self) -> list[tuple[str, RegionParams | BackgroundParams]]:
        """[(where, spec)] of every denoising region in the order the canvas mixes them: `regions`,
        the `tiles` row-major, then the `background`."""
        tiles = self.tiles.regions() if self.tiles else []
        return (
            [(f"params.regions[{i}]", r) for i, r in enumerate(self.regions)]
            + [(f"params.tiles[{i}]", r) for i, r in enumerate(tiles)]
            + ([("params.background", self.background)] if self.background is not None else [])
        )


def mod_canvas(params: ModParams) -> tuple[int, int] | None:
    return params.tiles.canvas() if params.tiles else None


def _model_index(where: str, model: int | str, labels: list[str]) -> int:
    if isinstance(model, int):
        if not 0 <= model < len(labels):
            raise RecipeError(f"{where}.model: index {model} but the recipe has {len(labels)} model(s)")
        return model
    if model not in labels:
        raise RecipeError(f"{where}.model: no model named {model!r} (names: {', '.join(labels)})")
    return labels.index(model)


def place_mod(
    params: ModParams, canvas_px: tuple[int, int], factor: int
) -> list[tuple[str, tuple[int, int, int, int], torch.Tensor]]:
    """The denoising regions of a run on a `canvas_px` (H, W) canvas, as `Canvas` mixes them:
    [(where, latent box (r0, r1, c0, c1), weights (r1 - r0, c1 - c0))] for `regions`, the `tiles`
    expanded row-major and the `background` (the whole canvas at its constant `mask_weight`), in
    that order. RecipeError naming the box off the VAE grid or the canvas. The one placement:
    the run's checks and the web UI's canvas both use it, so what the canvas shows covered is
    what the run mixes."""
    latent = (canvas_px[0] // factor, canvas_px[1] // factor)
    placed = []
    for where, spec in params.all_regions():
        if isinstance(spec, BackgroundParams):
            placed.append((where, (0, latent[0], 0, latent[1]), region_weights(*latent, "constant", spec.mask_weight)))
        else:
            box = spec.latent_box(where, canvas_px, factor)
            placed.append((where, box, region_weights(box[1] - box[0], box[3] - box[2], spec.mask_type, spec.mask_weight)))
    return placed


def check_mod(params: ModParams, canvas_px: tuple[int, int], factor: int, labels: list[str] | None = None) -> list[tuple]:
    """Every box on the grid and canvas, every model reference known, every pixel covered.
    Returns `place_mod`'s regions (background last)."""
    placed = place_mod(params, canvas_px, factor)
    for (where, spec), (_, box, _) in zip(params.all_regions(), placed):
        snb = getattr(spec, "snb", None)  # the background has none
        if labels is not None:
            _model_index(where, spec.model, labels)
            for j, m in enumerate(snb.models if snb else []):
                _model_index(f"{where}.snb.models[{j}]", m.model, labels)
        if snb is not None:
            p = snb.snb_params()
            try:
                check_blur_fits(p.blur, p.blur_size, p.blur_sigma, (box[1] - box[0], box[3] - box[2]))
            except FieldError as err:
                raise RecipeError(f"{where}.snb.params.{err} (the region's latent size)") from None
    for i, r in enumerate(params.image_regions):
        r.latent_box(f"params.image_regions[{i}]", canvas_px, factor)
    for i, r in enumerate(params.rerolls):
        r.latent_box(f"params.rerolls[{i}]", canvas_px, factor)
    latent = (canvas_px[0] // factor, canvas_px[1] // factor)
    total = coverage([b for _, b, _ in placed], [w for _, _, w in placed], latent)
    check_covered(total > 0, factor, "add regions there or give a `background` prompt")
    return placed


@dataclass(frozen=True)
class PreparedCanvas:
    """A Mixture-of-Diffusers run: regions placed and checked, reference images encoded."""

    ctx: RunContext
    params: ModParams
    placed: list[tuple[str, tuple[int, int, int, int], torch.Tensor]]  # (where, latent box, weights), background last
    images: list[ImageRegion]


def prepare_mod(ctx: RunContext, params: ModParams) -> PreparedCanvas:
    factor, canvas_px = ctx.vae_scale_factor, ctx.canvas_px
    placed = check_mod(params, canvas_px, factor, ctx.labels)
    for (where, box, _), (_, spec) in zip(placed, params.all_regions()):
        handle = ctx.handles[_model_index(where, spec.model, ctx.labels)]
        check_box_on_patch_grid(where, box, factor, handle.patch_px, handle.family_name)
    images = []
    for n, spec in enumerate(params.image_regions):
        where = f"params.image_regions[{n}]"
        box = spec.latent_box(where, canvas_px, factor)
        handle = ctx.handles[_model_index(where, spec.model, ctx.labels)]
        pixels = read_rgb_image(f"{where}.image", spec.image, ((box[1] - box[0]) * factor, (box[3] - box[2]) * factor))
        images.append(ImageRegion(box, encode(handle.ready_vae(ctx.recipe.runtime.vae_device), pixels), spec.strength))
    return PreparedCanvas(ctx, params, placed, images)


def plan_mod(prep: PreparedCanvas, batch: Batch) -> Plan:
    ctx, params = prep.ctx, prep.params
    regions = []
    for (where, box, weights), (_, spec) in zip(prep.placed, params.all_regions()):
        i = _model_index(where, spec.model, ctx.labels)
        guided = ctx.guide(i, [spec.prompt] * batch.size, spec.negative_prompt, spec.guidance_scale)
        snb = getattr(spec, "snb", None)  # the background has none
        if snb is not None:
            others = [
                ctx.guide(
                    _model_index(f"{where}.snb.models[{j}]", m.model, ctx.labels),
                    [m.prompt] * batch.size,
                    m.negative_prompt,
                    m.guidance_scale,
                )
                for j, m in enumerate(snb.models)
            ]
            p, fused = snb.snb_params(), [guided, *others]
            guided = SNB(
                fused,
                p.ks(len(fused)),
                p.blur,
                p.blur_size,
                p.blur_sigma,
                p.fusion_window(len(ctx.handles[i].alphas_cumprod)),
                p.temperature,
                p.gate,
            )
        regions.append(Region(box, guided, weights, where.removeprefix("params.")))
    runtime = ctx.recipe.runtime
    canvas = Canvas(
        regions, tuple(ctx.latent_shape[1:]), params.tile_batch_size or (lambda groups: memory_tile_batch(groups, runtime))
    )

    noise = batch.noise
    for n, spec in enumerate(params.rerolls):
        box = spec.latent_box(f"params.rerolls[{n}]", ctx.canvas_px, ctx.vae_scale_factor)
        noise = reroll(noise, box, spec.seed, batch.seeds, spec.mode, spec.eps)

    meet = None
    if prep.images:

        def meet(step: Step) -> list[torch.Tensor]:
            return [hold_image_regions(step.latents[0], noise, prep.images, step.schedulers[0], step.t_next[0], step.fraction[0])]

    return Plan([Trajectory(canvas, noise=noise)], meet=meet)


def memory_tile_batch(groups: list[list[Region]], runtime: Runtime) -> int:
    """Mixture of Diffusers' tile batch when the recipe sets none: the largest whose activations
    fit the run's budget (`runtime.max_memory_gib`, else 90 % of the device's free memory now),
    for every group of regions that can share a denoiser call (`Canvas`; one model, one window
    size). One tile's activations are those of its inputs (the images, twice under guidance),
    each `memory.activations_per_input` of that model at that window (a fake-tensor forward of
    its config, about a second the first time in a process). 1 when no group has two regions."""
    if not groups:
        return 1
    budget = runtime.max_memory_gib * GiB if runtime.max_memory_gib is not None else (1 - RESERVE) * free_bytes(runtime.device)
    batches = []
    for group in groups:
        fn, (h, w) = group[0].fn, group[0].size
        denoiser = fn.handle.unet
        per_input = activations_per_input(
            type(fn.handle), denoiser.config, (fn.handle.latent_channels, h, w), fn.positive.embeds.shape[1], denoiser.dtype
        )
        inputs = fn.batch_size * (1 if all(r.fn.guidance_scale == 1.0 for r in group) else 2)
        batches.append(tile_batch_for(budget, per_input * inputs, len(group)))
    return min(batches)


def snb_recorders(vae) -> list[Recorder]:
    return [MaskRecorder()]


def mod_recorders(vae) -> list[Recorder]:
    return [MaskRecorder(), RegionWeightRecorder()]  # a region painted by SNB records its masks too


METHODS = [
    Method(
        "single",
        "one model, as diffusers' StableDiffusionPipeline samples it",
        "noise",
        NoParams,
        plan_single,
        min_models=1,
        max_models=1,
    ),
    Method(
        "average",
        "weighted average of the models' guided noise predictions (MagicFusion's weighted-sum baseline)",
        "noise",
        AverageParams,
        plan_average,
    ),
    Method(
        "lora-switch",
        "LoRA Switch: one model (a LoRA of a shared base) at a time, each for tau steps in turn",
        "noise",
        SwitchParams,
        plan_switch,
        prepare_switch,
    ),
    Method(
        "lora-composite",
        "LoRA Composite: every model's (every LoRA's) guided prediction at each step, averaged",
        "noise",
        NoParams,
        plan_composite,
    ),
    Method(
        "snb",
        "MagicFusion saliency-aware noise blending: per pixel, the model with the strongest guidance response",
        "noise",
        SNBParams,
        plan_snb,
        prepare_snb,
        min_models=2,
        check=check_snb,
        recorders=snb_recorders,
    ),
    Method(
        "mod",
        "Mixture of Diffusers: regional prompts (each may use its own model) on one canvas, Gaussian-weighted",
        "noise",
        ModParams,
        plan_mod,
        prepare_mod,
        model_prompts=False,
        check=check_mod,
        canvas=mod_canvas,
        regions=place_mod,
        recorders=mod_recorders,
    ),
]
