"""Methods, named once and found by name.

Each method says how many models it takes, validates its parameters (a pydantic model) and
builds a `Plan` from guided models: the denoiser(s) for the shared loop and, for trajectory
methods, the `meet` applied to the latents after each step.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from multifusion.errors import RecipeError
from multifusion.handles import Guided, NoiseFn
from multifusion.noise.average import Average
from multifusion.noise.snb import SNB


@dataclass
class Plan:
    """What the shared loop runs: one denoiser per trajectory and an optional latent `meet`."""

    denoise: list[NoiseFn]
    meet: Callable | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    pass


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
        if any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return v


class SNBParams(Params):
    k: float | list[float] = Field(1.0, description="softmax temperature k_i per model (one value for all, or a list)")
    blur: Literal["box", "gaussian", "none"] = "box"
    blur_size: int = Field(4, ge=1, description="box blur width in latent pixels")
    blur_sigma: float = Field(1.0, gt=0, description="Gaussian blur std in latent pixels")
    window: tuple[float, float] = Field((0.0, 1.0), description="fusion window on the trajectory, 0 = noise, 1 = clean")
    fusion_timestep: int | None = Field(None, ge=0, description="t_s in training timesteps; replaces `window`")
    fusion: Literal["late", "early"] = Field("late", description="with fusion_timestep: fuse for t <= t_s (late) or t > t_s (early)")
    temperature: float | None = Field(None, gt=0, description="soft mask over models instead of argmax")

    @field_validator("k")
    @classmethod
    def _k(cls, v, info: ValidationInfo):
        ks = v if isinstance(v, list) else [v]
        if any(k <= 0 for k in ks):
            raise ValueError(f"every k must be > 0 (got {v}); k scales the salience before the spatial softmax")
        n = (info.context or {}).get("n_models")
        if isinstance(v, list) and n is not None and len(v) != n:
            raise ValueError(f"has {len(v)} entries for {n} models; give one k per model or a single number")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        if not (0.0 <= v[0] <= v[1] <= 1.0):
            raise ValueError(f"must be [start, end] with 0 <= start <= end <= 1 (0 = pure noise, 1 = clean), got {list(v)}")
        return v

    def fusion_window(self, num_train_timesteps: int) -> tuple[float, float]:
        if self.fusion_timestep is None:
            return self.window
        edge = 1.0 - self.fusion_timestep / (num_train_timesteps - 1)
        return (edge, 1.0) if self.fusion == "late" else (0.0, edge)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    meets: str  # "noise" | "latents" | "features" | "weights": where the models meet
    params: type[Params]
    build: Callable[[list[Guided], Any], Plan]
    min_models: int = 1
    max_models: int | None = None
    check_latent: Callable[[Any, tuple[int, ...]], None] | None = None  # params, (C, h, w)

    def parse_params(self, raw: dict, n_models: int) -> Any:
        try:
            return self.params.model_validate(raw, context={"n_models": n_models})
        except ValidationError as err:
            msgs = []
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    known = ", ".join(self.params.model_fields) or "none"
                    msg = f"unknown parameter of method {self.name!r} (it takes: {known})"
                msgs.append(f"params.{loc}: {msg}")
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(msgs)) from None


def _build_single(guided: list[Guided], params: NoParams) -> Plan:
    return Plan([guided[0]])


def _build_average(guided: list[Guided], params: AverageParams) -> Plan:
    weights = params.weights or [1.0] * len(guided)
    return Plan([Average(guided, weights)])


def _build_snb(guided: list[Guided], params: SNBParams) -> Plan:
    k = params.k if isinstance(params.k, list) else [params.k] * len(guided)
    window = params.fusion_window(len(guided[0].handle.alphas_cumprod))
    return Plan([SNB(guided, k, params.blur, params.blur_size, params.blur_sigma, window, params.temperature)])


def _check_snb(params: SNBParams, latent_shape: tuple[int, ...]) -> None:
    h, w = latent_shape[-2:]
    if params.blur == "box" and params.blur_size > min(h, w):
        raise RecipeError(f"params.blur_size: {params.blur_size} is larger than the latent ({h}x{w}); use at most {min(h, w)}")
    if params.blur == "gaussian" and 2 * math.ceil(2 * params.blur_sigma) + 1 > min(h, w):
        raise RecipeError(f"params.blur_sigma: a Gaussian of std {params.blur_sigma} is wider than the latent ({h}x{w})")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("single", "one model, as diffusers' StableDiffusionPipeline samples it", "noise", NoParams, _build_single, 1, 1),
        Method(
            "average",
            "weighted average of the models' guided noise predictions (MagicFusion's weighted-sum baseline)",
            "noise",
            AverageParams,
            _build_average,
            1,
            None,
        ),
        Method(
            "snb",
            "MagicFusion saliency-aware noise blending: per pixel, the model with the strongest guidance response",
            "noise",
            SNBParams,
            _build_snb,
            2,
            None,
            _check_snb,
        ),
    )
}


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"method: unknown method {name!r} (available: {', '.join(METHODS)}){hint}")
