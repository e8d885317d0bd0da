"""Methods, named once and found by name.

Each method says where the models meet, how many models it takes, validates its parameters (a
pydantic model, given the number of models) and builds a `Plan` for the shared loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from multifusion.errors import RecipeError, did_you_mean
from multifusion.noise import specs as noise
from multifusion.plan import BuildContext, Params, Plan


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    meets: str  # "noise" | "latents" | "features" | "weights": where the models meet
    params: type[Params]
    build: Callable[[BuildContext, Any], Plan]
    min_models: int = 1
    max_models: int | None = None
    model_prompts: bool = True  # every model needs a prompt (False: the params carry prompts)
    # check(params, canvas_px (H, W), vae_factor, model labels): errors that need the size
    check: Callable[..., Any] | None = None
    # canvas(params) -> (H, W) in pixels when the method fixes the canvas size itself
    canvas: Callable[[Any], tuple[int, int] | None] | None = None

    def parse_params(self, raw: dict, n_models: int) -> Any:
        try:
            return self.params.model_validate(raw, context={"n_models": n_models})
        except ValidationError as err:
            msgs = []
            for e in err.errors():
                loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    msg = f"unknown parameter of method {self.name!r}"
                    if "." not in loc and "[" not in loc:
                        msg += f" (it takes: {', '.join(self.params.model_fields) or 'none'})"
                msgs.append(f"params.{loc}: {msg}" if loc else f"params: {msg}")
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(msgs)) from None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("single", "one model, as diffusers' StableDiffusionPipeline samples it", "noise",
               noise.NoParams, noise.build_single, 1, 1),
        Method("average", "weighted average of the models' guided noise predictions (MagicFusion's weighted-sum baseline)",
               "noise", noise.AverageParams, noise.build_average, 1, None),
        Method("snb", "MagicFusion saliency-aware noise blending: per pixel, the model with the strongest guidance response",
               "noise", noise.SNBParams, noise.build_snb, 2, None, check=noise.check_snb),
        Method("mod", "Mixture of Diffusers: regional prompts (each may use its own model) on one canvas, Gaussian-weighted",
               "noise", noise.ModParams, noise.build_mod, 1, None, model_prompts=False,
               check=noise.check_mod, canvas=noise.mod_canvas),
    )
}


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    raise RecipeError(f"method: unknown method {name!r} (available: {', '.join(METHODS)}){did_you_mean(name, METHODS)}")
