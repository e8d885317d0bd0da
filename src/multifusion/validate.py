"""Recipe validation: every check that can run before a model loads, and the few that need the
loaded models' families.

The recipe itself (`multifusion.recipe`) is data; this module looks methods up in the registry,
reads model configs (`loading.read_facts`) and merge plans, and runs the one compatibility check
of model families (`families.check_compatible`), the method's params and size checks, and the
canvas geometry (`multifusion.canvas`). Methods never import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from multifusion.canvas import check_box_on_patch_grid, check_canvas, check_patch_grid
from multifusion.errors import IncompatibleModelsError, ModelLoadError, RecipeError, did_you_mean
from multifusion.families import ModelFacts, check_compatible, check_same_schedule
from multifusion.handles import ModelHandle
from multifusion.loading import (
    PIPELINE_PREFIX,
    check_quantize,
    check_weight_files,
    family_of,
    read_facts,
    read_vae_config,
    resolve,
    resolve_vae,
    vae_mismatch,
)
from multifusion.lora import lora_file
from multifusion.method import Method, Params
from multifusion.recipe import MERGE_PREFIX, ModelEntry, Recipe, Runtime
from multifusion.registry import get_method
from multifusion.schedulers import scheduler_class
from multifusion.weights.models import merge_tree, plan_merge
from multifusion.weights.registry import MergeSpecError


@dataclass(frozen=True)
class Validated:
    """A recipe checked before loading: its method, its params, and whether the canvas size and
    the method's size checks could run already (they need the first model's local config: its
    VAE factor, and its native size where the recipe gives none; otherwise they run after
    loading)."""

    recipe: Recipe
    method: Method
    params: Params
    canvas_checked: bool


def validate(recipe: Recipe) -> Validated:
    """Every check that can run before a model loads: the method exists and accepts this many
    models and these params; every model has a prompt (if the method needs one); the scheduler
    exists; every model reference resolves (pickles refused); where configs are local, the
    models can meet (`families.check_compatible`), each model takes the fields the recipe gives
    it, and the canvas size fits the VAE factor and the method's own size checks."""
    method = get_method(recipe.method)
    n = len(recipe.models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = f"exactly {method.min_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
        raise RecipeError(f"models: method {method.name!r} takes {want} model(s), the recipe names {n}")
    for i, m in enumerate(recipe.models):
        problem = method.lora_problem(len(m.loras or []))
        if problem:
            raise RecipeError(f"models[{i}].loras: {problem}")
    params = method.parse_params(
        recipe.params,
        n,
        labels=[m.label for m in recipe.models],
        models=[m.model for m in recipe.models],
        num_inference_steps=recipe.sampling.num_inference_steps,
    )
    if method.model_prompts:
        for i, m in enumerate(recipe.models):
            if m.prompt is None and recipe.prompt is None:
                raise RecipeError(f"models[{i}]: no prompt, and the recipe has no default `prompt`; give one")
    scheduler_class(recipe.sampling.scheduler)
    facts: list[tuple[str, ModelFacts]] = []
    merged = check_merges(recipe)
    for i, m in enumerate(recipe.models):
        if m.model.startswith(PIPELINE_PREFIX):
            check_pipeline_entry(recipe, method, i)
            continue
        try:
            ref = (
                merged[m.model]
                if m.model in merged
                else resolve(m.model, config=m.config, allow_pickle=recipe.runtime.allow_pickle)
            )
            if m.model not in merged:
                check_weight_files(ref)  # headers only: a truncated download is named here, before loading
            # A pipeline of no known family (say the SDXL refiner) is named here, from its local model_index.json.
            fact = read_facts(ref)
        except ModelLoadError as err:
            raise type(err)(f"models[{i}].model: {err}") from None
        if m.vae is not None:
            _check_vae(i, m, fact, recipe.runtime.allow_pickle)
        if m.loras:
            _check_loras(i, m, method, recipe.runtime.allow_pickle)
        if m.quantize is not None:
            _check_quantize(recipe, method, i, ref, fact)
        if fact is not None:
            if not facts and fact.scheduler is not None:
                fact.family.check_steps(recipe.sampling.scheduler, fact.scheduler, recipe.sampling.num_inference_steps)
            check_model_fields(recipe, i, fact.family)
            facts.append((f"models[{i}]", fact))
    _check_one_device(recipe, method)
    if facts:
        check_compatible(facts, "{}.model")  # the same check runs on the loaded models (Hub ids, single files)
    if method.meets == "weights" and len(facts) == n and not merged:
        _check_merge_plan(recipe, params)
    if method.meets == "latents":
        check_same_schedule(
            facts, f"with method {recipe.method!r}, which meets each model's own trajectory after every step", "{}.model"
        )
    first = facts[0][1] if facts else None
    # Blank sizes are the first model's native side, as `Run` samples them: a region off that canvas is named here.
    size = None if first is None else check_canvas(recipe, method, params, first.vae_scale_factor, default=first.native_px)
    if size is not None:
        check_patch_grid(*size, first.patch_px, first.name)
        if method.regions is not None:  # regions on the first model's grid (the models are of one family here)
            for where, box, _ in method.regions(params, size, first.vae_scale_factor):
                check_box_on_patch_grid(where, box, first.vae_scale_factor, first.patch_px, first.name)
    return Validated(recipe, method, params, size is not None)


ASK_IMAGES = 16
"""A recipe received from elsewhere (`--from-image`) asking for more images than this is confirmed first."""
ASK_STEPS = 150
"""... or for more sampling steps than this (5x the default 30)."""
ASK_AREA = 4
"""... or for a canvas of more than this many times the first model's native area."""


def costly_fields(recipe: Recipe) -> list[str]:
    """The fields where `recipe` asks for far more work than a recipe's defaults (one image, 30
    steps, the model's native canvas), each with its value and the threshold: what a recipe
    received from elsewhere (an image's metadata) must not start silently. Empty when none."""
    s = recipe.sampling
    out = []
    if s.num_images > ASK_IMAGES:
        out.append(f"sampling.num_images {s.num_images} (more than {ASK_IMAGES})")
    if s.num_inference_steps > ASK_STEPS:
        out.append(f"sampling.num_inference_steps {s.num_inference_steps} (more than {ASK_STEPS})")
    v = validate(recipe)
    fact = None
    first = recipe.models[0].model
    if not first.startswith((MERGE_PREFIX, PIPELINE_PREFIX)):
        fact = read_facts(resolve(first, config=recipe.models[0].config, allow_pickle=recipe.runtime.allow_pickle))
    native = fact.native_px if fact is not None else None
    size = check_canvas(recipe, v.method, v.params, fact.vae_scale_factor, default=native) if fact is not None else None
    if size is not None and native and size[0] * size[1] > ASK_AREA * native * native:
        out.append(
            f"a {size[0]}x{size[1]} canvas (sampling.height x sampling.width; more than {ASK_AREA}x the model's native "
            f"{native}x{native})"
        )
    return out


def check_pipeline_entry(recipe: Recipe, method: Method, i: int) -> None:
    """A `pipeline:` model (a pipeline object handed over from Python, `loading.from_pipeline`):
    refused where the recipe would change what the object holds, or where the method reads the
    models' files."""
    m = recipe.models[i]
    for field in ("config", "vae", "quantize", "device"):
        if getattr(m, field) is not None:
            raise RecipeError(
                f"models[{i}].{field}: {m.model!r} is a pipeline object given in Python, taken as it is (its configs, VAE, "
                f"quantization and device are set on the pipeline before handing it over); drop `{field}`"
            )
    if method.meets == "weights":
        raise RecipeError(
            f"models[{i}].model: method {method.name!r} merges the models' weights as their files hold them, and "
            f"{m.model!r} is a pipeline object given in Python; save it (pipe.save_pretrained(folder)) and name the folder"
        )


def check_model_fields(recipe: Recipe, i: int, family: type[ModelHandle]) -> None:
    """What a recipe gives model i that its family has no use for, refused naming the field:
    `true_cfg_scale` for a family without true CFG (all but FLUX), `sampling.eta` for a family
    whose sampler has no eta (flow matching: its Euler step is deterministic, docs/flow.md)."""
    if recipe.models[i].true_cfg_scale is not None and not family.takes_true_cfg:
        raise RecipeError(
            f"models[{i}].true_cfg_scale: true CFG is FLUX's (FluxPipeline's true_cfg_scale); a {family.family_name} "
            "model is guided by guidance_scale with its negative prompt already: drop true_cfg_scale"
        )
    if recipe.sampling.eta != 0 and not family.takes_eta:
        raise RecipeError(
            f"sampling.eta: {recipe.sampling.eta} but models[{i}] is a {family.family_name} model, sampled by the "
            "flow-matching Euler step, which has no eta (it is deterministic, DDIM at eta 0 in flow coordinates; "
            "diffusers' stochastic_sampling is one fixed all-fresh-noise form, not an eta); drop sampling.eta"
        )


def _check_vae(i: int, m: ModelEntry, fact: ModelFacts | None, allow_pickle: bool) -> None:
    """models[i].vae resolved and, where both configs are local, checked to fit the model's
    latent space (`fact`)."""
    if m.model.startswith(MERGE_PREFIX):
        raise RecipeError(f"models[{i}].vae: a merge keeps its first model's VAE; drop `vae`")
    try:
        ref = resolve_vae(m.vae, allow_pickle=allow_pickle)
    except ModelLoadError as err:
        raise type(err)(f"models[{i}].vae: {err}") from None
    vae = read_vae_config(ref)
    if fact is None or vae is None:
        return
    problem = vae_mismatch(vae, fact.latent_channels, fact.scaling_factor, fact.vae_scale_factor)
    if problem:
        raise IncompatibleModelsError(f"models[{i}].vae: {problem}")


FUSE_LORA_FIRST = (
    "fuse the LoRA into a copy of the base first (diffusers: load_lora_weights, fuse_lora, unload_lora_weights, "
    "save_pretrained) and name that folder as the model"
)


def _check_loras(i: int, m: ModelEntry, method: Method, allow_pickle: bool) -> None:
    """models[i].loras before loading: each file found and sound (pickles refused unless allowed,
    a .safetensors header listing LoRA tensors), on a model that can take them, for a method that
    can run models sharing a base. Whether a LoRA fits its base is known when it loads (still
    before sampling): `lora.apply_loras`."""
    if m.model.startswith(MERGE_PREFIX):
        raise RecipeError(f"models[{i}].loras: a merge: model takes no LoRAs; {FUSE_LORA_FIRST}, and merge that")
    if method.own_denoisers:
        raise RecipeError(
            f"models[{i}].loras: method {method.name!r} cannot run models with LoRAs: {method.own_denoisers}; {FUSE_LORA_FIRST}"
        )
    for j, lora in enumerate(m.loras or []):
        try:
            lora_file(lora.path, allow_pickle=allow_pickle)
        except ModelLoadError as err:
            raise type(err)(f"models[{i}].loras[{j}].path: {err}") from None


def check_own_denoisers(method: Method, handles: list[ModelHandle]) -> None:
    """RecipeError when `method` needs each model's own denoiser weights and a loaded model runs
    with adapters on a shared base (a handle from Python; recipes are refused before loading)."""
    if not method.own_denoisers:
        return
    for i, h in enumerate(handles):
        if h.adapters is not None:
            raise RecipeError(
                f"models[{i}] ({h.name!r}): method {method.name!r} cannot run models with LoRAs: {method.own_denoisers}; {FUSE_LORA_FIRST}"
            )


def _check_quantize(recipe: Recipe, method: Method, i: int, ref, fact: ModelFacts | None) -> None:
    """models[i].quantize checked before loading: not on a merge nor for a method that merges
    weights (merges read full-precision tensors), the backend installed, the model a folder, the
    components there (where the configs are local)."""
    where = f"models[{i}].quantize"
    m = recipe.models[i]
    if m.model.startswith(MERGE_PREFIX):
        raise RecipeError(
            f"{where}: a merge is made from full-precision weights; write it to a folder (multifusion merge) and load "
            "that folder quantized"
        )
    if method.meets == "weights":
        raise RecipeError(
            f"{where}: method {method.name!r} merges the models' full-precision weights; drop `quantize` (or write the "
            "merge to a folder with multifusion merge and load that folder quantized)"
        )
    check_quantize(ref, fact.family if fact is not None else family_of(ref), m.quantize, where)


def _check_one_device(recipe: Recipe, method: Method) -> None:
    """Methods whose models meet inside one module (AFA's ensemble forward, a merge's weights)
    need every model on one device: RecipeError naming the first model placed elsewhere."""
    if method.meets not in ("features", "weights"):
        return
    places = [m.device or recipe.runtime.device for m in recipe.models]
    for i, d in enumerate(places):
        if d != places[0]:
            raise RecipeError(
                f"models[{i}].device: {d!r} but models[0] runs on {places[0]!r}; method {method.name!r} combines its models "
                f"inside one {'forward pass' if method.meets == 'features' else 'set of weights'}, on one device: place them "
                "together"
            )


def check_merges(recipe: Recipe) -> dict:
    """Every `merge:NAME` of `models` defined in `merges`, and every used merge checked as
    `merge_models` checks it (spec, model count, block weights against the UNet, the models
    against each other; configs and file headers only). Returns {"merge:NAME": the ModelRef of
    its first model} (whose config gives the merge's latent space)."""
    out = {}
    for i, m in enumerate(recipe.models):
        if not m.model.startswith(MERGE_PREFIX):
            continue
        name = m.model[len(MERGE_PREFIX) :]
        if name not in recipe.merges:
            known = f" (merges: {', '.join(recipe.merges)})" if recipe.merges else "; define it under `merges:`"
            raise RecipeError(f"models[{i}].model: no merge named {name!r}{known}{did_you_mean(name, recipe.merges)}")
        if m.config is not None:
            raise RecipeError(f"models[{i}].config: a merge takes its configs from its models; drop `config`")
        out[m.model] = _check_merge(name, recipe.merges)
    return out


def _check_merge_plan(recipe: Recipe, params) -> None:
    """A weight method's merge checked as `merge_models` checks it (configs and file headers:
    every tensor's name and shape), so models of two architectures that share a latent space are
    refused here, naming them, not after every model has loaded."""
    try:
        plan_merge([m.model for m in recipe.models], params.spec())
    except (ModelLoadError, IncompatibleModelsError) as err:
        raise type(err)(f"models: {err}") from None


def _check_merge(name: str, merges: dict):
    """The merge `name` (and the merges it takes as inputs, down the tree) checked as
    `merge_models` checks it: names, self-references and cycles first (`merge_tree`), then
    configs and file headers. Returns the ModelRef of the model whose configs it keeps."""
    where = f"merges.{name}"
    tree = merge_tree(name, merges, MERGE_PREFIX)
    try:
        plan_merge(tree.models, tree.spec)
    except MergeSpecError as err:
        raise RecipeError(err.at(where)) from None
    except (RecipeError, ModelLoadError, IncompatibleModelsError) as err:
        raise type(err)(f"{where}: {err}") from None
    return resolve(tree.first_leaf)


def validate_recipe(recipe: Recipe) -> tuple[Recipe, Params]:
    """`validate`, returning the recipe and its validated method params."""
    v = validate(recipe)
    return v.recipe, v.params


def check_devices(runtime: Runtime, models: Sequence[ModelEntry] = ()) -> None:
    """RecipeError when runtime.device, runtime.vae_device or a model's own `device` names an
    accelerator this machine does not have (checked when a run starts, before any model loads)."""
    for field, value in (("device", runtime.device), ("vae_device", runtime.vae_device)):
        if value is not None:
            check_device(f"runtime.{field}", value)
    for i, m in enumerate(models):
        if m.device is not None:
            check_device(f"models[{i}].device", m.device)


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
        raise RecipeError(
            f"{where}: {value!r} but this machine has no {kind} device (torch sees none); "
            "use cpu, or run where the accelerator is"
        )
    if index and (not index.isdigit() or int(index) >= count):
        raise RecipeError(f"{where}: {value!r} but this machine has {count} {kind} device(s) (indices 0-{count - 1})")
