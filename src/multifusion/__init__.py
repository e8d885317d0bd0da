"""multifusion: combine several text-to-image diffusion models at sampling time.

Every registered method is also a function of this package (`single`, `average`, `snb`, `mod`,
...), made from the registry: `multifusion.snb(models, prompts, k=..., seed=0)` is
`multifusion.fuse("snb", models, prompts, k=..., seed=0)`.
"""

from multifusion.logs import quiet_quantization_imports, quiet_unused_image_processors

quiet_unused_image_processors()  # before anything imports diffusers' pipelines (multifusion.logs says why)
quiet_quantization_imports()

from multifusion.api import Result, Run, fuse, generate_to_folder, iter_run, load_recipe_models, method_function, run
from multifusion.errors import (
    IncompatibleModelsError,
    ModelLoadError,
    MultifusionError,
    PickleRefusedError,
    RecipeError,
    SamplingError,
)
from multifusion.handles import Guided, ModelHandle
from multifusion.loading import load_model, load_models
from multifusion.recipe import Recipe, parse_recipe
from multifusion.registry import METHODS, register
from multifusion.version import __version__


def __getattr__(name: str):
    from multifusion import api

    try:  # every registered method as a function, as in multifusion.api
        return api.__getattr__(name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | {n.replace("-", "_") for n in METHODS})


__all__ = [
    "Guided",
    "IncompatibleModelsError",
    "ModelHandle",
    "ModelLoadError",
    "MultifusionError",
    "PickleRefusedError",
    "Recipe",
    "RecipeError",
    "Result",
    "SamplingError",
    "Run",
    "__version__",
    "fuse",
    "generate_to_folder",
    "iter_run",
    "load_model",
    "load_models",
    "load_recipe_models",
    "method_function",
    "parse_recipe",
    "register",
    "run",
    *(n.replace("-", "_") for n in METHODS),  # the built-in methods as functions
]
