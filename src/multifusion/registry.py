"""Methods, named once and found by name.

The built-in methods live in the packages of the place where models meet, each listing its own
in `methods.py` (`METHODS = [Method(...), ...]`); this module collects them in that order and
lets a user add their own with `register`. Names are looked up with a "did you mean".
"""

from __future__ import annotations

import importlib
import importlib.util

from multifusion.errors import RecipeError, did_you_mean
from multifusion.method import Method

# Where the built-ins live, in the order `multifusion methods` lists them. A package without a
# `methods.py` (yet) contributes nothing.
PACKAGES = ("noise", "latents", "features", "weights")

METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Make `method` available by name to recipes, the CLI and `multifusion.fuse`."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a multifusion.method.Method, got {type(method).__name__}")
    if method.name in METHODS and not replace and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to replace it")
    METHODS[method.name] = method
    return method


def _load_builtins() -> None:
    for package in PACKAGES:
        name = f"multifusion.{package}.methods"
        if importlib.util.find_spec(f"multifusion.{package}") and importlib.util.find_spec(name):
            for method in importlib.import_module(name).METHODS:
                register(method)


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    raise RecipeError(f"method: unknown method {name!r} (available: {', '.join(METHODS)}){did_you_mean(name, METHODS)}")


_load_builtins()
