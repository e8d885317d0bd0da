"""The latent-level methods as the registry sees them: AMDM's parameters, checks, prepare and plan.

The maths is in `amdm.py`; this module wires one trajectory per model to the shared loop and
meets them after each scheduler step (see its docstring for the method and the deviations).

Wiring choices (each a deviation from the authors' sampler, for any diffusers scheduler):
- Every model keeps its own trajectory, scheduler (built from its own config) and initial noise;
  the specified model's noise is the images' own, so `w = 1, eta = 0` is `single` exactly.
- mu_k is model k's own stepped latent x'_k: its posterior mean for every deterministic
  scheduler (DDIM at eta 0, Euler, DPM-Solver++, UniPC, PNDM, ...). For an ancestral scheduler
  the step's fresh noise is part of x'_k, so the correction pulls toward the model's own sample
  rather than its mean.
- The window is on the trajectory (fractions, 0 = noise), or as the authors give it, step
  indices `steps: [first, last]`. Only completed steps meet (second-order schedulers such as
  Heun take two calls per step).
- After the window only the specified model is evaluated (the authors keep running the others).
- The authors' eta is a length on 4x64x64 SD latents; `correction_mode: scaled` reads it in
  those units on any latent size (times sqrt(latent size / 16384), the same fraction of a unit
  latent's norm), and the `paper` preset uses it: on SD latents it is their absolute eta exactly.
- UniPC's corrector rebuilds each new latent from the previous one, which would undo the
  aggregation: it is switched off at the step after each meeting that moves a model's latent
  (`disable_corrector`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from multifusion.errors import FieldError, RecipeError
from multifusion.families import check_same_schedule, facts_of
from multifusion.latents.amdm import aggregate, manifold_correct, slerp_aggregate, vp_weights
from multifusion.loop import Step, Trajectory, initial_noise, stream_generators
from multifusion.method import Batch, Method, Params, Plan, Recorder, RunContext
from multifusion.schedulers import in_window, timestep_fraction
from multifusion.viz import AggregationRecorder

DEFAULT_WINDOW = (0.0, 0.1)
NOISE_STREAM = zlib.crc32(b"amdm")  # the other models' initial noise: stream NOISE_STREAM + k
AUTHORS_ETA = (0.43, 0.68)
"""The authors' eta 55 (specified) and 45 (others) on 4x64x64 SD latents as fractions of
||m - mu_k|| for unit latents at w = 0.5 (`amdm` module docstring): the relative default."""
SD_LATENT_SIZE = 4 * 64 * 64
"""Elements of one SD 1.x latent at 512 px, the latents the authors' eta is a length on."""
PAPER = {"w": 0.5, "steps": (1, 3), "correction_mode": "scaled"}
PAPER_ETA = (55.0, 45.0)
"""The `paper` preset (the authors' InteractDiffusion + MIGC setting, reference code at commit
ab8e7bc, interactmigc_ui.py: omega 0.5, aggregation from loop index 1 to 3 inclusive, i.e. S = 3
corrected steps after the uncorrected first one, and a fixed-length step of 55 for the
specified model and 45 for the others, in SD latent units (`scaled`)). Fields given beside the
preset replace its values."""


class AMDMParams(Params):
    preset: Literal["paper"] | None = Field(
        None,
        description="'paper': the authors' settings (w 0.5, steps [1, 3], correction 55 for the specified model and "
        "45 for the others, scaled to SD latent units); fields given beside it replace its values",
    )
    specified: int | str = Field(0, description="index or name of the model whose image is the result")
    w: float | list[float] = Field(
        0.5,
        description="the specified model's weight in the variance-preserving aggregate "
        "(the others share sqrt(1 - w^2)); a list gives each nesting level (n - 1 values)",
    )
    window: tuple[float, float] | None = Field(
        None,
        description="aggregation window on the trajectory, 0 = noise, 1 = clean "
        "(default: the first tenth, 3 of 30 steps, and at least the first step)",
    )
    steps: tuple[int, int] | None = Field(
        None,
        description="the window as step indices [first, last], inclusive (the authors' notation, e.g. [1, 3]); replaces `window`",
    )
    correction: float | list[float] | None = Field(
        None,
        description="the paper's eta_k: length of the manifold correction, "
        "one for all or one per model (default: relative 0.43 for the specified "
        "model, 0.68 for the others)",
    )
    correction_mode: Literal["relative", "absolute", "scaled"] = Field(
        "relative",
        description="relative: a fraction of ||m - mu_k|| in [0, 1]; absolute: a latent-space length, as the authors' eta; "
        "scaled: a length in the authors' units (4x64x64 SD latents), times sqrt(latent size / 16384) on other sizes",
    )
    aggregation: Literal["linear", "slerp"] = Field("linear", description="linear (the paper) or a true slerp")

    @field_validator("specified", mode="before")
    @classmethod
    def _not_a_switch(cls, v):
        # pydantic reads `true` as the index 1: a recipe meaning "yes" would silently pick model 1.
        if isinstance(v, bool):
            raise ValueError(
                f"{str(v).lower()} is a switch, not a model; give the index (0, 1, ...) or the name of the model "
                "whose image is the result"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data, info: ValidationInfo):
        """The preset's values, under any field given beside it (a window given replaces its
        steps; its steps end at the run's last step when the run has fewer than four)."""
        if isinstance(data, dict) and data.get("preset") == "paper":
            given = dict(data)
            data = {**PAPER, **given}
            if "window" in given and "steps" not in given:
                del data["steps"]
            n_steps = (info.context or {}).get("num_inference_steps")
            if "steps" not in given and "steps" in data and n_steps is not None:
                last = max(0, min(PAPER["steps"][1], n_steps - 1))
                data["steps"] = (min(PAPER["steps"][0], last), last)
        return data

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        ctx = info.context or {}
        n, labels, steps = ctx.get("n_models"), ctx.get("labels"), ctx.get("num_inference_steps")
        if self.steps is not None and self.window is not None:
            raise FieldError("window", "give either `window` (trajectory fractions) or `steps` (step indices), not both")
        if self.window is not None and not 0.0 <= self.window[0] <= self.window[1] <= 1.0:
            raise FieldError(
                "window", f"must be [start, end] with 0 <= start <= end <= 1 (0 = pure noise, 1 = clean), got {list(self.window)}"
            )
        if self.steps is not None:
            first, last = self.steps
            if not 0 <= first <= last:
                raise FieldError("steps", f"must be [first, last] with 0 <= first <= last, got {list(self.steps)}")
            if steps is not None and last >= steps:
                raise FieldError(
                    "steps",
                    f"step {last} is past the last of {steps} steps (indices 0-{steps - 1}); "
                    "lower it or raise sampling.num_inference_steps",
                )
        if n is not None:
            self.specified_index(labels or [str(i) for i in range(n)])
            try:
                vp_weights(self.w, n)
            except ValueError as err:
                raise FieldError("w", str(err).removeprefix("w ")) from None
        c = self.correction
        etas = c if isinstance(c, list) else [] if c is None else [c]
        if n is not None and isinstance(c, list) and len(c) != n:
            raise FieldError("correction", f"has {len(c)} entries for {n} models; give one per model or a single number")
        if any(not 0.0 <= e < float("inf") for e in etas):
            raise FieldError("correction", f"must be finite and >= 0, got {c}")
        if self.correction_mode == "relative" and any(e > 1.0 for e in etas):
            raise FieldError("correction", f"with correction_mode 'relative' it is a fraction of ||m - mu_k|| in [0, 1], got {c}")
        if c is None and self.correction_mode != "relative" and self.preset is None:
            raise FieldError("correction", f"give its length in latent units with correction_mode '{self.correction_mode}'")
        return self

    def specified_index(self, labels: list[str]) -> int:
        if isinstance(self.specified, int):
            if not 0 <= self.specified < len(labels):
                raise FieldError("specified", f"index {self.specified} but the recipe has {len(labels)} model(s)")
            return self.specified
        if self.specified not in labels:
            raise FieldError("specified", f"no model named {self.specified!r} (names: {', '.join(labels)})")
        return labels.index(self.specified)

    def etas(self, n: int, specified: int) -> list[float]:
        """One eta per model, in recipe order."""
        if self.correction is None:
            default = PAPER_ETA if self.preset == "paper" and self.correction_mode != "relative" else AUTHORS_ETA
            return [default[0] if k == specified else default[1] for k in range(n)]
        return list(self.correction) if isinstance(self.correction, list) else [self.correction] * n


@dataclass(frozen=True)
class PreparedAMDM:
    ctx: RunContext
    params: AMDMParams
    specified: int
    order: list[int]  # model indices, the specified model first (the aggregate's order)
    weights: list[float]  # vp weights in `order`
    etas: list[float]  # per model, recipe order
    meets_at: list[bool]  # per step index: does this step meet?


def prepare_amdm(ctx: RunContext, params: AMDMParams) -> PreparedAMDM:
    n = len(ctx.handles)
    # Flow models' schedules must agree, or the trajectories meet at different noise levels
    # (checked before loading where the configs are local; here for every source).
    check_same_schedule(
        [(f"models[{k}]", facts_of(h)) for k, h in enumerate(ctx.handles)],
        "with method 'amdm', which meets each model's own trajectory after every step",
        "{}.model",
    )
    spec = params.specified_index(ctx.labels)
    order = [spec] + [k for k in range(n) if k != spec]
    # Which steps meet: the step indices given, or those whose timestep lies in the window (on
    # the specified model's own timesteps; every trajectory takes as many steps).
    sched = ctx.handles[spec].scheduler(ctx.recipe.sampling.scheduler, ctx.latent_shape[1:])
    sched.set_timesteps(ctx.recipe.sampling.num_inference_steps)
    num_train = len(ctx.handles[spec].alphas_cumprod)
    if params.steps is not None:
        meets = [params.steps[0] <= i <= params.steps[1] for i in range(len(sched.timesteps))]
    elif params.window is None:  # the default: the first tenth, and at least the first step
        meets = [i == 0 or in_window(timestep_fraction(t, num_train), DEFAULT_WINDOW) for i, t in enumerate(sched.timesteps)]
    else:
        meets = [in_window(timestep_fraction(t, num_train), params.window) for t in sched.timesteps]
    if not any(meets):
        fractions = ", ".join(f"{timestep_fraction(t, num_train):.3f}" for t in sched.timesteps[:4])
        raise RecipeError(
            f"params.window: {list(params.window or DEFAULT_WINDOW)} holds none of the {len(meets)} steps (their trajectory "
            f"fractions start {fractions}, ...); widen it, or give `steps` as step indices"
        )
    return PreparedAMDM(ctx, params, spec, order, vp_weights(params.w, n), params.etas(n, spec), meets)


def _scheduler(prep: PreparedAMDM, k: int):
    """Model k's own scheduler. UniPC's corrector rebuilds the next latent from the previous
    one, undoing what a meeting moved: switch it off after each meeting that moves model k (the
    specified model is not moved when it has all the weight: then m is its own step)."""
    s = prep.ctx.handles[k].scheduler(prep.ctx.recipe.sampling.scheduler, prep.ctx.latent_shape[1:])
    moved = k != prep.specified or prep.weights[0] != 1.0
    if hasattr(s, "disable_corrector") and moved:
        s.disable_corrector = [i for i, meets in enumerate(prep.meets_at) if meets]
    return s


def _record(step: Step, m: torch.Tensor, corrected: list[torch.Tensor], specified: int) -> None:
    """What the step callback may draw: each model's clean-latent prediction x0 before the
    meeting (`amdm/x0`, (N, B, C, h, w)), the x0 its corrected latent implies with the same eps
    (`amdm/x0_corrected`), and the x0 the aggregate implies for the specified model
    (`amdm/x0_aggregate`, (B, C, h, w)). A latent moved by d implies an x0 moved by
    d / sqrt(alpha_bar(t_next)) in variance-preserving latents (init_noise_sigma 1), by d in the
    sigma-scaled latents of Euler-type schedulers."""
    from multifusion.schedulers import alpha_bar_at

    def scale(k: int) -> float:
        s = step.schedulers[k]
        if hasattr(s, "latent_move_to_x0") and step.t_next[k] is not None:  # flow matching: 1 / (1 - sigma_next)
            return s.latent_move_to_x0(step.t_next[k])
        if float(s.init_noise_sigma) != 1.0 or step.t_next[k] is None:
            return 1.0
        return float(alpha_bar_at(s.alphas_cumprod, step.t_next[k])) ** -0.5

    x0 = [step.x0(k) for k in range(len(corrected))]
    step.record["amdm/x0"] = torch.stack(x0)
    step.record["amdm/x0_corrected"] = torch.stack([x0[k] + (c - step.latents[k]) * scale(k) for k, c in enumerate(corrected)])
    step.record["amdm/x0_aggregate"] = x0[specified] + (m - step.latents[specified]) * scale(specified)


def plan_amdm(prep: PreparedAMDM, batch: Batch) -> Plan:
    ctx, p = prep.ctx, prep.params
    guided = ctx.guided(batch)
    shape = tuple(batch.noise.shape[1:])
    trajectories = []
    for k, g in enumerate(guided):
        if k == prep.specified:  # the images' own noise and generators: as `single` draws them
            trajectories.append(Trajectory(g, _scheduler(prep, k), batch.noise))
        else:
            gens = stream_generators(batch.seeds, NOISE_STREAM + k)
            trajectories.append(Trajectory(g, _scheduler(prep, k), initial_noise(shape, gens), gens))
    last_meeting = max((i for i, m in enumerate(prep.meets_at) if m), default=-1)
    mix = slerp_aggregate if p.aggregation == "slerp" else aggregate
    relative = p.correction_mode == "relative"
    scale = math.sqrt(math.prod(shape) / SD_LATENT_SIZE) if p.correction_mode == "scaled" else 1.0
    etas = [e * scale for e in prep.etas]

    def meet(step: Step) -> list[torch.Tensor | None]:
        xs = list(step.latents)
        completed = all(getattr(s, "state_in_first_order", True) for s in step.schedulers)
        if completed and step.step < len(prep.meets_at) and prep.meets_at[step.step] and all(x is not None for x in xs):
            m = mix([xs[k] for k in prep.order], prep.weights)  # mu_k = x'_k: each model's own step
            corrected = [manifold_correct(m, xs[k], etas[k], relative=relative) for k in range(len(xs))]
            if step.recording:
                _record(step, m, corrected, prep.specified)
            xs = corrected
        if completed and step.step >= last_meeting:  # past the window only the specified model matters
            xs = [x if k == prep.specified else None for k, x in enumerate(xs)]
        return xs

    return Plan(trajectories, meet=meet, output=prep.specified)


def amdm_recorders(vae) -> list[Recorder]:
    return [AggregationRecorder(vae)]


METHODS = [
    Method(
        "amdm",
        "AMDM: every model on its own latent trajectory, aggregated (variance-preserving) into the specified "
        "model's and corrected toward each model's own step in the first steps",
        "latents",
        AMDMParams,
        plan_amdm,
        prepare_amdm,
        min_models=2,
        recorders=amdm_recorders,
    ),
]
