"""Recipes: the models, the method and its parameters, prompts and sampling settings.

A recipe is a YAML or JSON file (or a dict) validated completely before any model loads.
Errors name the field (``models[1].model``, ``sampling.height``) and what to change.

    version: 1
    method: average
    params: {weights: [0.7, 0.3]}
    models:
      - {model: zoo:general, prompt: "a red circle in a snowy field"}
      - {model: zoo:expert, prompt: "a red striped circle", guidance_scale: 5}
    sampling: {num_inference_steps: 30, scheduler: ddim, seed: 0, height: 64, width: 64}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from multifusion.errors import FieldError, IncompatibleModelsError, ModelLoadError, RecipeError, clip, format_validation_error

if TYPE_CHECKING:
    from multifusion.method import Method, Params


MAX_GUIDANCE = 100.0
"""Guidance scales above this are refused: classifier-free guidance is useful up to ~30, and
scales like 1e30 overflow the latents to an all-black image."""

MAX_PIXELS = 4096 * 4096
"""Default `runtime.max_pixels`: the largest canvas (height x width, one image) a run accepts
unless the recipe raises the limit on purpose."""

MAX_YAML_NODES = 100_000
"""A YAML recipe expanding (through its aliases) to more values than this is refused: nested
aliases of a few hundred bytes can expand to gigabytes ("billion laughs")."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of a recipe (at any depth) is finite; YAML `.nan` or
    # `.inf` is an error naming the field, never a silently black image.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelEntry(_Strict):
    """One model of a recipe, with its own conditioning."""

    model: str = Field(min_length=1, description="diffusers folder, Hub id, .safetensors file or zoo:NAME")
    name: str | None = Field(None, description="how regions and amdm's `specified` name this model (default: `model`)")
    config: str | None = Field(None, description="diffusers config folder for a single-file checkpoint")
    vae: str | None = Field(None, min_length=1, description="a VAE in place of the model's own (e.g. the fp16-fix SDXL VAE): "
                            "a diffusers VAE folder or a single .safetensors VAE file")
    prompt: str | list[str] | None = Field(None, description="one prompt for every image, or a list with one per image")
    negative_prompt: str | None = Field(None, description="default: the recipe's negative_prompt")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="default: sampling.guidance_scale")
    true_cfg_scale: float | None = Field(None, ge=1, le=MAX_GUIDANCE, description=(
        "FLUX only: true classifier-free guidance with the negative prompt, a second pass per step (FluxPipeline's "
        "true_cfg_scale; 1 = off, the default); guidance_scale stays the distilled guidance"))

    @property
    def label(self) -> str:
        return self.name or self.model


class MergeEntry(_Strict):
    """A model merged from others before sampling, named in `models` as `merge:NAME`: the
    fields of `multifusion.weights.MergeSpec` (see docs/merges.md) and the models it merges
    (folders or zoo:NAME; not merges themselves)."""

    models: list[str] = Field(min_length=1, description="the models merged, in order (A, B[, C])")
    method: Literal["weighted_sum", "add_difference"] = "weighted_sum"
    weights: list[float] | None = Field(None, description="weighted_sum: one weight per model (normalised); default equal")
    alpha: float | None = Field(None, description="add_difference: A + alpha (B - C); default 1")
    blocks: str | list[float] | None = Field(None, description="block weights: a preset name, an A1111 string or a list")
    text_encoder: Literal["merge", "first"] = "merge"

    def spec(self):
        from multifusion.weights.models import MergeSpec

        return MergeSpec(self.method, None if self.weights is None else tuple(self.weights), self.alpha,
                         self.blocks if self.blocks is None or isinstance(self.blocks, str) else tuple(self.blocks),
                         self.text_encoder)


MERGE_PREFIX = "merge:"


class Sampling(_Strict):
    num_inference_steps: int = Field(30, gt=0, le=1000)
    scheduler: str = "ddim"
    guidance_scale: float = Field(7.5, ge=0, le=MAX_GUIDANCE)
    eta: float = Field(0.0, ge=0, le=1, description="DDIM-type noise: 0 deterministic, 1 DDPM-like; above 1 the step's variance is undefined")
    seed: int = Field(0, ge=0, lt=2**63)
    num_images: int = Field(1, gt=0, le=4096)
    height: int | None = Field(None, gt=0, description="default: the first model's native size")
    width: int | None = Field(None, gt=0, description="default: the first model's native size")

    @model_validator(mode="after")
    def _last_seed(self):
        # Image i has seed + i, written into its metadata and read back as a recipe seed.
        last = self.seed + self.num_images - 1
        if last >= 2**63:
            raise FieldError("seed", f"{self.seed} + {self.num_images} images reaches seed {last}, beyond the largest "
                             f"seed 2^63 - 1; use a seed <= {2**63 - self.num_images}")
        return self


class Runtime(_Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    offload: bool = False
    allow_pickle: bool = False
    vae_device: str | None = Field(None, description="run the VAE here (e.g. cpu, in float32) to spare accelerator memory on large canvases")
    # None = MAX_PIXELS. Optional so that recipes that do not set it keep the JSON they had (an
    # image's metadata, compared when a run resumes).
    max_pixels: int | None = Field(None, gt=0, description=f"largest canvas (height x width, one image) accepted (default {MAX_PIXELS}); "
                                   "raise it on purpose for larger ones")

    @property
    def pixel_limit(self) -> int:
        return MAX_PIXELS if self.max_pixels is None else self.max_pixels

    @model_validator(mode="after")
    def _device(self):
        for field, value in (("device", self.device), ("vae_device", self.vae_device)):
            if value is not None and value.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
                raise FieldError(field, f"{value!r} is not one of cpu, cuda[:N], mps, xpu")
        return self


class Recipe(_Strict):
    version: Literal[1] = 1
    method: str = "single"
    models: list[ModelEntry] = Field(min_length=1)
    prompt: str | None = Field(None, description="default prompt of models that give none")
    negative_prompt: str = ""
    params: dict[str, JsonValue] = Field(default_factory=dict)
    merges: dict[str, MergeEntry] = Field(default_factory=dict, description="merged models, named in `models` as merge:NAME")
    sampling: Sampling = Field(default_factory=Sampling)
    runtime: Runtime = Field(default_factory=Runtime)

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data):
        # A lone surrogate (a "\ud800" escape in JSON) is a Python str but no text: it fails later in
        # the tokenizer or the PNG metadata, after the models have loaded.
        where = _not_utf8(data)
        if where is not None:
            raise FieldError(where, "holds invalid Unicode (a lone surrogate, e.g. a \\udXXX escape); write the text as UTF-8")
        return data

    @model_validator(mode="after")
    def _prompt_lists(self):
        for i, m in enumerate(self.models):
            if isinstance(m.prompt, list) and len(m.prompt) != self.sampling.num_images:
                raise ValueError(f"models[{i}].prompt has {len(m.prompt)} prompts for {self.sampling.num_images} images "
                                 "(sampling.num_images); give one prompt per image, or a single prompt")
        labels = [m.label for m in self.models]
        for i, m in enumerate(self.models):
            # A region or `specified` names a model by its label: a name two different models
            # answer to is ambiguous. (One model listed twice under one label is fine, the weights
            # being the same: fusing a model with itself is how the degenerate cases are tested.)
            same = (m.model, m.config, m.vae)
            earlier = [j for j in range(i) if labels[j] == labels[i]
                       and (self.models[j].model, self.models[j].config, self.models[j].vae) != same]
            named = [k for k in (*earlier, i) if self.models[k].name is not None]
            if earlier and named:
                k = i if i in named else named[0]
                raise FieldError(f"models[{k}].name", f"{labels[i]!r} names both models[{earlier[0]}] and models[{i}]; "
                                 "give each model its own name")
        if self.sampling.height is not None and self.sampling.width is not None:
            problem = pixels_problem(self.sampling.height, self.sampling.width, self.runtime.pixel_limit)
            if problem:
                raise FieldError("sampling.height", problem)
        return self

    def prompts_of(self, i: int, indices: list[int]) -> list[str]:
        """Model i's prompt for each image index (0 = the image of `sampling.seed`)."""
        p = self.models[i].prompt if self.models[i].prompt is not None else self.prompt
        return [p[j] for j in indices] if isinstance(p, list) else [p] * len(indices)  # type: ignore[list-item]

    def negative_of(self, i: int) -> str:
        m = self.models[i]
        return m.negative_prompt if m.negative_prompt is not None else self.negative_prompt

    def guidance_of(self, i: int) -> float:
        m = self.models[i]
        return m.guidance_scale if m.guidance_scale is not None else self.sampling.guidance_scale

    def seeds(self) -> list[int]:
        """One seed per image: seed, seed + 1, ..."""
        return [self.sampling.seed + i for i in range(self.sampling.num_images)]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)


def _not_utf8(data, where: str = "") -> str | None:
    """The field path of the first string (or key) in `data` that cannot be encoded as UTF-8."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return where or "recipe"
        return None
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(data))
    else:
        return None
    for key, value in items:
        if isinstance(key, str) and _not_utf8(key, where) is not None:
            return where or "recipe"
        sub = f"{where}{key}" if isinstance(key, str) and key.startswith("[") else (f"{where}.{key}" if where else str(key))
        found = _not_utf8(value, sub)
        if found is not None:
            return found
    return None


def pixels_problem(height: int, width: int, max_pixels: int) -> str | None:
    """What is wrong with a height x width canvas beyond `max_pixels`, with a floor estimate of the
    memory it needs (the decoded float32 image alone: 12 bytes a pixel; the UNet's activations
    grow faster still, with the square of the latent area in attention layers); None if it fits."""
    pixels = height * width
    if pixels <= max_pixels:
        return None
    need = pixels * 3 * 4
    return (f"{height} x {width} = {pixels:,} pixels exceeds runtime.max_pixels ({max_pixels:,}); one image needs "
            f"at least {need / 2**30:,.1f} GiB for its decoded float32 pixels alone, and far more for the UNet's "
            "activations. Use a smaller canvas, or raise runtime.max_pixels on purpose if the machine has the memory")


def check_pixels(height: int, width: int, max_pixels: int, where: str) -> None:
    """RecipeError naming `where` when the canvas exceeds `max_pixels` (see `pixels_problem`)."""
    problem = pixels_problem(height, width, max_pixels)
    if problem:
        raise RecipeError(f"{where}: {problem}")


def check_devices(runtime: "Runtime") -> None:
    """RecipeError when runtime.device or runtime.vae_device names an accelerator this machine does
    not have (checked when a run starts, before any model loads)."""
    for field, value in (("device", runtime.device), ("vae_device", runtime.vae_device)):
        if value is not None:
            check_device(f"runtime.{field}", value)


def check_device(where: str, value: str) -> None:
    """RecipeError naming `where` unless `value` is cpu or an accelerator (cuda[:N], mps, xpu[:N])
    that torch sees on this machine."""
    import torch

    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise RecipeError(f"{where}: {value!r} is not one of cpu, cuda[:N], mps, xpu")
    if kind == "cpu":
        return
    if kind == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, kind, None)
        available = backend is not None and backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        raise RecipeError(f"{where}: {value!r} but this machine has no {kind} device (torch sees none); "
                          "use cpu, or run where the accelerator is")
    if index and (not index.isdigit() or int(index) >= count):
        raise RecipeError(f"{where}: {value!r} but this machine has {count} {kind} device(s) (indices 0-{count - 1})")


def _expanded_size(data, limit: int) -> int:
    """How many values `data` holds once its shared parts (YAML aliases) are counted at every
    place they appear; stops counting past `limit`."""
    memo: dict[int, int] = {}

    def size(x) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        if id(x) in memo:
            return memo[id(x)]
        memo[id(x)] = limit + 1  # a cycle (a self-referencing alias) counts as too large
        children = x.values() if isinstance(x, dict) else x
        total = 1
        for c in children:
            total += size(c)
            if total > limit:
                break
        memo[id(x)] = total
        return total

    return size(data)


def narrow_to_image(recipe: dict, seed: int) -> dict:
    """A recipe (as JSON data) narrowed to the one image of `seed`: that seed, one image, and
    each per-image prompt list reduced to that image's prompt, so running it again regenerates
    exactly that image."""
    out = json.loads(json.dumps(recipe))
    sampling = out.setdefault("sampling", {})
    index = seed - int(sampling.get("seed", 0))
    for m in out.get("models", []):
        if isinstance(m.get("prompt"), list):
            m["prompt"] = m["prompt"][index]
    sampling.update(seed=seed, num_images=1)
    return out


def parse_recipe(data: dict | str | Path) -> Recipe:
    """Read and validate a recipe's structure (types, ranges). See `validate_recipe` for the
    checks that need the method registry and the model files."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                              "save it as UTF-8") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:  # yaml and json errors alike
            raise RecipeError(f"recipe file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                              f"{clip(str(err), 1000)}") from None
        if _expanded_size(data, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise RecipeError(f"recipe file {str(path)!r} expands to more than {MAX_YAML_NODES:,} values (nested YAML "
                              "aliases?); a recipe is refused rather than expanded")
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err)) from None


@dataclass(frozen=True)
class Validated:
    """A recipe checked before loading: its method, its params, and whether the canvas size and
    the method's size checks could run already (they need the VAE factor from a local config
    and a size given by the recipe; otherwise they run after loading)."""

    recipe: Recipe
    method: "Method"
    params: "Params"
    canvas_checked: bool


def validate(recipe: Recipe) -> Validated:
    """Every check that can run before a model loads: the method exists and accepts this many
    models and these params; every model has a prompt (if the method needs one); the scheduler
    exists; every model reference resolves (pickles refused); the canvas size fits the VAE
    factor and the method's own size checks pass, where the first model's config is local."""
    from multifusion.loading import check_weight_files, family_of, read_local_config, resolve
    from multifusion.registry import get_method
    from multifusion.schedulers import check_steps, scheduler_class

    method = get_method(recipe.method)
    n = len(recipe.models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = f"exactly {method.min_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
        raise RecipeError(f"models: method {method.name!r} takes {want} model(s), the recipe names {n}")
    params = method.parse_params(recipe.params, n, labels=[m.label for m in recipe.models],
                                 models=[m.model for m in recipe.models],
                                 num_inference_steps=recipe.sampling.num_inference_steps)
    if method.model_prompts:
        for i, m in enumerate(recipe.models):
            if m.prompt is None and recipe.prompt is None:
                raise RecipeError(f"models[{i}]: no prompt, and the recipe has no default `prompt`; give one")
    scheduler_class(recipe.sampling.scheduler)
    factor, grid, spaces, families, vaes, schedulers = None, None, {}, {}, {}, {}
    merged = check_merges(recipe)
    for i, m in enumerate(recipe.models):
        try:
            ref = merged[m.model] if m.model in merged else resolve(m.model, config=m.config, allow_pickle=recipe.runtime.allow_pickle)
            if m.model not in merged:
                check_weight_files(ref)  # headers only: a truncated download is named here, before loading
                family_of(ref)  # a pipeline of no known family (say the SDXL refiner), from its local model_index.json
        except ModelLoadError as err:
            raise type(err)(f"models[{i}].model: {err}") from None
        cfg = read_local_config(ref)
        if m.vae is not None:
            cfg = _check_vae(i, m, cfg, recipe.runtime.allow_pickle)
        if cfg is not None and i == 0 and cfg.get("scheduler") is not None:
            check_steps(recipe.sampling.scheduler, cfg["scheduler"], recipe.sampling.num_inference_steps)
        if cfg is not None:
            factor, grid = (cfg["vae_scale_factor"], cfg["patch_px"]) if i == 0 else (factor, grid)
            spaces[i] = (cfg["latent_channels"], cfg["vae_scale_factor"])
            families[i] = (cfg["family"], cfg["prediction_space"])
            vaes[i] = round(cfg["scaling_factor"], 6)
            schedulers[i] = cfg["scheduler"]
            check_flow_fields(recipe, i, cfg["family"], cfg["prediction_space"])
    i = min(spaces, default=0)
    for j, space in spaces.items():  # the full check (with the noise schedule) runs after loading
        if families[j] != families[i] and "velocity" in (families[j][1], families[i][1]):
            raise IncompatibleModelsError(
                f"models[{j}].model: a {families[j][0]} model cannot meet models[{i}], a {families[i][0]} model: their VAEs "
                "(latent spaces) and noise schedules differ"
                + (f", and they predict {families[j][1]} vs {families[i][1]}" if families[j][1] != families[i][1] else "")
                + "; fuse models of one family")
        if space != spaces[i]:
            raise IncompatibleModelsError(
                f"models[{j}].model: its latent channels and VAE factor ({space[0]}, {space[1]}) differ from models[{i}]'s "
                f"({spaces[i][0]}, {spaces[i][1]}), so their latents cannot meet; use models fine-tuned from one base "
                "(same VAE)")
        if vaes[j] != vaes[i]:
            family, family_i = families[j][0], families[i][0]
            kinds = f"models[{j}] is {family} and models[{i}] {family_i}: " if family != family_i else ""
            raise IncompatibleModelsError(
                f"models[{j}].model: {kinds}their VAEs encode different latent spaces (VAE scaling_factor {vaes[j]} vs "
                f"{vaes[i]}), so their noise and latents cannot meet; fuse models of one family, a base with its fine-tunes")
    if method.meets == "latents":
        check_flow_schedules(recipe, {j: s for j, s in schedulers.items() if families[j][1] == "velocity" and s is not None})
    size = None if factor is None else check_canvas(recipe, method, params, factor, default=None)
    if size is not None:
        check_patch_grid(*size, grid, families[0][0])
        if method.regions is not None:  # regions on the first model's grid (the models are of one family here)
            for where, box, _ in method.regions(params, size, factor):
                check_box_on_patch_grid(where, box, factor, grid, families[0][0])
    return Validated(recipe, method, params, size is not None)


def check_flow_fields(recipe: Recipe, i: int, family: str, space: str) -> None:
    """What a recipe gives model i that its family has no use for, refused naming the field:
    `true_cfg_scale` for a model other than FLUX, `sampling.eta` for a flow-matching model (its
    Euler step is deterministic: docs/flow.md)."""
    from multifusion.flow.flux import FluxHandle

    if recipe.models[i].true_cfg_scale is not None and family != FluxHandle.family_name:
        raise RecipeError(f"models[{i}].true_cfg_scale: true CFG is FLUX's (FluxPipeline's true_cfg_scale); a {family} model "
                          "is guided by guidance_scale with its negative prompt already: drop true_cfg_scale")
    if space == "velocity" and recipe.sampling.eta != 0:
        raise RecipeError(f"sampling.eta: {recipe.sampling.eta} but models[{i}] is a {family} model, sampled by the flow-matching "
                          "Euler step, which has no eta (it is deterministic, DDIM at eta 0 in flow coordinates; diffusers' "
                          "stochastic_sampling is one fixed all-fresh-noise form, not an eta); drop sampling.eta")


def check_flow_schedules(recipe: Recipe, schedulers: dict) -> None:
    """For methods whose models meet after each of their own scheduler steps (AMDM): flow models'
    scheduler configs (model index -> config) must agree, or their trajectories meet at
    different noise levels (the shift sets where each step lands)."""
    from multifusion.flow.schedule import schedule_difference

    first = min(schedulers, default=None)
    for j, config in schedulers.items():
        diff = schedule_difference(schedulers[first], config)
        if diff:
            raise IncompatibleModelsError(
                f"models[{j}].model: its flow-matching schedule differs from models[{first}]'s ({diff} in scheduler_config.json), "
                f"so with method {recipe.method!r}, which meets each model's own trajectory after every step, their latents "
                "would meet at different noise levels; use models of one base (one scheduler config)")


def _check_vae(i: int, m: ModelEntry, cfg: dict | None, allow_pickle: bool) -> dict | None:
    """models[i].vae resolved and, where both configs are local, checked to fit the model's
    latent space (`cfg`, returned unchanged: a VAE that fits leaves it as it is)."""
    from multifusion.loading import read_vae_config, resolve_vae, vae_mismatch

    if m.model.startswith(MERGE_PREFIX):
        raise RecipeError(f"models[{i}].vae: a merge keeps its first model's VAE; drop `vae`")
    try:
        ref = resolve_vae(m.vae, allow_pickle=allow_pickle)
    except ModelLoadError as err:
        raise type(err)(f"models[{i}].vae: {err}") from None
    vae = read_vae_config(ref)
    if cfg is None or vae is None:
        return cfg
    problem = vae_mismatch(vae, cfg["latent_channels"], cfg["scaling_factor"], cfg["vae_scale_factor"])
    if problem:
        raise IncompatibleModelsError(f"models[{i}].vae: {problem}")
    return cfg


def check_merges(recipe: Recipe) -> dict:
    """Every `merge:NAME` of `models` defined in `merges`, and every used merge checked as
    `merge_models` checks it (spec, model count, block weights against the UNet, the models
    against each other; configs and file headers only). Returns {"merge:NAME": the ModelRef of
    its first model} (whose config gives the merge's latent space)."""
    from multifusion.errors import did_you_mean

    out = {}
    for i, m in enumerate(recipe.models):
        if not m.model.startswith(MERGE_PREFIX):
            continue
        name = m.model[len(MERGE_PREFIX):]
        if name not in recipe.merges:
            known = f" (merges: {', '.join(recipe.merges)})" if recipe.merges else "; define it under `merges:`"
            raise RecipeError(f"models[{i}].model: no merge named {name!r}{known}{did_you_mean(name, recipe.merges)}")
        if m.config is not None:
            raise RecipeError(f"models[{i}].config: a merge takes its configs from its models; drop `config`")
        out[m.model] = _check_merge(name, recipe.merges[name])
    return out


def _check_merge(name: str, entry: MergeEntry):
    from multifusion.loading import resolve
    from multifusion.weights.models import plan_merge

    where = f"merges.{name}"
    for j, model in enumerate(entry.models):
        if model.startswith(MERGE_PREFIX):
            raise RecipeError(f"{where}.models[{j}]: {model!r} is a merge; a merge merges models (folders or zoo:NAME), "
                              "write the inner merge to a folder first (multifusion merge)")
    try:
        plan_merge(entry.models, entry.spec())
    except (RecipeError, ModelLoadError, IncompatibleModelsError) as err:
        raise type(err)(f"{where}: {err}") from None
    return resolve(entry.models[0])


def validate_recipe(recipe: Recipe) -> tuple[Recipe, "Params"]:
    """`validate`, returning the recipe and its validated method params."""
    v = validate(recipe)
    return v.recipe, v.params


def grid_hint(v: int, step: int, *, positive: bool = False) -> str:
    """"use A or B": the multiples of `step` around `v` (A at least `step` when `positive`)."""
    below = v // step * step
    return f"use {max(step, below) if positive else below} or {below + step}"


def check_patch_grid(height: int, width: int, patch_px: int, family: str) -> None:
    """RecipeError unless the canvas lies on the model's patch grid: a transformer sees latents
    in patches (2x2 for SD3 and FLUX), so its sides are multiples of VAE factor x patch side."""
    for side, v in (("height", height), ("width", width)):
        if v % patch_px:
            raise RecipeError(f"sampling.{side}: {v} is not a multiple of {patch_px}, the patch grid of {family} models "
                              f"(VAE factor x the transformer's patch side); {grid_hint(v, patch_px, positive=True)}")


def check_box_on_patch_grid(where: str, box: tuple[int, int, int, int], factor: int, patch_px: int, family: str) -> None:
    """RecipeError naming the coordinate of a latent `box` whose pixel position is off the model's
    patch grid (a transformer sees latents in patches: a region must be whole patches)."""
    if patch_px == factor:
        return
    for name, v in zip(("row_init", "row_end", "col_init", "col_end"), box):
        px = v * factor
        if px % patch_px:
            raise RecipeError(f"{where}.{name}: {px} px is not on the {patch_px}-pixel patch grid of {family} models (a region "
                              f"must be whole transformer patches); {grid_hint(px, patch_px)}")


def check_canvas(recipe: Recipe, method: "Method", params: "Params", factor: int, default: int | None) -> tuple[int, int] | None:
    """The canvas size (see `canvas_size`) with the method's own size checks run on it, when the
    size is known."""
    size = canvas_size(recipe, method, params, factor, default)
    if size is not None and method.check is not None:
        method.check(params, size, factor, [m.label for m in recipe.models])
    return size


def canvas_size(recipe: Recipe, method: "Method", params: "Params", factor: int, default: int | None) -> tuple[int, int] | None:
    """(height, width) in pixels: the method's own canvas (tiles), else the sampling size, else
    `default` (the model's native size). Raises RecipeError for sizes off the VAE grid or a
    sampling size contradicting the method's canvas. None when unknown yet."""
    fixed = method.canvas(params) if method.canvas else None
    h, w = recipe.sampling.height, recipe.sampling.width
    if fixed is not None:
        for side, given, need in (("height", h, fixed[0]), ("width", w, fixed[1])):
            if given is not None and given != need:
                raise RecipeError(f"sampling.{side}: {given} contradicts the tiles' canvas {side} {need}; drop sampling.{side} or change the tiles")
        h, w = fixed
    h = h or default
    w = w or default
    for side, v in (("height", h), ("width", w)):
        if v is not None and v % factor:
            raise RecipeError(
                f"sampling.{side}: {v} is not a multiple of the VAE downsampling factor {factor}; "
                f"{grid_hint(v, factor, positive=True)}"
            )
    if h is not None and w is not None:
        check_pixels(h, w, recipe.runtime.pixel_limit, "params.tiles (the canvas)" if fixed is not None else "sampling.height x sampling.width")
    return None if h is None or w is None else (h, w)
