"""Recipes: the models, the method and its parameters, prompts and sampling settings.

A recipe is a YAML or JSON file (or a dict). This module is its schema (pydantic: structure,
types, ranges); `multifusion.validate` checks the rest before any model loads (the method and its
params, the model files, the canvas). Errors name the field (``models[1].model``,
``sampling.height``) and what to change.

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
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from multifusion.canvas import pixels_problem
from multifusion.errors import FieldError, RecipeError, clip, did_you_mean, format_validation_error

MAX_GUIDANCE = 100.0
"""Guidance scales above this are refused: classifier-free guidance is useful up to ~30, and
scales like 1e30 overflow the latents to an all-black image."""

MAX_PIXELS = 4096 * 4096
"""Default `runtime.max_pixels`: the largest canvas (height x width, one image) a run accepts
unless the recipe raises the limit on purpose."""

DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")

MAX_YAML_NODES = 100_000
"""A YAML recipe expanding (through its aliases) to more values than this is refused: nested
aliases of a few hundred bytes can expand to gigabytes ("billion laughs")."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of a recipe (at any depth) is finite; YAML `.nan` or
    # `.inf` is an error naming the field, never a silently black image.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


MAX_LORA_SCALE = 100.0
"""LoRA scales beyond +-this are refused: LoRAs are applied at about -2..2, and a huge scale
overflows the denoiser's activations to an all-black image."""


class LoraEntry(_Strict):
    """A LoRA applied to a model entry's base, as diffusers' `load_lora_weights` +
    `set_adapters(names, adapter_weights=scales)` apply it (`multifusion.lora`)."""

    path: str = Field(min_length=1, description="a LoRA .safetensors file (diffusers/peft or kohya/A1111), or its folder")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="the adapter weight (set_adapters)")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+$",
        max_length=64,
        description="the adapter's name (default: the file's stem); letters, digits, _ and -",
    )


QUANT_WEIGHTS = {
    "torchao": ("int8", "int8_dynamic", "int4", "float8"),
    "bitsandbytes": ("int8", "nf4", "fp4"),
    "gguf": (),
}
"""The weight formats each quantization backend offers (`multifusion.quantize` maps them to
diffusers' and transformers' configs): torchao's int8 (weight-only), int8_dynamic (int8 weights
and activations), int4 (weight-only) and float8 (weight-only); bitsandbytes' LLM.int8, NF4 and
FP4. A GGUF file holds its own (Q8_0, Q4_K, ...)."""


class Quantize(_Strict):
    """How a model's large modules load quantized, through diffusers' own quantization support
    (docs/quantization.md)."""

    backend: Literal["torchao", "bitsandbytes", "gguf"] = Field(
        "torchao", description="torchao (CPU and GPUs), bitsandbytes (CUDA) or gguf (the denoiser from a .gguf file)"
    )
    weights: str | None = Field(
        None, description="torchao: int8 (default), int8_dynamic, int4, float8; bitsandbytes: int8 (default), nf4, fp4"
    )
    file: str | None = Field(None, min_length=1, description="gguf: the denoiser's .gguf file (Q8_0, Q4_K, ...)")
    components: list[Literal["denoiser", "t5"]] = Field(
        default_factory=lambda: ["denoiser"],
        min_length=1,
        description="what loads quantized: the denoiser (UNet or transformer) and/or the T5 text encoder (SD3, FLUX)",
    )

    @property
    def format(self) -> str | None:
        """The weights' format: `weights`, int8 by default; None for a GGUF file (it holds its own)."""
        return None if self.backend == "gguf" else (self.weights or "int8")

    @model_validator(mode="after")
    def _known(self):
        if self.backend == "gguf":
            if self.file is None:
                raise FieldError("file", "the gguf backend loads the denoiser from a .gguf file; name it (file: model-Q8_0.gguf)")
            if self.weights is not None:
                raise FieldError("weights", "a GGUF file holds its own format (Q8_0, Q4_K, ...); drop `weights`")
            if self.components != ["denoiser"]:
                raise FieldError("components", "a GGUF file holds the denoiser only; give components: [denoiser]")
            if not self.file.lower().endswith(".gguf"):
                raise FieldError("file", f"{self.file!r} is not a .gguf file")
            return self
        if self.file is not None:
            raise FieldError(
                "file",
                f"`file` is the gguf backend's (a .gguf denoiser); {self.backend} quantizes the model's own weights: drop it",
            )
        offered = QUANT_WEIGHTS[self.backend]
        if self.weights is not None and self.weights not in offered:
            raise FieldError(
                "weights",
                f"{self.weights!r} is not a {self.backend} format; give one of {', '.join(offered)}"
                f"{did_you_mean(self.weights, offered)}",
            )
        if len(set(self.components)) != len(self.components):
            raise FieldError("components", f"{self.components} names a component twice; name each once")
        return self


class ModelEntry(_Strict):
    """One model of a recipe, with its own conditioning."""

    model: str = Field(min_length=1, description="diffusers folder, Hub id, .safetensors file or zoo:NAME")
    name: str | None = Field(None, description="how regions and amdm's `specified` name this model (default: `model`)")
    config: str | None = Field(None, description="diffusers config folder for a single-file checkpoint")
    vae: str | None = Field(
        None,
        min_length=1,
        description="a VAE in place of the model's own (e.g. the fp16-fix SDXL VAE): "
        "a diffusers VAE folder or a single .safetensors VAE file",
    )
    prompt: str | list[str] | None = Field(None, description="one prompt for every image, or a list with one per image")
    negative_prompt: str | None = Field(None, description="default: the recipe's negative_prompt")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="default: sampling.guidance_scale")
    # None rather than []: recipes without LoRAs keep the JSON they had (an image's metadata,
    # compared when a run resumes).
    loras: list[LoraEntry] | None = Field(
        None, description="LoRAs applied to this model (models sharing a base and differing in LoRAs hold it once)"
    )
    quantize: Quantize | None = Field(
        None, description="load the denoiser (and T5) quantized: {backend: torchao, weights: int8, components: [denoiser]}"
    )
    device: str | None = Field(None, description="where this model runs (cpu, cuda:N, ...); default runtime.device")
    true_cfg_scale: float | None = Field(
        None,
        ge=1,
        le=MAX_GUIDANCE,
        description=(
            "FLUX only: true classifier-free guidance with the negative prompt, a second pass per step (FluxPipeline's "
            "true_cfg_scale; 1 = off, the default); guidance_scale stays the distilled guidance"
        ),
    )

    @property
    def label(self) -> str:
        return self.name or self.model

    def loaded_as(self) -> tuple:
        """What decides the loaded model: two entries equal here are one model."""
        return (self.model, self.config, self.vae, self.loras or [], self.quantize, self.device)

    @model_validator(mode="after")
    def _device(self):
        if self.device is not None and self.device.split(":")[0] not in DEVICE_KINDS:
            raise FieldError("device", f"{self.device!r} is not one of cpu, cuda[:N], mps, xpu[:N]")
        return self


class MergeEntry(_Strict):
    """A model merged from others before sampling, named in `models` as `merge:NAME`: the
    fields of `multifusion.weights.MergeSpec` (`weights.models.spec_of`; see docs/merges.md) and
    the models it merges (folders, zoo:NAME, or other merges as merge:NAME, without cycles). Any other key is a
    hyper-parameter of the method (`density: 0.3` for ties), checked with the spec against the
    method's registered signature (`validate`), not here: this is data."""

    model_config = ConfigDict(extra="allow")

    models: list[str] = Field(min_length=1, description="the models merged, in order (A, B[, C])")
    method: str = Field("weighted_sum", description="a registered merge method (docs/merges.md)")
    weights: list[float] | None = Field(None, description="weighted_sum: one weight per model (normalised); default equal")
    alpha: float | None = Field(None, description="add_difference: A + alpha (B - C); default 1")
    blocks: str | list[float] | None = Field(None, description="block weights: a preset name, an A1111 string or a list")
    text_encoder: Literal["merge", "first"] = "merge"


MERGE_PREFIX = "merge:"


def weights_problem(weights) -> str | None:
    """The one rule for weights that mix models by normalising (`average`'s noise weights, a
    merge's weighted sum): each finite and >= 0, the sum positive and finite. A finite sum
    matters: [1e308, 1e308] sums to inf, and every weight over that sum is 0 (an all-zero model,
    or noise). None when they are fine, else what is wrong, quoting them."""
    values = [float(w) for w in weights]
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            return f"weight {w!r} of model {i} is not a finite number >= 0; weights mix the models (each >= 0, normalised by their sum)"
    total = sum(values)
    if not math.isfinite(total):
        return f"weights {values} sum beyond the largest float (their sum overflows); scale them down, e.g. to sum to 1"
    if total <= 0:
        return f"weights {values} sum to zero; give at least one model a positive weight"
    return None


class Sampling(_Strict):
    num_inference_steps: int = Field(30, gt=0, le=1000)
    scheduler: str = "ddim"
    guidance_scale: float = Field(7.5, ge=0, le=MAX_GUIDANCE)
    eta: float = Field(
        0.0, ge=0, le=1, description="DDIM-type noise: 0 deterministic, 1 DDPM-like; above 1 the step's variance is undefined"
    )
    seed: int = Field(0, ge=0, lt=2**63)
    num_images: int = Field(1, gt=0, le=4096)
    height: int | None = Field(None, gt=0, description="default: the first model's native size")
    width: int | None = Field(None, gt=0, description="default: the first model's native size")

    @model_validator(mode="after")
    def _last_seed(self):
        # Image i has seed + i, written into its metadata and read back as a recipe seed.
        last = self.seed + self.num_images - 1
        if last >= 2**63:
            raise FieldError(
                "seed",
                f"{self.seed} + {self.num_images} images reaches seed {last}, beyond the largest "
                f"seed 2^63 - 1; use a seed <= {2**63 - self.num_images}",
            )
        return self


class Runtime(_Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    offload: bool = False
    allow_pickle: bool = False
    vae_device: str | None = Field(
        None, description="run the VAE here (e.g. cpu, in float32) to spare accelerator memory on large canvases"
    )
    # None = MAX_PIXELS. Optional so that recipes that do not set it keep the JSON they had (an
    # image's metadata, compared when a run resumes).
    max_pixels: int | None = Field(
        None,
        gt=0,
        description=f"largest canvas (height x width, one image) accepted (default {MAX_PIXELS}); "
        "raise it on purpose for larger ones",
    )

    max_memory_gib: float | None = Field(
        None,
        gt=0,
        description="memory the run may take for batched denoiser calls, GiB (Mixture of Diffusers' tile batch); "
        "default: 90% of the device's free memory when a batch of images is planned (host memory on cpu)",
    )

    # None = off (the JSON of recipes that do not set it stays as it was, as for max_pixels)
    compile: bool | None = Field(
        None,
        description="torch.compile each model's denoiser once per run (static shapes: one graph per input shape, "
        "shared by every step and by regions of one size); the first call of each shape compiles",
    )

    @field_validator("compile")
    @classmethod
    def _off_is_unset(cls, v: bool | None) -> bool | None:
        # false and unset are one setting (off), held as None: a form's unticked box and a recipe
        # that never set it read back equal, and the JSON stays as it was.
        return v or None

    @property
    def pixel_limit(self) -> int:
        return MAX_PIXELS if self.max_pixels is None else self.max_pixels

    @model_validator(mode="after")
    def _device(self):
        for field, value in (("device", self.device), ("vae_device", self.vae_device)):
            if value is not None and value.split(":")[0] not in DEVICE_KINDS:
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
                raise ValueError(
                    f"models[{i}].prompt has {len(m.prompt)} prompts for {self.sampling.num_images} images "
                    "(sampling.num_images); give one prompt per image, or a single prompt"
                )
        labels = [m.label for m in self.models]
        for i, m in enumerate(self.models):
            # A region or `specified` names a model by its label: a name two different models
            # answer to is ambiguous. (One model listed twice under one label is fine, the weights
            # being the same: fusing a model with itself is how the degenerate cases are tested.)
            earlier = [j for j in range(i) if labels[j] == labels[i] and self.models[j].loaded_as() != m.loaded_as()]
            named = [k for k in (*earlier, i) if self.models[k].name is not None]
            if earlier and not named and (self.models[earlier[0]].loras or []) != (m.loras or []):
                # One base with other LoRAs is another model: a region or `specified` could not tell them apart.
                raise FieldError(
                    f"models[{i}].name",
                    f"models[{earlier[0]}] and models[{i}] are both {labels[i]!r} with different LoRAs; "
                    "give each a `name` (regions and amdm's `specified` name models by it)",
                )
            if earlier and named:
                k = i if i in named else named[0]
                raise FieldError(
                    f"models[{k}].name",
                    f"{labels[i]!r} names both models[{earlier[0]}] and models[{i}]; give each model its own name",
                )
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


def parse_recipe(data: dict | str | Path) -> Recipe:
    """Read and validate a recipe's structure (types, ranges). `multifusion.validate` has the
    checks that need the method registry and the model files."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(
                f"recipe file {str(path)!r} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                "save it as UTF-8"
            ) from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:  # yaml and json errors alike
            raise RecipeError(
                f"recipe file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {clip(str(err), 1000)}"
            ) from None
        if _expanded_size(data, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise RecipeError(
                f"recipe file {str(path)!r} expands to more than {MAX_YAML_NODES:,} values (nested YAML "
                "aliases?); a recipe is refused rather than expanded"
            )
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err)) from None
