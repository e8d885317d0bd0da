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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from multifusion.errors import ModelLoadError, RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One model of a recipe, with its own conditioning."""

    model: str = Field(min_length=1, description="diffusers folder, Hub id, .safetensors file or zoo:NAME")
    name: str | None = None
    config: str | None = Field(None, description="diffusers config folder for a single-file checkpoint")
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(None, ge=0)

    @property
    def label(self) -> str:
        return self.name or self.model


class Sampling(_Strict):
    num_inference_steps: int = Field(30, gt=0, le=1000)
    scheduler: str = "ddim"
    guidance_scale: float = Field(7.5, ge=0)
    eta: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0, lt=2**63)
    num_images: int = Field(1, gt=0, le=4096)
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)


class Runtime(_Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    offload: bool = False
    allow_pickle: bool = False
    vae_device: str | None = Field(None, description="run the VAE here (e.g. cpu, in float32) to spare accelerator memory on large canvases")

    @model_validator(mode="after")
    def _device(self):
        for field, value in (("device", self.device), ("vae_device", self.vae_device)):
            if value is not None and value.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
                raise ValueError(f"{field} {value!r} is not one of cpu, cuda[:N], mps, xpu")
        return self


class Recipe(_Strict):
    version: Literal[1] = 1
    method: str = "single"
    models: list[ModelEntry] = Field(min_length=1)
    prompt: str | None = Field(None, description="default prompt of models that give none")
    negative_prompt: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    sampling: Sampling = Field(default_factory=Sampling)
    runtime: Runtime = Field(default_factory=Runtime)

    def prompt_of(self, i: int) -> str:
        return self.models[i].prompt if self.models[i].prompt is not None else self.prompt  # type: ignore[return-value]

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


def _format_pydantic(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `multifusion generate --help`)"
        got = e.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) and e["type"] != "missing" else ""
        lines.append(f"{loc or 'recipe'}: {msg}{shown}")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def parse_recipe(data: dict | str | Path) -> Recipe:
    """Read and validate a recipe's structure (types, ranges). See `validate_recipe` for the
    checks that need the method registry and the model files."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:  # yaml and json errors alike
            raise RecipeError(f"recipe file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {err}") from err
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_pydantic(err)) from None


def validate_recipe(recipe: Recipe) -> tuple[Recipe, Any]:
    """Every check that can run before a model loads: the method exists and accepts this many
    models and these params; every model reference resolves (pickles refused); the image size is
    a multiple of the VAE factor of every model whose config is local. Returns the recipe and the
    validated method params."""
    from multifusion.loading import read_local_config, resolve
    from multifusion.loop import scheduler_class
    from multifusion.registry import get_method

    method = get_method(recipe.method)
    n = len(recipe.models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = f"exactly {method.min_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
        raise RecipeError(f"models: method {method.name!r} takes {want} model(s), the recipe names {n}")
    params = method.parse_params(recipe.params, n)
    if method.model_prompts:
        for i, m in enumerate(recipe.models):
            if m.prompt is None and recipe.prompt is None:
                raise RecipeError(f"models[{i}]: no prompt, and the recipe has no default `prompt`; give one")
    scheduler_class(recipe.sampling.scheduler)
    factor = None
    for i, m in enumerate(recipe.models):
        try:
            ref = resolve(m.model, config=m.config, allow_pickle=recipe.runtime.allow_pickle)
        except ModelLoadError as err:
            raise type(err)(f"models[{i}].model: {err}") from None
        cfg = read_local_config(ref)
        if cfg is not None and i == 0:
            factor = cfg["vae_scale_factor"]
    if factor is not None:
        size = canvas_size(recipe, method, params, factor, default=None)
        if size is not None and method.check is not None:
            method.check(params, size, factor, [m.label for m in recipe.models])
    return recipe, params


def canvas_size(recipe: Recipe, method, params, factor: int, default: int | None) -> tuple[int, int] | None:
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
                f"use {max(factor, v // factor * factor)} or {(v // factor + 1) * factor}"
            )
    return None if h is None or w is None else (h, w)
