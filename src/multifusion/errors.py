"""The library's errors: one base class, a few specific kinds.

Every message names what is wrong (the recipe field, the file, the model) and how to fix it.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def did_you_mean(name: str, options: Iterable[str], prefix: str = "") -> str:
    """ "; did you mean 'X'?" for the option closest to a misspelt `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


ECHO_LIMIT = 200
"""Characters of a user's value an error message quotes at most (a YAML alias bomb expands to
megabytes)."""


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` (a message that may quote user input) cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shorten(value: object, limit: int = ECHO_LIMIT) -> str:
    """repr(value) cut to about `limit` characters, built without rendering all of a huge value
    (reprlib: a few items of each container, a few levels deep)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = limit
    try:
        text = r.repr(value)
    except ValueError:  # an int too long to print (Python's digit limit)
        text = f"<a {value.bit_length()}-bit integer>" if isinstance(value, int) else f"<a {type(value).__name__}>"
    if isinstance(value, str) and len(value) > limit:
        return f"{text}... ({len(value):,} characters)"
    return text if len(text) <= limit else f"{text[:limit]}..."


# pydantic puts the member of a union it tried into an error's location ("k.float",
# "window.tuple[float, float]"); users never write those, so they are dropped.
_UNION_TAG = re.compile(r"^(float|int|str|bool|none|list|dict|(list|tuple|dict|set|function-\w+)\[.*\])$")


def field_path(parts: Iterable[str | int], prefix: str = "") -> str:
    """A location as users write it in a recipe: ("models", 1, "model") -> "models[1].model"."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return f"{prefix}.{text}" if prefix and text else (prefix or text)


def format_validation_error(err: ValidationError, prefix: str = "", unknown: Callable[[list], str] | None = None) -> str:
    """One line per problem of a pydantic ValidationError, each starting with the field it names
    (under `prefix`, e.g. "params"), what is wrong and the value given. A validator that raises
    `FieldError` names its own field. `unknown(location)` words the error of an unknown field."""
    lines = []
    for e in err.errors():
        parts = [p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            parts.append(cause.field)
        msg = cause.message if isinstance(cause, FieldError) else e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown(parts) if unknown else "unknown field (check the spelling)"
        got = e.get("input")
        shown = (
            f" (got {shorten(got)})"
            if got is not None and not isinstance(got, dict) and e["type"] not in ("missing", "extra_forbidden")
            else ""
        )
        lines.append(f"{field_path(parts, prefix) or 'recipe'}: {msg}{shown}")
    return "invalid recipe:\n  " + "\n  ".join(lines)


class FieldError(ValueError):
    """Raised by a validator that checks several fields together, to name the one at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class MultifusionError(ValueError):
    """Base class of every error this library raises on purpose."""


class RecipeError(MultifusionError):
    """A recipe (or an API argument that mirrors one) is invalid; raised before any model loads."""


class ModelLoadError(MultifusionError):
    """A model reference cannot be resolved or loaded."""


class PickleRefusedError(ModelLoadError):
    """A pickle checkpoint was named without an explicit allow-pickle option."""

    @classmethod
    def of(cls, name: str, what: str) -> PickleRefusedError:
        """The refusal of the pickle `what` (checkpoint, LoRA file) `name`: why, and the two ways on."""
        return cls(
            f"{name!r} is a pickle {what}, and loading one can run arbitrary code. Convert it to .safetensors, "
            "or set runtime.allow_pickle (allow_pickle=True in Python) if you trust its source"
        )


class SamplingError(MultifusionError):
    """Sampling went wrong in a way the recipe could not show beforehand (latents that stop being
    finite); raised before any image of the batch is written."""


class IncompatibleModelsError(MultifusionError):
    """Models cannot meet where a method asks them to (latent space, noise schedule, architecture)."""
