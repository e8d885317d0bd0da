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

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from multifusion.errors import FieldError, IncompatibleModelsError, ModelLoadError, RecipeError
from multifusion.handles import ModelHandle
from multifusion.loop import Trajectory
from multifusion.method import Batch, Method, Params, Plan, RunContext
from multifusion.weights.merge import check_weights
from multifusion.weights.models import MergeSpec, local_layout, merge_in_memory
from multifusion.weights.presets import block_weights, is_number, parse_numbers, preset


class MergeParams(Params):
    merge_method: Literal["weighted_sum", "add_difference"] = Field(
        "weighted_sum", description="weighted_sum of N models, or add_difference A + alpha (B - C) of three"
    )
    weights: list[float] | None = Field(None, description="weighted_sum: one weight per model (normalised); default equal")
    alpha: float | None = Field(None, description="add_difference: A + alpha (B - C); default 1")
    text_encoder: Literal["merge", "first"] = Field("merge", description="merge the text encoders too, or keep the first model's")

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        n = (info.context or {}).get("n_models")
        if self.merge_method == "add_difference":
            if self.weights is not None:
                raise FieldError("weights", "add_difference takes `alpha` (A + alpha (B - C)), not `weights`")
            if n is not None and n != 3:
                raise FieldError("merge_method", f"add_difference merges three models (A + alpha (B - C)), the recipe names {n}")
            if self.alpha is not None and not math.isfinite(self.alpha):
                raise FieldError("alpha", f"{self.alpha!r} is not a finite number")
        elif self.alpha is not None:
            raise FieldError("alpha", "belongs to add_difference; a weighted_sum takes `weights` (one per model)")
        if self.weights is not None:
            if n is not None and len(self.weights) != n:
                raise FieldError(
                    "weights",
                    f"has {len(self.weights)} entries for {n} models; give one weight per model, in the order of `models`",
                )
            try:
                check_weights(self.weights)
            except RecipeError as err:
                raise FieldError("weights", str(err)) from None
        return self

    def spec(self) -> MergeSpec:
        return MergeSpec(
            self.merge_method,
            tuple(self.weights) if self.weights is not None else None,
            self.alpha,
            text_encoder=self.text_encoder,
        )


class MBWParams(Params):
    blocks: str | list[float] = Field(
        description=(
            "a preset name (RING08_SOFT, GRAD_V, ...), or block weights as a comma-separated string or a list: "
            "25 values (26 with a leading BASE) in the SD-1 notation, resampled to other UNets, or the denoiser's own count "
            "(SD3 and FLUX transformers: their own ids only, e.g. FLUX.1 dev's IN, D00..D18, S00..S37, OUT)"
        )
    )
    merge_method: Literal["weighted_sum", "add_difference"] = Field(
        "weighted_sum", description="weighted_sum: (1 - w) A + w B per block; add_difference: A + w (B - C) per block"
    )
    text_encoder: Literal["merge", "first"] = Field(
        "merge", description="merge the text encoders with BASE, or keep the first model's"
    )

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        context = info.context or {}
        n = context.get("n_models")
        need = 2 if self.merge_method == "weighted_sum" else 3
        if n is not None and n != need:
            raise FieldError(
                "merge_method",
                f"a block-weighted {self.merge_method} merges {need} models, the recipe names {n}"
                + ("; use add_difference for three (A + w (B - C))" if n == 3 else ""),
            )
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
        if self.merge_method == "weighted_sum":
            for block, v in named:
                if not 0 <= v <= 1:
                    where = "" if block is None else f" for {block}"
                    raise FieldError(
                        "blocks",
                        f"block weight {v!r}{where} is outside [0, 1]; a block-weighted sum interpolates "
                        "between A and B (add_difference extrapolates)",
                    )
        return self

    def spec(self) -> MergeSpec:
        blocks = self.blocks if isinstance(self.blocks, str) else tuple(self.blocks)
        return MergeSpec(self.merge_method, blocks=blocks, text_encoder=self.text_encoder)


@dataclass
class PreparedMerge:
    """A merged model and the recipe whose first model's conditioning it samples with."""

    ctx: RunContext
    params: Params
    handle: ModelHandle


def prepare_merge(ctx: RunContext, params: MergeParams | MBWParams) -> PreparedMerge:
    try:
        handle = merge_in_memory(ctx.handles, params.spec(), name=f"{ctx.recipe.method} of {', '.join(ctx.labels)}")
    except (IncompatibleModelsError, ModelLoadError) as err:  # shapes, configs; a source that is no diffusers folder
        raise type(err)(f"models: {err}") from None
    except RecipeError as err:  # block weights reach here only when the UNet's config was not local before loading
        raise RecipeError(f"{'params.blocks' if isinstance(params, MBWParams) else 'models'}: {err}") from None
    return PreparedMerge(ctx, params, handle)


def plan_merge_single(prep: PreparedMerge, batch: Batch) -> Plan:
    ctx = prep.ctx
    return Plan([Trajectory(ctx.guide(0, ctx.recipe.prompts_of(0, batch.indices), handle=prep.handle))])


METHODS = [
    Method(
        "merge",
        "weight merge (weighted sum or add-difference) of the models into one, sampled as `single` "
        "with the first model's prompt and guidance",
        "weights",
        MergeParams,
        plan_merge_single,
        prepare_merge,
        min_models=2,
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
        max_models=3,
    ),
]
