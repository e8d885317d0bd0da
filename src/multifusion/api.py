"""The Python API: run a recipe, or call a method directly with diffusers-style arguments.

    from multifusion import load_models, average
    general, expert = load_models(["zoo:general", "zoo:expert"])
    result = average([general, expert], ["a red circle in a snowy field", "a red striped circle"],
                     weights=[0.6, 0.4], num_inference_steps=30, seed=0)
    result.images[0].save("out.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from multifusion.errors import RecipeError
from multifusion.handles import ModelHandle, check_same_latent_space
from multifusion.loading import load_models
from multifusion.loop import StepInfo, decode, initial_noise, make_scheduler, sample, to_pil
from multifusion.plan import BuildContext
from multifusion.recipe import Recipe, canvas_size, parse_recipe, validate_recipe
from multifusion.registry import get_method


@dataclass
class Result:
    """Images of one run (or one batch of it), with what made them."""

    images: list  # PIL images
    latents: torch.Tensor  # (B, C, h, w) final latents, before decoding
    seeds: list[int]
    recipe: Recipe


def load_recipe_models(recipe: Recipe) -> list[ModelHandle]:
    """Load the recipe's models (identical components shared)."""
    rt = recipe.runtime
    return load_models(
        [m.model for m in recipe.models],
        names=[m.label for m in recipe.models],
        configs=[m.config for m in recipe.models],
        dtype=rt.dtype,
        device=rt.device,
        offload=rt.offload,
        allow_pickle=rt.allow_pickle,
    )


def iter_run(
    recipe: Recipe | dict | str | Path,
    *,
    models: Sequence[ModelHandle] | None = None,
    batch_size: int = 4,
    seeds: Sequence[int] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = True,
) -> Iterator[Result]:
    """Run a recipe in batches of `batch_size` images, yielding each batch as it finishes, so a
    caller can save it before the next starts. Image i uses seed `sampling.seed + i` alone: the
    same image comes out whatever the batch size or position in the run. `seeds` replaces the
    recipe's seeds (to redo a subset of a run)."""
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe)
    recipe, params = validate_recipe(recipe)
    if batch_size <= 0:
        raise RecipeError(f"batch_size must be positive, got {batch_size}")
    handles = list(models) if models is not None else load_recipe_models(recipe)
    if len(handles) != len(recipe.models):
        raise RecipeError(f"got {len(handles)} loaded models for a recipe naming {len(recipe.models)}")
    if len(handles) > 1:
        check_same_latent_space(handles)
    base = handles[0]
    method = get_method(recipe.method)
    f = base.vae_scale_factor
    height, width = canvas_size(recipe, method, params, f, default=int(base.unet.config.sample_size) * f)
    if method.check is not None:
        method.check(params, (height, width), f, [m.label for m in recipe.models])
    shape = (base.latent_channels, height // f, width // f)
    seeds = list(recipe.seeds() if seeds is None else seeds)
    cache: dict = {}
    for start in range(0, len(seeds), batch_size):
        batch_seeds = seeds[start : start + batch_size]
        ctx = BuildContext(handles, recipe, batch_seeds, shape, f, cache)
        plan = method.build(ctx, params)
        generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        noise = initial_noise(shape, generators)
        if plan.init_noise is not None:
            noise = plan.init_noise(noise)
        scheduler = make_scheduler(recipe.sampling.scheduler, base.scheduler_config)
        several = len(plan.denoise) > 1
        out = sample(
            plan.denoise if several else plan.denoise[0],
            scheduler,
            [noise] * len(plan.denoise) if several else noise,
            num_inference_steps=recipe.sampling.num_inference_steps,
            generators=generators,
            eta=recipe.sampling.eta,
            meet=plan.meet,
            callback=callback,
            progress=progress,
            desc=f"{recipe.method} images {start + 1}-{start + len(batch_seeds)}/{len(seeds)}",
        )
        latents = out[0] if several else out
        images = to_pil(decode(base.ready_vae(recipe.runtime.vae_device), latents))
        yield Result(images, latents, batch_seeds, recipe)


def run(recipe: Recipe | dict | str | Path, **kwargs: Any) -> Result:
    """Run a recipe and return all its images (see `iter_run` for the arguments)."""
    parts = list(iter_run(recipe, **kwargs))
    return Result(
        [im for p in parts for im in p.images],
        torch.cat([p.latents for p in parts]),
        [s for p in parts for s in p.seeds],
        parts[0].recipe,
    )


_SAMPLING_KEYS = ("num_inference_steps", "scheduler", "seed", "num_images", "height", "width", "eta")
_SAMPLING_DOC = """
    Sampling keywords (diffusers names): num_inference_steps (30), scheduler ("ddim"), seed (0;
    image i uses seed + i), num_images (1), height, width (default: the model's native size),
    eta (0.0). Run keywords: runtime (dict: dtype, device, offload, allow_pickle), batch_size,
    callback, progress. Returns a `Result`."""


def _call(method: str, models, prompts, params: dict, negative_prompt, guidance_scale, kwargs: dict) -> Result:
    """Build the recipe a method function stands for and run it: the Python API and the CLI
    share one validated path."""
    handles = [m for m in models if isinstance(m, ModelHandle)]
    if handles and len(handles) != len(models):
        raise RecipeError("models: give either all loaded ModelHandles or all model names, not a mix")
    per_model = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * len(models)  # noqa: E731
    prompts, scales, negatives = per_model(prompts), per_model(guidance_scale), per_model(negative_prompt)
    for name, values in (("prompts", prompts), ("guidance_scale", scales), ("negative_prompt", negatives)):
        if len(values) != len(models):
            raise RecipeError(f"{name}: {len(values)} values for {len(models)} models; give one per model (or one for all)")
    entries = []
    for m, p, g, n in zip(models, prompts, scales, negatives):
        entry = {"model": m.source, "name": m.name} if isinstance(m, ModelHandle) else {"model": m}
        entries.append({**entry, **({"prompt": p} if p is not None else {}), "guidance_scale": g, "negative_prompt": n})
    sampling = {k: kwargs.pop(k) for k in _SAMPLING_KEYS if kwargs.get(k) is not None}
    kwargs = {k: v for k, v in kwargs.items() if k not in _SAMPLING_KEYS}
    recipe = {"method": method, "models": entries, "params": {k: v for k, v in params.items() if v is not None}, "sampling": sampling}
    if "runtime" in kwargs:
        recipe["runtime"] = kwargs.pop("runtime")
    return run(recipe, models=handles or None, **kwargs)


def single(model: ModelHandle | str, prompt: str, *, negative_prompt: str = "", guidance_scale: float = 7.5, **kwargs: Any) -> Result:
    """One model alone; equals diffusers' StableDiffusionPipeline for the same settings."""
    return _call("single", [model], [prompt], {}, negative_prompt, guidance_scale, kwargs)


def average(
    models: Sequence[ModelHandle | str],
    prompts: str | Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    negative_prompt: str | Sequence[str] = "",
    guidance_scale: float | Sequence[float] = 7.5,
    **kwargs: Any,
) -> Result:
    """Weighted average of several models' guided noise predictions, each with its own prompt."""
    params = {"weights": list(weights) if weights is not None else None}
    return _call("average", list(models), prompts, params, negative_prompt, guidance_scale, kwargs)


def snb(
    models: Sequence[ModelHandle | str],
    prompts: str | Sequence[str],
    *,
    k: float | Sequence[float] = 1.0,
    blur: str = "box",
    blur_size: int = 4,
    blur_sigma: float = 1.0,
    window: tuple[float, float] | None = None,
    fusion_timestep: int | None = None,
    fusion: str = "late",
    temperature: float | None = None,
    negative_prompt: str | Sequence[str] = "",
    guidance_scale: float | Sequence[float] = 7.5,
    **kwargs: Any,
) -> Result:
    """MagicFusion saliency-aware noise blending of two or more models (the first is the base).

    The fusion window is either `window` = (start, end) on the trajectory (0 = noise, 1 = clean)
    or `fusion_timestep` t_s with `fusion` "late" (t <= t_s, the paper) or "early" (t > t_s)."""
    params = dict(k=list(k) if isinstance(k, (list, tuple)) else k, blur=blur, blur_size=blur_size, blur_sigma=blur_sigma,
                  fusion_timestep=fusion_timestep, fusion=fusion, temperature=temperature)
    if window is not None:  # default: the whole trajectory, or the window of fusion_timestep
        params["window"] = list(window)
    return _call("snb", list(models), prompts, params, negative_prompt, guidance_scale, kwargs)


def mod(
    models: Sequence[ModelHandle | str],
    *,
    regions: Sequence[dict] = (),
    tiles: dict | None = None,
    background: dict | None = None,
    image_regions: Sequence[dict] = (),
    rerolls: Sequence[dict] = (),
    tile_batch_size: int = 1,
    negative_prompt: str = "",
    guidance_scale: float = 7.5,
    **kwargs: Any,
) -> Result:
    """Mixture of Diffusers: regions (dicts with row_init, row_end, col_init, col_end, prompt and
    optionally model, guidance_scale, negative_prompt, mask_type, mask_weight, units) or a tiles
    grid, each denoised by its model and mixed with Gaussian weights on one canvas."""
    params = {"regions": list(regions), "tiles": tiles, "background": background, "image_regions": list(image_regions),
              "rerolls": list(rerolls), "tile_batch_size": tile_batch_size}
    return _call("mod", list(models), [None] * len(models), params, negative_prompt, guidance_scale, kwargs)


for _fn in (single, average, snb, mod):
    _fn.__doc__ += _SAMPLING_DOC


def image_name(stem: str, seed: int) -> str:
    return f"{stem}-s{seed}.png"


def generate_to_folder(
    recipe: Recipe | dict | str | Path,
    out: str | Path,
    *,
    stem: str = "image",
    batch_size: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    models: Sequence[ModelHandle] | None = None,
    export_masks: bool = False,
) -> list[Path]:
    """Run a recipe and write `OUT/{stem}-s{seed}.png` for each image, atomically, each batch as
    soon as it is decoded. Images already present with the same recipe are not redone, so an
    interrupted run resumes; a different image under the same name is an error unless
    `overwrite`. `export_masks` also writes `{stem}-s{seed}-masks.png/.gif` for methods that
    record masks (SNB)."""
    from multifusion.io import image_metadata, read_png_metadata, save_png

    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe)
    validate_recipe(recipe)
    out = Path(out)
    todo, paths = [], []
    for seed in recipe.seeds():
        path = out / image_name(stem, seed)
        paths.append(path)
        want = image_metadata(recipe.to_json(), seed)
        if path.exists() and not overwrite:
            try:
                have = read_png_metadata(path)
            except (RecipeError, OSError, ValueError):
                have = None
            if have is not None and have.get("recipe") == want["recipe"]:
                continue
            raise RecipeError(
                f"--out: {str(path)!r} exists and was made by a different recipe; choose another --out, "
                "another --name, or pass --overwrite"
            )
        todo.append(seed)
    from multifusion.viz import MaskRecorder

    for start in range(0, len(todo), batch_size):
        recorder = MaskRecorder() if export_masks else None
        batch = todo[start : start + batch_size]
        for part in iter_run(recipe, models=models, batch_size=batch_size, seeds=batch, progress=progress, callback=recorder):
            for i, (image, seed) in enumerate(zip(part.images, part.seeds)):
                if recorder is not None:
                    paths += recorder.save(out / image_name(stem, seed).removesuffix(".png"), i, [m.label for m in recipe.models])
                save_png(image, out / image_name(stem, seed), image_metadata(recipe.to_json(), seed))
    return paths
