"""multifusion: combine several text-to-image diffusion models at sampling time."""

from multifusion.api import Result, average, iter_run, load_recipe_models, mod, run, single, snb
from multifusion.errors import (
    IncompatibleModelsError,
    ModelLoadError,
    MultifusionError,
    PickleRefusedError,
    RecipeError,
)
from multifusion.handles import Guided, ModelHandle
from multifusion.loading import load_model, load_models
from multifusion.recipe import Recipe, parse_recipe

__version__ = "0.1.0"

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
    "average",
    "iter_run",
    "load_model",
    "load_models",
    "load_recipe_models",
    "mod",
    "parse_recipe",
    "run",
    "single",
    "snb",
]
