"""Methods, named once and found by name.

Each method says how many models it takes, validates its parameters (a pydantic model) and
builds a `Plan` from guided models: the denoiser(s) for the shared loop and, for trajectory
methods, the `meet` applied to the latents after each step.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from multifusion.errors import RecipeError
from multifusion.handles import Guided, NoiseFn
from multifusion.noise.average import Average


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


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    meets: str  # "noise" | "latents" | "features" | "weights": where the models meet
    params: type[Params]
    build: Callable[[list[Guided], Any], Plan]
    min_models: int = 1
    max_models: int | None = None

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
    )
}


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"method: unknown method {name!r} (available: {', '.join(METHODS)}){hint}")
