"""The library's errors: one base class, a few specific kinds.

Every message names what is wrong (the recipe field, the file, the model) and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[str], prefix: str = "") -> str:
    """"; did you mean 'X'?" for the option closest to a misspelt `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


class MultifusionError(ValueError):
    """Base class of every error this library raises on purpose."""


class RecipeError(MultifusionError):
    """A recipe (or an API argument that mirrors one) is invalid; raised before any model loads."""


class ModelLoadError(MultifusionError):
    """A model reference cannot be resolved or loaded."""


class PickleRefusedError(ModelLoadError):
    """A pickle checkpoint was named without an explicit allow-pickle option."""


class IncompatibleModelsError(MultifusionError):
    """Models cannot meet where a method asks them to (latent space, noise schedule, architecture)."""
