"""The feature-level method as the registry sees it: `afa`'s parameters, prepare and plan.

`prepare` loads the trained aggregators (`params.aggregator`: a folder written by
`multifusion afa train`, or `zoo:NAME` for a shipped one; by default the shipped ones trained
for exactly the recipe's models, e.g. `zoo:afa-slices` for slice0 + slice1), checks them against the recipe's
models (content hashes, order, UNet configuration), and builds one `EnsembleHandle` over the
models; `plan` is `single`'s on that handle. The loop never learns about features.

Conditioning: model i embeds its own recipe prompt (and negative prompt) with its own text
encoder; guidance is applied once, to the ensemble's prediction, with the first model's
guidance scale (the ensemble is one denoiser).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from pydantic import Field, field_validator

from multifusion.errors import IncompatibleModelsError, RecipeError
from multifusion.features.ensemble import EnsembleHandle, model_hash
from multifusion.features.walkers import build_ensemble, walker_for
from multifusion.handles import Guided
from multifusion.loop import Trajectory
from multifusion.method import Batch, Method, Params, Plan, Recorder, RunContext
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
                f"params.aggregator: no shipped aggregators were trained for {', '.join(ctx.labels)} in this order; "
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
    ),
]
