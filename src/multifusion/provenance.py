"""Where an image came from: the recipe that made it, written into its PNG and read back.

Image i of a run carries the whole recipe narrowed to that image alone (`image_metadata`), so
`multifusion generate --from-image` (`recipe_from_image`) regenerates exactly it; reading back
takes only the fields that make the picture (`FROM_IMAGE_FIELDS`), never `runtime`.
"""

from __future__ import annotations

import json
from pathlib import Path

from multifusion.errors import RecipeError
from multifusion.io import read_png_metadata
from multifusion.recipe import Runtime
from multifusion.version import __version__


def narrow_to_image(recipe: dict, seed: int) -> dict:
    """A recipe (as JSON data) narrowed to the one image of `seed`: that seed, one image, and
    each per-image prompt list reduced to that image's prompt, so running it again regenerates
    exactly that image."""
    out = json.loads(json.dumps(recipe))
    sampling = out.setdefault("sampling", {})
    index = seed - int(sampling.get("seed", 0))
    for m in out.get("models", []):
        if isinstance(m.get("prompt"), list):
            m["prompt"] = m["prompt"][index]
    sampling.update(seed=seed, num_images=1)
    return out


def image_metadata(recipe_json: str, seed: int) -> dict:
    """Metadata of one image: the full recipe narrowed to this image alone (its seed, one image,
    its own prompt), so that running it again regenerates exactly this image."""
    return {"recipe": narrow_to_image(json.loads(recipe_json), seed), "seed": seed, "multifusion_version": __version__}


FROM_IMAGE_FIELDS = ("version", "method", "models", "prompt", "negative_prompt", "params", "merges", "sampling")
"""What a recipe read back from an image takes from its metadata: what makes the picture. Never
`runtime` (pickle loading, devices, dtype, memory limits), nor output paths (the image holds
none): settings that widen trust come from the person running it, not from a file they were sent."""


def recipe_from_image(path: str | Path) -> tuple[dict, list[str]]:
    """The recipe in a PNG's metadata, narrowed to FROM_IMAGE_FIELDS, and the runtime settings
    it held that differ from the defaults and its models' devices (ignored, so the caller can say so). RecipeError when
    the file is not an image, has no such metadata, or its `recipe` is not a mapping."""
    meta = read_png_metadata(path)
    recipe = meta.get("recipe")
    if not isinstance(recipe, dict):
        what = "no `recipe`" if recipe is None else f"a `recipe` that is a {type(recipe).__name__}, not a mapping"
        raise RecipeError(f"{str(path)!r} holds multifusion metadata with {what}; was it written by `multifusion generate`?")
    unknown = sorted(map(str, set(recipe) - set(FROM_IMAGE_FIELDS) - {"runtime"}))
    if unknown:
        raise RecipeError(f"the recipe in {str(path)!r} has unknown field(s) {', '.join(map(repr, unknown))[:200]}")
    runtime, ignored = recipe.get("runtime"), []
    if runtime:
        defaults = Runtime().model_dump(mode="json")
        ignored = [str(k) for k, v in runtime.items() if defaults.get(k) != v] if isinstance(runtime, dict) else ["runtime"]
    out = {k: recipe[k] for k in FROM_IMAGE_FIELDS if k in recipe}
    if isinstance(out.get("models"), list):  # where a model ran is the machine's business, as `runtime` is
        for i, m in enumerate(out["models"]):
            if isinstance(m, dict) and "device" in m:
                out["models"][i] = {k: v for k, v in m.items() if k != "device"}
                ignored.append(f"models[{i}].device")
    return out, ignored
