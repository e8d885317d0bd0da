"""The weight-level methods as the registry sees them: `merge` and `mbw`.

Both merge the recipe's models in memory in `prepare` (`merge_in_memory` over the handles the
run loaded already, so no weights are read twice) into one `ModelHandle`, and sample it as
`single` does in `plan`: with the first model's prompt, negative prompt and guidance scale (a
merged model is one model; the other models' prompts are not used). The maths is in
`merge.py`, the whole-model merge in `models.py` (docs/merges.md).

Parameters are checked before loading, naming the field: weights against the number of models,
presets by name (with "did you mean"), block weights against the first model's denoiser when
its config is local (on a UNet a preset or 25/26 SD-1 values are resampled to its depth; an SD3
or FLUX transformer takes its own ids, docs/merges.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, create_model, model_validator

from multifusion.errors import FieldError, IncompatibleModelsError, ModelLoadError, RecipeError
from multifusion.handles import ModelHandle
from multifusion.loop import Trajectory
from multifusion.method import Batch, Method, Params, Plan, RunContext
from multifusion.recipe import MERGE_PREFIX
from multifusion.weights.merge import MERGE_METHODS
from multifusion.weights.models import MergeSpec, block_weights_problem, local_layout, merge_in_memory, merge_tree
from multifusion.weights.presets import block_weights, is_number, parse_numbers, preset
from multifusion.weights.registry import MergeSpecError


def _hyper_fields(exclude: tuple[str, ...] = ()) -> dict:
    """One optional pydantic field per hyper-parameter of the registered merge methods (the union;
    `MergeSpec` then checks which the chosen method takes, and its range, from its signature)."""
    owners: dict[str, list] = {}
    for m in MERGE_METHODS.values():
        for name, h in m.hypers.items():
            if name not in exclude:
                owners.setdefault(name, []).append((m.name, h))
    fields = {}
    for name, pairs in owners.items():
        kind = int if all(h.integer for _, h in pairs) else float
        what = "; ".join(f"{m}: {h.range or 'see docs/merges.md'}, default {h.default}" for m, h in pairs)
        fields[name] = (kind | None, Field(None, description=what))
    return fields


def _spec_or_field_error(params, **spec) -> MergeSpec:
    try:
        return MergeSpec(**spec)
    except MergeSpecError as err:
        raise FieldError("merge_method" if err.field == "method" else err.field, err.message) from None


def _options(params, exclude: tuple[str, ...]) -> dict:
    extra = set(type(params).model_fields) - {"merge_method", "text_encoder", "blocks", *exclude}
    return {k: getattr(params, k) for k in sorted(extra) if getattr(params, k) is not None}


class _MergeParams(Params):
    merge_method: Literal[tuple(MERGE_METHODS)] = Field(  # type: ignore[valid-type]
        "weighted_sum", description="a registered merge method (docs/merges.md); weighted_sum of N models by default"
    )
    weights: list[float] | None = Field(None, description="weighted_sum: one weight per model (normalised); default equal")
    alpha: float | None = Field(
        None, description="add_difference: A + alpha (B - C), default 1; ties, dare, dare_ties: the scale of the merged delta"
    )
    text_encoder: Literal["merge", "first"] = Field("merge", description="merge the text encoders too, or keep the first model's")

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        spec = self.spec()
        n = (info.context or {}).get("n_models")
        if n is not None:
            try:
                spec.check_models(n)
            except MergeSpecError as err:
                raise FieldError("merge_method" if err.field == "method" else err.field, err.message) from None
        return self

    def spec(self) -> MergeSpec:
        return _spec_or_field_error(
            self,
            method=self.merge_method,
            weights=tuple(self.weights) if self.weights is not None else None,
            alpha=self.alpha,
            text_encoder=self.text_encoder,
            options=_options(self, ("weights", "alpha")),
        )


MergeParams = create_model("MergeParams", __base__=_MergeParams, **_hyper_fields(("weights", "alpha")))
MergeParams.__doc__ = "The `merge` method's params: a MergeSpec without block weights (hyper-parameters by name)."

_RATIO_METHODS = tuple(m.name for m in MERGE_METHODS.values() if m.ratio is not None)


class _MBWParams(Params):
    blocks: str | list[float] = Field(
        description=(
            "a preset name (RING08_SOFT, GRAD_V, ...), or block weights as a comma-separated string or a list: "
            "25 values (26 with a leading BASE) in the SD-1 notation, resampled to other UNets, or the denoiser's own count "
            "(SD3 and FLUX transformers: their own ids only, e.g. FLUX.1 dev's IN, D00..D18, S00..S37, OUT)"
        )
    )
    merge_method: Literal[_RATIO_METHODS] = Field(  # type: ignore[valid-type]
        "weighted_sum",
        description=(
            "the method whose ratio the blocks set: weighted_sum (1 - w) A + w B; add_difference A + w (B - C); "
            "slerp t = w; ties, dare, dare_ties alpha = w"
        ),
    )
    text_encoder: Literal["merge", "first"] = Field(
        "merge", description="merge the text encoders with BASE, or keep the first model's"
    )

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        context = info.context or {}
        n = context.get("n_models")
        spec = self.spec()
        method = spec.merge_method
        if n is not None and method.block_models is not None and n != method.block_models:
            raise FieldError(
                "merge_method",
                f"a block-weighted {self.merge_method} merges {method.block_models} models, the recipe names {n}"
                + ("; use add_difference for three (A + w (B - C))" if n == 3 else ""),
            )
        if n is not None:
            try:
                spec.check_models(n)
            except MergeSpecError as err:
                raise FieldError("merge_method" if err.field == "method" else err.field, err.message) from None
        try:
            layout = local_layout(context["models"][0]) if context.get("models") else None
            if layout is not None:
                named = block_weights(self.blocks, layout)[0].named(layout)
            elif isinstance(self.blocks, str) and "," not in self.blocks and not is_number(self.blocks):
                named = [(None, v) for v in preset(self.blocks).values]  # "did you mean" on typos
            else:  # the denoiser's config is not local: numbers now, their count after loading
                named = [(None, v) for v in parse_numbers(self.blocks)]
        except RecipeError as err:
            raise FieldError("blocks", str(err)) from None
        problem = block_weights_problem(method, named)
        if problem:
            raise FieldError("blocks", problem)
        return self

    def spec(self) -> MergeSpec:
        blocks = self.blocks if isinstance(self.blocks, str) else tuple(self.blocks)
        return _spec_or_field_error(
            self,
            method=self.merge_method,
            blocks=blocks,
            text_encoder=self.text_encoder,
            options=_options(self, ("weights", "alpha", "t")),
        )


MBWParams = create_model("MBWParams", __base__=_MBWParams, **_hyper_fields(("weights", "alpha", "t")))
MBWParams.__doc__ = "The `mbw` method's params: block weights setting the ratio of a registered merge method."


@dataclass
class PreparedMerge:
    """A merged model and the recipe whose first model's conditioning it samples with."""

    ctx: RunContext
    params: Params
    handle: ModelHandle


def prepare_merge(ctx: RunContext, params: MergeParams | MBWParams) -> PreparedMerge:
    name = f"{ctx.recipe.method} of {', '.join(ctx.labels)}"
    names = [m.model for m in ctx.recipe.models]
    for i, h in enumerate(ctx.handles):  # handles given from Python (a recipe's are checked before loading)
        quantized = h.quantized_components()
        if quantized:
            raise RecipeError(
                f"models[{i}]: method {ctx.recipe.method!r} merges full-precision weights, and this model's "
                f"{', '.join(quantized)} holds quantized ones; merge the unquantized models"
            )
        if h.device != ctx.handles[0].device:
            raise RecipeError(
                f"models[{i}]: on {h.device}, models[0] on {ctx.handles[0].device}; method {ctx.recipe.method!r} merges "
                "weights in one place: load the models on one device"
            )
    if any(n.startswith(MERGE_PREFIX) for n in names):
        # A merge of the recipe's merges: merged from the files, the inner merges computed on the
        # way (a loaded merge has no files of its own to plan from). Offloaded: merged on the CPU,
        # then moved by the run's offloader like every model.
        rt = ctx.recipe.runtime
        models = [
            merge_tree(n[len(MERGE_PREFIX) :], ctx.recipe.merges, MERGE_PREFIX) if n.startswith(MERGE_PREFIX) else n
            for n in names
        ]
        handle = merge_in_memory(models, params.spec(), name=name, dtype=rt.dtype, device="cpu" if rt.offload else rt.device)
        if rt.offload:
            handle = replace(handle, device=torch.device(rt.device), offloader=ctx.handles[0].offloader)
        return PreparedMerge(ctx, params, handle)
    try:
        handle = merge_in_memory(ctx.handles, params.spec(), name=name)
    except (IncompatibleModelsError, ModelLoadError) as err:  # shapes, configs; a source that is no diffusers folder
        raise type(err)(f"models: {err}") from None
    except RecipeError as err:  # block weights reach here only when the UNet's config was not local before loading
        raise RecipeError(f"{'params.blocks' if isinstance(params, MBWParams) else 'models'}: {err}") from None
    return PreparedMerge(ctx, params, handle)


def plan_merge_single(prep: PreparedMerge, batch: Batch) -> Plan:
    ctx = prep.ctx
    return Plan([Trajectory(ctx.guide(0, ctx.recipe.prompts_of(0, batch.indices), handle=prep.handle))])


MERGES_READ_WEIGHTS = (
    "a weight merge reads each model's own tensors, and a model given as a base with LoRAs holds the base's "
    "tensors with its adapters beside them"
)

METHODS = [
    Method(
        "merge",
        "weight merge (weighted sum, add-difference, TIES, DARE, Model Stock, SLERP, ...) of the models into one, "
        "sampled as `single` "
        "with the first model's prompt and guidance",
        "weights",
        MergeParams,
        plan_merge_single,
        prepare_merge,
        min_models=2,
        own_denoisers=MERGES_READ_WEIGHTS,
    ),
    Method(
        "mbw",
        "merge-block-weighted: per-block weights (a preset or A1111 string) merge the models into one, "
        "sampled as `single` with the first model's prompt and guidance",
        "weights",
        MBWParams,
        plan_merge_single,
        prepare_merge,
        min_models=2,
        own_denoisers=MERGES_READ_WEIGHTS,
    ),
]
