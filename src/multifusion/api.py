"""The Python API: run a recipe, or call any method with diffusers-style arguments.

    from multifusion import load_models, average
    general, expert = load_models(["zoo:general", "zoo:expert"])
    result = average([general, expert], ["a red circle in a snowy field", "a red striped circle"],
                     weights=[0.6, 0.4], num_inference_steps=30, seed=0)
    result.images[0].save("out.png")

`fuse(method, models, prompts, **params)` runs any registered method; `single`, `average`, `snb`,
`mod` and every other registered name are the same call with the method filled in (made from
the registry by `method_function`, so a new method needs no code here).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from multifusion.canvas import canvas_size, check_canvas, check_patch_grid
from multifusion.errors import RecipeError, SamplingError, clip, did_you_mean
from multifusion.families import check_compatible, facts_of
from multifusion.handles import ModelHandle, Offloader
from multifusion.loading import PIPELINE_PREFIX, from_pipeline, load_models
from multifusion.loop import Step, initial_noise, sample
from multifusion.method import RUN_KEYS, SAMPLING_KEYS, Batch, RunContext
from multifusion.recipe import MERGE_PREFIX, Recipe, parse_recipe
from multifusion.registry import get_method
from multifusion.vae import decode, to_pil
from multifusion.validate import check_devices, check_model_fields, check_own_denoisers, validate


@dataclass
class Result:
    """Images of one run (or one batch of it), with what made them."""

    images: list  # PIL images
    latents: torch.Tensor  # (B, C, h, w) final latents, before decoding
    seeds: list[int]
    recipe: Recipe


def load_recipe_models(recipe: Recipe) -> list[ModelHandle]:
    """Load the recipe's models (identical components shared); a `merge:NAME` model is merged
    in memory from its models (`multifusion.weights.merge_in_memory`)."""
    rt = recipe.runtime
    for i, m in enumerate(recipe.models):
        if m.model.startswith(PIPELINE_PREFIX):
            raise RecipeError(
                f"models[{i}].model: {m.model!r} names a pipeline object that was given in Python; a recipe cannot hold "
                "one: pass the loaded models again (models=[...] in Python), or name the model's folder"
            )
    plain = [i for i, m in enumerate(recipe.models) if not m.model.startswith(MERGE_PREFIX)]
    loaded = (
        load_models(
            [recipe.models[i].model for i in plain],
            names=[recipe.models[i].label for i in plain],
            configs=[recipe.models[i].config for i in plain],
            vaes=[recipe.models[i].vae for i in plain],
            loras=[recipe.models[i].loras for i in plain],
            quantize=[recipe.models[i].quantize for i in plain],
            devices=[recipe.models[i].device for i in plain],
            dtype=rt.dtype,
            device=rt.device,
            offload=rt.offload,
            allow_pickle=rt.allow_pickle,
            fields=[f"models[{i}].model" for i in plain],
        )
        if plain
        else []
    )
    if len(plain) == len(recipe.models):
        return loaded
    from multifusion.loading import share_components
    from multifusion.weights.models import merge_in_memory, merge_tree

    handles: list[ModelHandle] = []
    merged: dict[tuple, ModelHandle] = {}
    offloaders = {h.offloader.device: h.offloader for h in loaded if h.offloader is not None}
    by_index = dict(zip(plain, loaded))
    for i, m in enumerate(recipe.models):
        if i in by_index:
            handles.append(by_index[i])
            continue
        place = torch.device(m.device or rt.device)
        key = (m.model, place)
        if key not in merged:  # one merge named twice is merged once (per device)
            tree = merge_tree(m.model[len(MERGE_PREFIX) :], recipe.merges, MERGE_PREFIX)
            # Offloaded: merged on the CPU, then moved by its device's offloader like every model.
            h = merge_in_memory(tree.models, tree.spec, name=m.label, dtype=rt.dtype, device="cpu" if rt.offload else place)
            if rt.offload:
                h = replace(h, device=place, offloader=offloaders.setdefault(place, Offloader(place)))
            merged[key] = h
        handles.append(replace(merged[key], name=m.label))
    share_components(handles)
    return handles


def apply_model_fields(recipe: Recipe, handles: Sequence[ModelHandle]) -> list[ModelHandle]:
    """The loaded models with what the recipe sets per model beyond the prompts and guidance
    (`true_cfg_scale` of a FLUX model), after the checks that need the loaded family."""
    out = list(handles)
    for i, (m, h) in enumerate(zip(recipe.models, handles)):
        check_model_fields(recipe, i, type(h))
        if m.true_cfg_scale is not None:
            out[i] = replace(h, true_cfg_scale=m.true_cfg_scale)
    return out


def compiled(handles: Sequence[ModelHandle]) -> list[ModelHandle]:
    """The handles with their denoisers compiled (`runtime.compile`): each distinct denoiser once
    (models that share one share its compiled form), static shapes (`dynamic=False`), so a run
    compiles one graph per input shape and reuses it at every step. The handles given are not
    changed (the run holds copies), so eager runs of the same models stay eager. Callers that
    walk a denoiser's blocks themselves (AFA's ensemble) run those blocks uncompiled."""
    done: dict[int, torch.nn.Module] = {}
    out = []
    for h in handles:
        if id(h.unet) not in done:
            done[id(h.unet)] = torch.compile(h.unet, dynamic=False)
        out.append(replace(h, unet=done[id(h.unet)]))
    return out


def check_batch_size(batch_size: int) -> None:
    """RecipeError unless `batch_size` is a positive whole number (True is not one)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise RecipeError(f"batch_size must be a positive integer, got {batch_size!r}")


def as_recipe(recipe: Recipe | dict | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)


class Run:
    """A recipe ready to sample: validated once, its models loaded once, its method prepared
    once; then `batch(seeds)` as often as needed."""

    def __init__(self, recipe: Recipe | dict | str | Path, *, models: Sequence[ModelHandle] | None = None):
        checked = validate(as_recipe(recipe))
        self.recipe, self.method, self.params = checked.recipe, checked.method, checked.params
        check_devices(
            self.recipe.runtime, self.recipe.models
        )  # before loading: a missing accelerator is named, not a CUDA traceback
        handles = list(models) if models is not None else load_recipe_models(self.recipe)
        if len(handles) != len(self.recipe.models):
            raise RecipeError(f"models: got {len(handles)} loaded models for a recipe naming {len(self.recipe.models)}")
        handles = apply_model_fields(self.recipe, handles)
        check_own_denoisers(self.method, handles)
        if self.recipe.runtime.compile:
            handles = compiled(handles)
        if len(handles) > 1:
            check_compatible([(f"models[{i}]", facts_of(h)) for i, h in enumerate(handles)], "{}.model")
        base = handles[0]
        f = base.vae_scale_factor
        default = base.native_px
        size_of = canvas_size if checked.canvas_checked else check_canvas  # check once, before loading where possible
        height, width = size_of(self.recipe, self.method, self.params, f, default)
        check_patch_grid(height, width, base.patch_px, base.family_name)
        self.latent_shape = (base.latent_channels, height // f, width // f)
        self.ctx = RunContext(handles, self.recipe, self.latent_shape, f)
        self.prepared = self.method.prepare(self.ctx, self.params)

    @property
    def handles(self) -> list[ModelHandle]:
        return self.ctx.handles

    def batch(
        self,
        seeds: Sequence[int],
        *,
        callback: Callable[[Step], None] | None = None,
        progress: bool = True,
        desc: str | None = None,
    ) -> Result:
        """Sample and decode the images of `seeds` (image i of the recipe has seed sampling.seed + i).
        SamplingError when memory runs out, saying how much one allocation needed and what to lower."""
        try:
            return self._batch(seeds, callback=callback, progress=progress, desc=desc)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            needed = allocation_failure(err)
            if needed is None:
                raise
            r, (_, h, w) = self.recipe, self.latent_shape
            f = self.ctx.vae_scale_factor
            raise SamplingError(
                f"out of memory: one allocation needed {needed} for {len(seeds)} image(s) of {h * f}x{w * f} px "
                f"(sampling.height x sampling.width; runtime.max_pixels is {r.runtime.max_pixels:,}). Lower sampling.height "
                "and sampling.width (or runtime.max_pixels back to its default), the batch size (--batch-size), or set "
                "runtime.offload / runtime.vae_device: cpu"
            ) from None

    def _batch(
        self,
        seeds: Sequence[int],
        *,
        callback: Callable[[Step], None] | None = None,
        progress: bool = True,
        desc: str | None = None,
    ) -> Result:
        r = self.recipe
        seeds = [int(s) for s in seeds]
        if not seeds or any(not 0 <= s < 2**63 for s in seeds):
            raise RecipeError(f"seeds: give one or more seeds in [0, 2^63), got {clip(str(seeds))}")
        indices = [s - r.sampling.seed for s in seeds]
        outside = [s for s, i in zip(seeds, indices) if not 0 <= i < r.sampling.num_images]
        if outside and any(isinstance(m.prompt, list) for m in r.models):
            raise RecipeError(
                f"seeds: {outside} lie outside the recipe's images (seeds {r.sampling.seed} to "
                f"{r.sampling.seed + r.sampling.num_images - 1}), and its per-image prompts have none for them"
            )
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        batch = Batch(seeds, indices, initial_noise(self.latent_shape, generators))
        plan = self.method.plan(self.prepared, batch)
        base = self.handles[0]
        trajectories = [
            replace(
                tr,
                scheduler=tr.scheduler
                if tr.scheduler is not None
                else base.scheduler(r.sampling.scheduler, self.latent_shape[1:]),
                noise=tr.noise if tr.noise is not None else batch.noise,
            )
            for tr in plan.trajectories
        ]
        latents = sample(
            trajectories,
            num_inference_steps=r.sampling.num_inference_steps,
            generators=generators,
            eta=r.sampling.eta,
            meet=plan.meet,
            callback=callback,
            progress=progress,
            desc=desc or f"{r.method} seeds {seeds[0]}-{seeds[-1]}",
        )[plan.output]
        if latents is None:
            raise RuntimeError(f"method {r.method!r} stopped its output trajectory {plan.output} before the last step")
        images = to_pil(decode(base.ready_vae(r.runtime.vae_device), latents))
        return Result(images, latents, seeds, r)

    def batches(
        self,
        seeds: Sequence[int] | None = None,
        *,
        batch_size: int = 4,
        callback: Callable[[Step], None] | None = None,
        progress: bool = True,
    ) -> Iterator[Result]:
        """`batch` over `seeds` (default: the recipe's) in groups of `batch_size`, each yielded
        as it finishes so a caller can save it before the next starts."""
        check_batch_size(batch_size)
        seeds = list(self.recipe.seeds() if seeds is None else seeds)
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            yield self.batch(
                chunk,
                callback=callback,
                progress=progress,
                desc=f"{self.recipe.method} images {start + 1}-{start + len(chunk)}/{len(seeds)}",
            )


def allocation_failure(err: BaseException) -> str | None:
    """How much a failed allocation asked for ("149.0 GiB"), from torch's CPU or CUDA
    out-of-memory message; None when `err` is not an allocation failure."""
    import re

    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        m = re.search(r"allocate (\d+) bytes", text)
        if m:
            return f"{int(m.group(1)) / 2**30:,.1f} GiB"
        m = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", text)
        return m.group(1) if m else "more memory than is free"
    return None


def iter_run(
    recipe: Recipe | dict | str | Path,
    *,
    models: Sequence[ModelHandle] | None = None,
    batch_size: int = 4,
    seeds: Sequence[int] | None = None,
    callback: Callable[[Step], None] | None = None,
    progress: bool = True,
) -> Iterator[Result]:
    """Run a recipe in batches of `batch_size` images, yielding each batch as it finishes. Image
    i uses seed `sampling.seed + i` alone: the same image comes out whatever the batch size or
    position in the run. `seeds` replaces the recipe's seeds (to redo a subset of a run)."""
    check_batch_size(batch_size)
    yield from Run(recipe, models=models).batches(seeds, batch_size=batch_size, callback=callback, progress=progress)


def run(recipe: Recipe | dict | str | Path, **kwargs: Any) -> Result:
    """Run a recipe and return all its images (see `iter_run` for the arguments)."""
    parts = list(iter_run(recipe, **kwargs))
    return Result(
        [im for p in parts for im in p.images],
        torch.cat([p.latents for p in parts]),
        [s for p in parts for s in p.seeds],
        parts[0].recipe,
    )


_SAMPLING_DOC = """
    Sampling keywords (diffusers names): num_inference_steps (30), scheduler ("ddim"), seed (0;
    image i uses seed + i), num_images (1), height, width (default: the model's native size),
    eta (0.0). Run keywords: runtime (dict: dtype, device, offload, allow_pickle, vae_device),
    batch_size, callback, progress. Returns a `Result`."""


def fuse(
    method: str,
    models: ModelHandle | str | Any | Sequence[ModelHandle | str | Any],
    prompts: str | Sequence[str] | None = None,
    *,
    negative_prompt: str | Sequence[str] = "",
    guidance_scale: float | Sequence[float] = 7.5,
    true_cfg_scale: float | Sequence[float | None] | None = None,
    devices: Sequence[str | None] | None = None,
    **kwargs: Any,
) -> Result:
    """Run method `method` on `models` (loaded handles, diffusers pipeline objects taken as they
    are, or model names: Hub ids, folders, .safetensors files, zoo:NAME), each with its own prompt (one string is every model's), its
    own negative prompt and guidance scale (and, for FLUX models, `true_cfg_scale`: true
    classifier-free guidance with the negative prompt, FluxPipeline's). `devices` places each named model on its own
    device (None: runtime's device; loaded models stay where they were loaded). Other keywords are the method's parameters (see
    `multifusion methods`), sampling keywords or run keywords; None means "the default".
    The Python API and the CLI share one validated path: this builds the recipe and runs it."""
    m = get_method(method)
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    # Pipeline objects are taken as they are (`loading.from_pipeline`), one handle per object.
    models = [x if isinstance(x, (ModelHandle, str)) else from_pipeline(x, what=f"models[{i}]") for i, x in enumerate(models)]
    handles = [x for x in models if isinstance(x, ModelHandle)]
    if handles and len(handles) != len(models):
        raise RecipeError(
            "models: give either all loaded models (ModelHandles, diffusers pipelines) or all model names, not a mix"
        )
    if devices is not None and handles:
        raise RecipeError("devices: loaded models run where they were loaded; place them with load_models(devices=[...])")
    if devices is not None and (isinstance(devices, str) or len(devices) != len(models)):
        got = "one string" if isinstance(devices, str) else f"{len(devices)} values"
        raise RecipeError(f"devices: {got} for {len(models)} models; give a list with one device (or None) per model")
    known = set(m.params.model_fields) | set(SAMPLING_KEYS) | set(RUN_KEYS)
    for key in kwargs:
        if key not in known:
            raise RecipeError(
                f"{key}: not a parameter of method {method!r} nor a sampling or run keyword"
                f"{did_you_mean(key, known)} (parameters: {', '.join(m.params.model_fields) or 'none'})"
            )

    def per_model(name: str, value: Any) -> list:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(models)
        if len(values) != len(models):
            raise RecipeError(f"{name}: {len(values)} values for {len(models)} models; give one per model (or one for all)")
        return values

    entries = []
    for x, p, g, n, t, d in zip(
        models,
        per_model("prompts", prompts),
        per_model("guidance_scale", guidance_scale),
        per_model("negative_prompt", negative_prompt),
        per_model("true_cfg_scale", true_cfg_scale),
        list(devices) if devices is not None else [None] * len(models),
    ):
        entry = {"model": x.source, "name": x.name} if isinstance(x, ModelHandle) else {"model": x}
        if isinstance(x, ModelHandle) and x.adapters is not None and x.adapters.given:
            entry["loras"] = [dict(lora) for lora in x.adapters.given]  # so the recipe (and metadata) regenerates it
        if isinstance(x, ModelHandle) and x.quantize is not None:  # recorded, so the recipe remakes the model
            entry["quantize"] = x.quantize.model_dump(mode="json", exclude_none=True)
        entries.append(
            {
                **entry,
                **({"prompt": p} if p is not None else {}),
                "guidance_scale": g,
                "negative_prompt": n,
                **({"true_cfg_scale": t} if t is not None else {}),
                **({"device": d} if d is not None else {}),
            }
        )
    params = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k in m.params.model_fields and v is not None
    }
    recipe: dict[str, Any] = {
        "method": method,
        "models": entries,
        "params": params,
        "sampling": {k: kwargs[k] for k in SAMPLING_KEYS if kwargs.get(k) is not None},
    }
    if kwargs.get("runtime") is not None:
        recipe["runtime"] = kwargs["runtime"]
    run_kwargs = {k: kwargs[k] for k in ("batch_size", "callback", "progress") if k in kwargs}
    return run(recipe, models=handles or None, **run_kwargs)


def method_function(name: str) -> Callable[..., Result]:
    """`fuse` with the method filled in, its signature and docstring made from the registry."""
    m = get_method(name)

    def call(models, prompts=None, **kwargs: Any) -> Result:
        return fuse(name, models, prompts, **kwargs)

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("models", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("negative_prompt", kw, default=""),
        inspect.Parameter("guidance_scale", kw, default=7.5),
        inspect.Parameter("true_cfg_scale", kw, default=None),
        inspect.Parameter("devices", kw, default=None),
    ]
    params += [
        inspect.Parameter(f, kw, default=info.get_default(call_default_factory=True)) for f, info in m.params.model_fields.items()
    ]
    params += [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    call.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    call.__name__ = call.__qualname__ = name.replace("-", "_")
    described = "\n".join(f"    {f}: {info.description or info.annotation}" for f, info in m.params.model_fields.items())
    call.__doc__ = f"{m.summary}.\n\n    Method parameters:\n{described or '    none'}\n{_SAMPLING_DOC}"
    return call


def image_name(stem: str, seed: int) -> str:
    return f"{stem}-s{seed}.png"


def check_stem(stem: str, where: str = "stem") -> str:
    """A file name stem that stays inside the output folder: no folder separators, not `.` or
    `..`, not absolute, not empty; RecipeError naming `where` otherwise."""
    import os

    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not isinstance(stem, str) or not stem or stem in (".", "..") or any(c in stem for c in seps) or "\0" in stem:
        raise RecipeError(
            f"{where}: {stem!r} is not a plain file name (no folders, '..' or absolute paths: images are "
            "written inside the output folder only); give a name such as 'portrait'"
        )
    return stem


@dataclass
class Written:
    """One batch that `write_images` wrote: its result, each image's path (None where it was not
    written) and metadata (the recipe narrowed to that image), and the method's pictures."""

    result: Result
    paths: list[Path | None]
    metadata: list[dict]
    pictures: list[Path]


def _already_made(path: Path, recipe_json: str, seed: int, overwrite: bool) -> bool:
    """Whether the image at `path` is this recipe's for `seed` and whole, so a resumed run keeps
    it; RecipeError when `path` is a folder, or (unless `overwrite`) another recipe's image."""
    from multifusion.io import image_is_whole, read_png_metadata
    from multifusion.provenance import image_metadata

    if path.is_dir():
        raise RecipeError(f"out: {str(path)!r} is a folder where an image goes; move it or choose another name")
    if overwrite or not path.exists():
        return False
    try:
        have = read_png_metadata(path)
    except RecipeError:
        have = None
    same = have is not None and have.get("recipe") == image_metadata(recipe_json, seed)["recipe"]
    whole = image_is_whole(path)
    if same and have.get("seed") == seed and whole:
        return True  # finished: same recipe, and every pixel decodes
    if whole and not same:
        raise RecipeError(
            f"out: {str(path)!r} exists and was made by a different recipe; choose another output folder or name, or overwrite it"
        )
    return False  # a damaged file (truncated, or its metadata unreadable) under our name: made again


def write_images(
    recipe: Recipe | dict | str | Path,
    out: str | Path,
    name_of: Callable[[int], str | Path | None],
    *,
    seeds: Sequence[int] | None = None,
    models: Sequence[ModelHandle] | None = None,
    batch_size: int = 4,
    overwrite: bool = False,
    pictures: bool = False,
    callback: Callable[[Step, list[int]], None] | None = None,
    progress: bool = True,
) -> Iterator[Written]:
    """Run a recipe over `seeds` (default: the recipe's) in batches of `batch_size`, writing the
    image of each seed to `out / name_of(seed)` (None: not written) as a PNG holding the
    metadata that regenerates it, atomically, each batch as soon as it is decoded; yields each
    batch written. What the CLI's `generate`, the web UI and the benchmark all do.

    Images already there from the same recipe are kept and not made again, so an interrupted
    run resumes; another recipe's image under a name is an error. `overwrite` makes and writes
    every image. Nothing loads when nothing is left to make, and `out` is checked writable
    before anything loads. `pictures` also writes the method's step pictures
    (`Method.recorders`) beside each written image (`{name}-masks.png`, ...). `callback(step,
    seeds)` gets every step of a batch with the batch's seeds."""
    from multifusion.io import check_output_dir, save_png
    from multifusion.provenance import image_metadata

    recipe = as_recipe(recipe)  # validated by Run, once, when there is anything to make
    check_batch_size(batch_size)
    out = Path(out)
    recipe_json = recipe.to_json()
    seeds = [int(s) for s in (recipe.seeds() if seeds is None else seeds)]
    names = {s: name_of(s) for s in seeds}
    todo = [s for s in seeds if names[s] is None or not _already_made(out / names[s], recipe_json, s, overwrite)]
    if not todo:
        return
    check_output_dir("out", out)  # before loading and sampling: no computed batch lost to an unwritable folder
    session = Run(recipe, models=models)
    labels = [m.label for m in recipe.models]
    vae = session.handles[0].ready_vae(recipe.runtime.vae_device) if pictures else None
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        recorders = session.method.recorders(vae) if pictures else []

        def on_step(step: Step) -> None:  # runs within this batch only: chunk and recorders are this batch's
            if callback is not None:
                callback(step, chunk)
            for r in recorders:
                r(step)

        # No callback at all when nothing listens: combiners then skip building their records.
        part = session.batch(chunk, callback=on_step if callback is not None or recorders else None, progress=progress)
        written = Written(part, [], [], [])
        for i, (image, seed) in enumerate(zip(part.images, part.seeds)):
            meta = image_metadata(recipe_json, seed)
            path = None if names[seed] is None else save_png(image, out / names[seed], meta)
            written.paths.append(path)
            written.metadata.append(meta)
            if path is not None:
                for r in recorders:
                    written.pictures += r.save(path.with_name(path.name.removesuffix(".png")), i, labels)
        yield written


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
    soon as it is decoded (`write_images`). Images already present with the same recipe are not
    redone, so an interrupted run resumes; a different image under the same name is an error
    unless `overwrite`. `export_masks` also writes each method's step pictures: `{stem}-s{seed}-masks.png/.gif`
    (SNB's masks), `{stem}-s{seed}-amdm.png` (AMDM's meetings), `{stem}-s{seed}-afa.png` (AFA's
    maps), `{stem}-s{seed}-regions.png` (Mixture of Diffusers' region weights). Models load once
    for the whole run. Returns every image's path, then the pictures written."""
    recipe = as_recipe(recipe)
    check_stem(stem)
    paths = [Path(out) / image_name(stem, seed) for seed in recipe.seeds()]
    for written in write_images(
        recipe,
        out,
        lambda seed: image_name(stem, seed),
        models=models,
        batch_size=batch_size,
        overwrite=overwrite,
        pictures=export_masks,
        progress=progress,
    ):
        paths += written.pictures
    return paths


def __getattr__(name: str) -> Callable[..., Result]:
    """`multifusion.api.single`, `.average`, ...: every registered method as a function."""
    from multifusion.registry import METHODS

    if name in METHODS or name.replace("_", "-") in METHODS:
        return method_function(name if name in METHODS else name.replace("_", "-"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
