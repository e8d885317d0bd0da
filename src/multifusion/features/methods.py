"""The feature-level methods as the registry sees them: parameters, prepare and plan of `afa`,
`region-attention` and `k-lora`.

**afa.**

`prepare` loads the trained aggregators (`params.aggregator`: a folder written by
`multifusion afa train`, or `zoo:NAME` for a shipped one; by default the shipped ones trained
for exactly the recipe's models, e.g. `zoo:afa-slices` for slice0 + slice1), checks them against the recipe's
models (content hashes, order, UNet configuration), and builds one `EnsembleHandle` over the
models; `plan` is `single`'s on that handle. The loop never learns about features.

Conditioning: model i embeds its own recipe prompt (and negative prompt) with its own text
encoder; guidance is applied once, to the ensemble's prediction, with the first model's
guidance scale (the ensemble is one denoiser).

**region-attention** (the maths and the papers in `regional.py`, docs/regions.md). Regions are
`mod`'s boxes with a prompt each, plus an optional base prompt over the whole canvas and its
ratio; one model draws every region, in one denoiser call per step. `prepare` finds the
denoiser's text-attention layers (refusing a denoiser it does not know), places the boxes on the
latent and patch grids and checks the canvas covered; `plan` joins the prompts' token sequences
into one conditioning and returns one trajectory whose noise function installs the regional
processors for each call inside the window, and runs the base prompt alone outside it.

**k-lora** (the maths and the paper in `klora.py`, docs/multi-lora.md). One model with a subject
and a style LoRA (`Method.lora_roles`); `prepare` measures the denoiser's attention projections
(top-K sums, gamma) and copies the handle with a `KLoraAdapters`; `plan` is one trajectory whose
noise function sets the progress before each denoiser call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from multifusion.canvas import Box, check_box_on_patch_grid, check_covered
from multifusion.errors import FieldError, IncompatibleModelsError, RecipeError
from multifusion.features.ensemble import EnsembleHandle, model_hash
from multifusion.features.klora import KLoraAdapters, KLoraLayers, measure, step_progress
from multifusion.features.regional import Layout, Regions, TextProjections, installed, text_attention
from multifusion.features.walkers import build_ensemble, walker_for
from multifusion.handles import Conditioning, Guided, ModelHandle
from multifusion.loop import Trajectory
from multifusion.method import Batch, Method, Params, Plan, Recorder, RunContext
from multifusion.schedulers import in_window, timestep_fraction
from multifusion.viz import AFAMapRecorder


class AFAParams(Params):
    aggregator: str | None = Field(
        None,
        description="folder of trained aggregators (`multifusion afa train --out DIR`: DIR "
        "or DIR/aggregator), or zoo:NAME for a shipped one; default: the shipped aggregators "
        "trained for exactly these models in this order",
    )

    @field_validator("aggregator")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is None:
            return v
        path = aggregator_path(v)
        if not ((path / "config.json").exists() or (path / "aggregator" / "config.json").exists()):
            raise ValueError(
                f"{v!r}: no trained aggregators there (config.json and diffusion_pytorch_model.safetensors); "
                "make them with `multifusion afa train`"
            )
        return v


def shipped_for(hashes: list[str]) -> Path | None:
    """The shipped aggregators (zoo/weights/afa-*) trained for these model hashes, in order."""
    from multifusion.loading import zoo_root

    for config in sorted(zoo_root().glob("afa-*/config.json")):
        if json.loads(config.read_text()).get("models") == hashes:
            return config.parent
    return None


def shipped_pairs() -> list[str]:
    """The models each shipped aggregator set was trained for, in order ("zoo:a + zoo:b (zoo:afa-x)")."""
    from multifusion.loading import zoo_root

    out = []
    for config in sorted(zoo_root().glob("afa-*/config.json")):
        labels = json.loads(config.read_text()).get("labels") or []
        out.append(f"{' + '.join(labels)} (zoo:{config.parent.name})")
    return out


def aggregator_path(text: str) -> Path:
    """`zoo:NAME` -> the shipped folder; anything else is a path."""
    if text.startswith("zoo:"):
        from multifusion.loading import zoo_root

        return zoo_root() / text[4:]
    return Path(text)


class AFANoise:
    """The ensemble's guided prediction as a noise function; puts the per-step aggregation
    maps in the step record as `afa/maps`: one (N, B, 1, h, w) tensor per aggregation point,
    the weights of the conditional half (the images' own prompts)."""

    def __init__(self, guided: Guided, ensemble: torch.nn.Module):  # AFAEnsemble or SD3Ensemble
        self.guided, self.ensemble = guided, ensemble

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        eps = self.guided(x_t, t)
        if record is not None:
            b = x_t.shape[0]
            record["afa/maps"] = [w[-b:].permute(1, 0, 2, 3).unsqueeze(2).float().cpu() for w in self.ensemble.last_weights]
        return eps


@dataclass(eq=False)
class PreparedAFA:
    ctx: RunContext
    params: AFAParams
    handle: EnsembleHandle
    _guided: dict[tuple, Guided] = field(default_factory=dict, repr=False)

    def guided(self, batch: Batch) -> Guided:
        """The ensemble conditioned on each model's own prompts for the batch (encoded once)."""
        recipe = self.ctx.recipe
        key = tuple(batch.indices)
        if key not in self._guided:
            members = self.handle.members
            prompts = [recipe.prompts_of(i, batch.indices) for i in range(len(members))]
            cond = self.handle.encode_each(prompts)
            uncond = self.handle.encode_each(
                [[recipe.negative_of(i)] * batch.size for i in range(len(members))], negative_of=cond
            )
            self._guided[key] = Guided(self.handle, cond, uncond, float(recipe.guidance_of(0)), prompts[0])
        return self._guided[key]


def prepare_afa(ctx: RunContext, params: AFAParams) -> PreparedAFA:
    from multifusion.features.train import load_trained

    # `runtime.compile` wraps each denoiser in a compiled module; the ensemble walks the blocks
    # itself and hashes the weights, so it takes the modules themselves
    handles = [replace(h, unet=getattr(h.unet, "_orig_mod", h.unet)) for h in ctx.handles]
    for i, h in enumerate(handles):  # before the aggregators load: a denoiser no walker takes is named with the reason
        try:
            walker_for(h.unet)
        except IncompatibleModelsError as err:
            raise IncompatibleModelsError(f"models[{i}] ({h.name!r}): {err}") from None
    if len({h.prediction_type for h in handles}) != 1:
        raise IncompatibleModelsError(
            "AFA needs models of one prediction type; got " + ", ".join(f"{h.name}: {h.prediction_type}" for h in handles)
        )
    if any(h.offloader is not None for h in handles):
        raise RecipeError("runtime.offload: AFA runs every model at every layer; it cannot keep only one on the device")
    first = handles[0]
    if params.aggregator is None:
        path = shipped_for([model_hash(h) for h in handles])
        if path is None:
            raise RecipeError(
                f"params.aggregator: no shipped aggregators were trained for {', '.join(ctx.labels)} in this order "
                f"(shipped: {'; '.join(shipped_pairs()) or 'none'}); "
                "train them with `multifusion afa train MODEL... --data ... --out DIR` and give DIR"
            )
    else:
        path = aggregator_path(params.aggregator)
    aggregators = load_trained(path, handles, first.dtype).to(first.device)
    ensemble = build_ensemble([h.unet for h in handles], aggregators, ctx.labels).eval()
    return PreparedAFA(ctx, params, EnsembleHandle.of(handles, ensemble))


def plan_afa(prep: PreparedAFA, batch: Batch) -> Plan:
    return Plan([Trajectory(AFANoise(prep.guided(batch), prep.handle.unet))])


def afa_recorders(vae) -> list[Recorder]:
    return [AFAMapRecorder()]


# --------------------------------------------------------------------------- region-attention

MOD_ONLY = ("model", "negative_prompt", "guidance_scale", "mask_type", "mask_weight", "snb")
"""Fields of a `mod` region that an attention region has no use for (one model draws every
region, in one call, with hard region edges)."""


class AttentionRegion(Box):
    """A box of the canvas (as `mod`'s regions: pixels or fractions) and the prompt its image
    tokens attend."""

    prompt: str

    @model_validator(mode="before")
    @classmethod
    def _not_mod_fields(cls, data, info: ValidationInfo):
        if isinstance(data, dict):
            for name in MOD_ONLY:
                if name in data:
                    raise FieldError(
                        name,
                        "is a Mixture-of-Diffusers (`mod`) region field; region-attention draws every region with the one "
                        "model, in one call, with hard edges: drop it (or use method mod)",
                    )
        return data


class RegionAttentionParams(Params):
    regions: list[AttentionRegion] = Field(min_length=1, description="boxes of the canvas, each with its prompt")
    base_prompt: str | None = Field(
        None, description="prompt over the whole canvas, blended into every region by base_ratio; uncovered pixels take it alone"
    )
    base_ratio: float = Field(
        0.2, ge=0, le=1, description="share of the base prompt's attention output in the regions (needs base_prompt)"
    )
    window: tuple[float, float] = Field(
        (0.0, 1.0),
        description="trajectory fractions (0 = noise, 1 = clean) where the regions apply; outside, the base prompt alone",
    )

    @model_validator(mode="after")
    def _needs_base(self):
        start, end = self.window
        if not 0.0 <= start <= end <= 1.0:
            raise FieldError(
                "window", f"must be [start, end] with 0 <= start <= end <= 1 (0 = pure noise, 1 = clean), got {list(self.window)}"
            )
        if self.base_prompt is None and "base_ratio" in self.model_fields_set and self.base_ratio > 0:
            raise FieldError("base_ratio", "blends the base prompt in, and there is no base_prompt; give one or drop base_ratio")
        if self.base_prompt is None and self.window != (0.0, 1.0):
            raise FieldError("window", "outside the window only the base prompt is drawn, and there is no base_prompt; give one")
        return self


def place_attention_regions(
    params: RegionAttentionParams, canvas_px: tuple[int, int], factor: int
) -> list[tuple[str, tuple[int, int, int, int], torch.Tensor]]:
    """[(where, latent box, weights (h, w) of ones)] of the regions, then the base prompt over the
    whole canvas when there is one. RecipeError naming a box off the VAE grid or the canvas."""
    latent = (canvas_px[0] // factor, canvas_px[1] // factor)
    placed = []
    for i, r in enumerate(params.regions):
        box = r.latent_box(f"params.regions[{i}]", canvas_px, factor)
        placed.append((f"params.regions[{i}]", box, torch.ones(box[1] - box[0], box[3] - box[2])))
    if params.base_prompt is not None:
        placed.append(("params.base_prompt", (0, latent[0], 0, latent[1]), torch.ones(latent)))
    return placed


def check_region_attention(params: RegionAttentionParams, canvas_px: tuple[int, int], factor: int, labels=None) -> list[tuple]:
    """Every box on the VAE grid and the canvas; without a base prompt, every latent pixel in a
    region. Overlaps are allowed (a token takes the mean of its regions' outputs)."""
    placed = place_attention_regions(params, canvas_px, factor)
    if params.base_prompt is None:
        h, w = canvas_px[0] // factor, canvas_px[1] // factor
        covered = torch.zeros(h, w, dtype=torch.bool)
        for _, (r0, r1, c0, c1), _ in placed:
            covered[r0:r1, c0:c1] = True
        check_covered(covered, factor, "there is no base_prompt to draw them: add regions there or give a base_prompt")
    return placed


def joined(parts: list[Conditioning], base_leads: bool) -> Conditioning:
    """One conditioning whose text sequence is the parts' one after another (B, sum L_k, D); the
    further tensors (pooled embeddings, time ids, distilled guidance) are the first part's when
    it is the base prompt's or all parts agree, else the parts' mean (see `regional.py`)."""
    extra = {}
    for key, first in parts[0].extra.items():
        values = [p.extra[key] for p in parts]
        same = base_leads or all(torch.equal(v, first) for v in values)
        extra[key] = first if same else torch.stack(values).mean(0)
    return Conditioning(torch.cat([p.embeds for p in parts], dim=1), extra)


class RegionAttentionNoise:
    """The noise function of region-attention: inside the window, the joined conditioning with
    the regional processors installed for the call (`regional.installed`), sharing the text's
    projections over the calls (`TextProjections`); outside, the base prompt alone (the model as
    it is)."""

    def __init__(self, joint: Guided, base: Guided | None, layers: dict, regions: Regions, window, num_train_timesteps: int):
        self.joint, self.base, self.layers, self.regions = joint, base, layers, regions
        self.window, self.num_train_timesteps = window, num_train_timesteps
        self.projections = TextProjections()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        if self.base is not None and not in_window(timestep_fraction(t, self.num_train_timesteps), self.window):
            return self.base(x_t, t)
        with installed(self.layers, self.regions, self.projections):
            return self.joint(x_t, t)


@dataclass(eq=False)
class PreparedRegionAttention:
    ctx: RunContext
    params: RegionAttentionParams
    layers: dict
    boxes: list[tuple[int, int, int, int]]


def prepare_region_attention(ctx: RunContext, params: RegionAttentionParams) -> PreparedRegionAttention:
    handle = ctx.handles[0]
    try:
        layers = text_attention(handle.unet)
    except IncompatibleModelsError as err:
        raise IncompatibleModelsError(f"models[0] ({handle.name!r}): {err}") from None
    factor = ctx.vae_scale_factor
    placed = check_region_attention(params, ctx.canvas_px, factor)
    for where, box, _ in placed:
        check_box_on_patch_grid(where, box, factor, handle.patch_px, handle.family_name)
    boxes = [box for where, box, _ in placed if where.startswith("params.regions")]
    return PreparedRegionAttention(ctx, params, layers, boxes)


def plan_region_attention(prep: PreparedRegionAttention, batch: Batch) -> Plan:
    ctx, p = prep.ctx, prep.params
    prompts = ([p.base_prompt] if p.base_prompt is not None else []) + [r.prompt for r in p.regions]
    guided = [ctx.guide(0, [text] * batch.size) for text in prompts]
    layout = Layout(tuple(g.positive.embeds.shape[1] for g in guided), p.base_prompt is not None)
    if any(g.negative.embeds.shape[1] != n for g, n in zip(guided, layout.lengths)):
        raise ValueError("the negative prompt's token sequence differs in length from the prompt's")  # no family does this
    first = guided[0]
    joint = Guided(
        first.handle,
        joined([g.positive for g in guided], layout.has_base),
        joined([g.negative for g in guided], layout.has_base),
        first.guidance_scale,
        first.prompts,
    )
    regions = Regions(prep.boxes, tuple(ctx.latent_shape[1:]), p.base_ratio if p.base_prompt is not None else None, layout)
    base = first if p.base_prompt is not None else None
    fn = RegionAttentionNoise(joint, base, prep.layers, regions, p.window, len(first.handle.alphas_cumprod))
    return Plan([Trajectory(fn)])


# --------------------------------------------------------------------------- k-lora


class KLoraParams(Params):
    k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="how many of each update's largest |entries| are summed (the paper's K); default: "
        "r_subject * r_style per layer, as the reference code (64 for two rank-8 LoRAs)",
    )
    schedule: Literal["s", "s*"] = Field(
        "s",
        description="the style scale over sampling: s = alpha p + beta (the paper's), s* = (alpha p + beta) mod alpha "
        "(the supplement's, more style)",
    )
    alpha: float = Field(1.5, gt=0, le=100, description="slope of the style scale over sampling progress p in [0, 1]")
    beta: float | None = Field(None, ge=0, le=100, description="the style scale at p = 0; default 0.5 for s, 0.85 * alpha for s*")

    @property
    def offset(self) -> float:
        if self.beta is not None:
            return self.beta
        return 0.5 if self.schedule == "s" else 0.85 * self.alpha


class KLoraNoise:
    """The model's guided prediction with the subject or style LoRA per attention projection,
    chosen at this call's progress (`klora.step_progress` of `steps` denoiser calls). One per
    sampling run: it counts the calls it has served. Puts how many layers run the subject in the
    step record."""

    def __init__(self, guided: Guided, chosen: KLoraLayers, steps: int):
        self.guided, self.chosen, self.steps, self.step = guided, chosen, steps, 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        self.chosen.progress = step_progress(self.step, self.steps)
        self.step += 1
        if record is not None:
            record["k-lora/subject_layers"] = int(self.chosen.choices().sum())
        return self.guided(x_t, t)


@dataclass(eq=False)
class PreparedKLora:
    ctx: RunContext
    handle: ModelHandle
    chosen: KLoraLayers


def prepare_klora(ctx: RunContext, params: KLoraParams) -> PreparedKLora:
    handle = ctx.handles[0]
    adapters = handle.adapters
    problem = KLORA.lora_problem(0 if adapters is None else len(adapters.names))
    if problem:  # a handle from Python (a recipe is refused before loading)
        raise RecipeError(f"models[0].loras ({handle.name!r}): {problem}")
    denoiser = getattr(handle.unet, "_orig_mod", handle.unet)
    try:
        chosen = measure(denoiser, adapters, params.k, params.alpha, params.offset, params.schedule == "s*")
    except ValueError as err:
        raise IncompatibleModelsError(f"models[0].loras ({handle.name!r}): {err}") from None
    for module in (handle.unet, denoiser):  # `measure` set the layers' scales: every set activates afresh
        module.__dict__.pop("_active_adapter_set", None)
    klora = KLoraAdapters(adapters.names, adapters.weights, adapters.given, chosen)
    return PreparedKLora(ctx, replace(handle, adapters=klora), chosen)


def plan_klora(prep: PreparedKLora, batch: Batch) -> Plan:
    ctx = prep.ctx
    guided = ctx.guide(0, ctx.recipe.prompts_of(0, batch.indices), handle=prep.handle)
    return Plan([Trajectory(KLoraNoise(guided, prep.chosen, denoiser_calls(ctx)))])


def denoiser_calls(ctx: RunContext) -> int:
    """How many times the loop calls the noise function in one run: the scheduler's timesteps for
    the recipe's steps (2n - 1 for Heun's n steps, n for first-order schedulers), as `loop.sample`
    sets them. K-LoRA's progress counts those calls, as the reference counts layer calls."""
    sampling = ctx.recipe.sampling
    scheduler = ctx.handles[0].scheduler(sampling.scheduler, ctx.latent_shape[1:])
    try:
        scheduler.set_timesteps(sampling.num_inference_steps)
    except (ValueError, IndexError):  # the loop refuses these steps itself, with the reason
        return sampling.num_inference_steps
    return len(scheduler.timesteps)


KLORA = Method(
    "k-lora",
    "K-LoRA: a subject and a style LoRA of one base; each attention projection runs the one whose largest "
    "update entries weigh more, the style's weight growing over sampling",
    "features",
    KLoraParams,
    plan_klora,
    prepare_klora,
    max_models=1,
    lora_roles=("subject", "style"),
)


METHODS = [
    Method(
        "afa",
        "AFA: N same-architecture UNets (or SD3 transformers) meet after every block; trained aggregators weight "
        "each model per pixel",
        "features",
        AFAParams,
        plan_afa,
        prepare_afa,
        min_models=2,
        recorders=afa_recorders,
        own_denoisers=(
            "AFA runs every model's denoiser block by block inside one forward, and models given as a base with "
            "LoRAs share one denoiser whose adapters switch per call, not per block"
        ),
    ),
    Method(
        "region-attention",
        "regional prompts inside attention (Chen et al. for SD3/FLUX, Regional Prompter's attention mode for UNets): "
        "one model, one denoiser call per step, each region's image tokens attending its own prompt",
        "features",
        RegionAttentionParams,
        plan_region_attention,
        prepare_region_attention,
        max_models=1,
        model_prompts=False,
        check=check_region_attention,
        regions=place_attention_regions,
    ),
    KLORA,
]
