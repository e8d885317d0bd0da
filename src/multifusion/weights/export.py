"""Write the merge a recipe describes: `multifusion merge RECIPE --out DIR [--single-file]`.

The recipe is the one that samples the merge (method `merge` or `mbw`, its `models` and
`params`), so a merge tried with `multifusion generate` is written with the same file; prompts
and sampling settings are ignored. The folder is written by `merge_models` (streamed, atomic,
with merge.json); `single_file=True` also writes `DIR.safetensors` beside it, one checkpoint in
the original SD-1.x or SDXL (LDM) layout for tools that expect single files (load it back with the
folder as its config).
"""

from __future__ import annotations

import stat
from pathlib import Path

from multifusion.errors import IncompatibleModelsError, RecipeError
from multifusion.io import atomic_path
from multifusion.loading import family_of, resolve
from multifusion.weights.models import Merge, MergeSpec, check_merge_output, first_leaf, merge_models, merge_tree

MERGE_METHODS = ("merge", "mbw")


def recipe_merge(recipe) -> tuple[list[str | Merge], MergeSpec]:
    """(model references or merges, MergeSpec) of a `merge` or `mbw` recipe (a Recipe, dict or file),
    its params checked as a run checks them (errors name `params.<field>`)."""
    from multifusion.recipe import MERGE_PREFIX, Recipe, parse_recipe
    from multifusion.registry import get_method

    r = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)
    if r.method not in MERGE_METHODS:
        raise RecipeError(f"method: {r.method!r} does not merge weights; a merge recipe has method merge or mbw")
    models = [m.model for m in r.models]
    params = get_method(r.method).parse_params(r.params, len(models), labels=[m.label for m in r.models], models=models)
    # A `merge:NAME` model is that merge of the recipe's `merges:`, computed while this one is written.
    trees = [merge_tree(m[len(MERGE_PREFIX) :], r.merges, MERGE_PREFIX) if m.startswith(MERGE_PREFIX) else m for m in models]
    return trees, params.spec()


def merge(
    recipe,
    out: str | Path,
    *,
    single_file: bool = False,
    overwrite: bool = False,
    base: str | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    lora_blocks: str | None = None,
) -> Path:
    """Write the merge of a `merge` / `mbw` recipe (a Recipe, dict or YAML/JSON file) to the
    diffusers folder `out` (and, with `single_file`, `out` + ".safetensors" in the LDM layout).
    With `lora` (a LoRA file), that LoRA is merged into the recipe's merge, or into the model
    `base` when `recipe` is None, at `lora_scale` times the block weights `lora_blocks`
    (`weights.lora.merge_lora`). Everything is checked before anything is written. Returns the folder."""
    out = check_merge_output(out, overwrite)
    if (recipe is None) == (base is None):
        raise RecipeError("give a merge RECIPE or --base MODEL (one of them)")
    if base is not None and lora is None:
        raise RecipeError("--base: a base model takes a LoRA (--lora FILE); to merge models give a merge RECIPE")
    if lora is None and (lora_scale != 1.0 or lora_blocks is not None):
        raise RecipeError("--scale / --lora-blocks set a LoRA's strength: give the LoRA with --lora FILE")
    if recipe is not None:
        models, spec = recipe_merge(recipe)
    else:
        models, spec = [base], MergeSpec()
    single = out.with_name(out.name + ".safetensors")
    if single_file and single.exists() and not overwrite:
        raise RecipeError(f"output {str(single)!r} already exists; choose another folder or pass overwrite=True")
    if single_file:
        family = family_of(resolve(first_leaf(models[0])))
        if not family.single_file:
            raise RecipeError(
                f"single_file: the single-file (LDM) layout is written for SD-1.x and SDXL UNet pipelines; a "
                f"{family.family_name} merge is written as a diffusers folder only (drop --single-file)"
            )
    if lora is not None:
        from multifusion.weights.lora import merge_lora

        what = Merge(tuple(models), spec, "recipe") if recipe is not None else base
        folder = merge_lora(what, lora, out, scale=lora_scale, blocks=lora_blocks, overwrite=overwrite)
    else:
        folder = merge_models(models, out, spec, overwrite=overwrite)
    if single_file:
        with atomic_path(single) as tmp:
            usual = stat.S_IMODE(tmp.stat().st_mode)  # atomic_path gives it what a plain open() would
            save_as_single_file(folder, tmp)
            tmp.chmod(usual)  # safetensors writes its file private (0600): keep the usual mode
    return folder


def save_as_single_file(pipeline_folder: str | Path, out_file: str | Path) -> Path:
    """Write the diffusers pipeline in `pipeline_folder` as one safetensors checkpoint in the
    original (LDM) layout of its family (`ldm_state_dict`: SD-1.x and SDXL; `families.ldm`).
    Load it back with ``from_single_file(out_file, config=pipeline_folder)`` (multifusion:
    ``configs=[folder]``), which supplies the configs, tokenizers and scheduler the file does
    not hold."""
    from safetensors.torch import save_file

    folder, out_file = Path(pipeline_folder), Path(out_file)
    family = family_of(resolve(str(folder)))
    if not family.single_file:
        raise IncompatibleModelsError(
            f"{folder} holds a {family.pipeline_class}; the single-file (LDM) layout is written for "
            "StableDiffusionPipeline and StableDiffusionXLPipeline folders only"
        )
    state = family.ldm_state_dict(folder)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file), metadata={"format": "pt"})
    return out_file
