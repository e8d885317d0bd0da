"""What the web UI shows, without Gradio: widgets described from a method's params model and
from the recipe's model entry, form values turned into a recipe and back, errors routed to the
field they name, the region preview.

Nothing here knows a particular method or model field: a widget is chosen from each field's
annotation (`Literal` -> a choice, `bool` -> a checkbox, `int`/`float` -> a number, `str` -> a
text box (optional ones blank for "none"), `str | list[str]` -> text with one item per line, a
list of parameter models -> a table with one column per field of the item model, anything else
-> YAML text), with the field's default and description. A method registered later, or a field
added to `ModelEntry`, `Sampling`, `Runtime` or the recipe itself, appears in the UI with no code
here.

The whole form is one dict of widget values keyed by the recipe path each widget holds:
`method`, `n_models`, `models[i].<field>`, `params:<method>:<field>` (each method keeps its own
form), `sampling.<field>`, `runtime.<field>`, and `<field>` for the recipe's own fields that no
section holds (`merges`). `form_from_recipe` and `recipe_from_form` are inverse over every field.
"""

from __future__ import annotations

import functools
import json
import operator
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from multifusion.errors import MultifusionError, RecipeError

MAX_MODELS = 4
"""Model slots the form shows (a recipe with more is refused on restore, naming the field)."""


@dataclass(frozen=True)
class Widget:
    """One form field of a method's params: how to show it and how to read it back."""

    name: str
    kind: Literal["choice", "bool", "int", "float", "text", "lines", "table", "yaml"]
    default: Any  # PydanticUndefined when required
    description: str
    choices: tuple = ()
    columns: tuple[str, ...] = ()  # table: the item model's fields, required ones first
    item: type[BaseModel] | None = None

    @property
    def required(self) -> bool:
        return self.default is PydanticUndefined

    @property
    def optional(self) -> bool:
        """A number or text whose default is None: shown as a text box, blank for None."""
        return self.default is None and self.kind in ("int", "float", "text")

    @property
    def label(self) -> str:
        return f"{self.name} (required)" if self.required else self.name

    def initial(self) -> Any:
        """The widget's value for the field's default."""
        return to_widget(self, None if self.required else self.default)


def _unwrap_optional(ann: Any) -> tuple[Any, bool]:
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return functools.reduce(operator.or_, rest), True
    return ann, False


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def table_columns(item: type[BaseModel]) -> tuple[str, ...]:
    fields = item.model_fields
    return tuple([n for n, f in fields.items() if f.is_required()] + [n for n, f in fields.items() if not f.is_required()])


def column_width(item: type[BaseModel], column: str) -> str:
    """How wide a table shows a column of `item`'s field: text (prompts) wide enough to read, numbers
    and choices narrow, so the first columns (a box, its prompt, its model) fit beside the canvas."""
    ann, _ = _unwrap_optional(item.model_fields[column].annotation)
    return "150px" if ann is str else "72px"


def widget_for(name: str, info: FieldInfo) -> Widget:
    """The widget of one params field (see the module docstring)."""
    default = info.get_default(call_default_factory=True) if not info.is_required() else PydanticUndefined
    desc = info.description or ""
    ann, optional = _unwrap_optional(info.annotation)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return Widget(name, "choice", default, desc, choices=tuple(args))
    if ann is bool:
        return Widget(name, "bool", default, desc)
    if ann in (int, float) and (not optional or default is None):
        return Widget(name, ann.__name__, default, desc)
    if ann is str and (not optional or default is None):
        return Widget(name, "text", default, desc)
    if set(args) == {str, list[str]} and default in (None, PydanticUndefined):
        return Widget(name, "lines", default, f"{desc} (a list: one per line)" if desc else "a list: one per line")
    if origin is list and len(args) == 1 and _is_model(args[0]):
        return Widget(name, "table", default, desc, columns=table_columns(args[0]), item=args[0])
    # Unions, optional numbers, lists, tuples, nested models: YAML text, blank for "default".
    shown = default not in (None, PydanticUndefined) and default not in ({}, [])
    hint = f"YAML; blank: {json.dumps(default) if shown else 'none'}"
    if _is_model(ann):  # a nested model: an example mapping of its fields (required ones to fill in)
        hint += f"; e.g. {model_example(ann)}"
    return Widget(name, "yaml", default, f"{desc} ({hint})" if desc else hint)


def model_example(model: type[BaseModel]) -> str:
    """A one-line YAML mapping of a model's fields: the required ones as `...` (to fill in), the
    others at their defaults, optional ones left unset out."""
    import yaml

    example = {}
    for n, f in model.model_fields.items():
        if f.is_required():
            example[n] = "..."
        elif (d := f.get_default(call_default_factory=True)) is not None:
            example[n] = _jsonable(d)
    return yaml.safe_dump(example, default_flow_style=True, sort_keys=False, width=10**6).strip()


def method_widgets(method) -> list[Widget]:
    return [widget_for(n, f) for n, f in method.params.model_fields.items()]


MODEL_MAIN = ("model", "name", "prompt", "guidance_scale", "negative_prompt")
"""The fields of a model slot shown up front; every other field of `ModelEntry` (a single file's
config, a VAE, FLUX's true CFG, and any added later) goes under the slot's "more" accordion."""


def fields_widgets(model: type[BaseModel]) -> list[Widget]:
    """One widget per field of a pydantic model, in its order."""
    return [widget_for(n, f) for n, f in model.model_fields.items()]


def model_widgets() -> list[Widget]:
    """One widget per field of a recipe's model entry (`ModelEntry`), in its order."""
    from multifusion.recipe import ModelEntry

    return fields_widgets(ModelEntry)


SAMPLING_MAIN = ("num_inference_steps", "scheduler", "guidance_scale", "seed", "num_images", "height", "width", "eta")
"""The sampling fields shown up front; any other field of `Sampling` goes under a collapsed
accordion, as every field of `Runtime` does."""

SECTIONS = ("version", "method", "models", "params", "sampling", "runtime", "prompt", "negative_prompt")
"""The recipe's fields the form holds in sections of their own: the method's dropdown and form,
the model slots (which also take the recipe's default `prompt` and `negative_prompt`: each slot
giving none shows them), sampling and runtime. Every other field of `Recipe` gets a widget of
its own (`recipe_widgets`)."""


def sampling_widgets() -> list[Widget]:
    """One widget per field of `Sampling`."""
    from multifusion.recipe import Sampling

    return fields_widgets(Sampling)


def runtime_widgets() -> list[Widget]:
    """One widget per field of `Runtime`."""
    from multifusion.recipe import Runtime

    return fields_widgets(Runtime)


def recipe_widgets() -> list[Widget]:
    """One widget per field of `Recipe` outside `SECTIONS` (`merges`: YAML, one merge per name)."""
    from multifusion.recipe import Recipe

    return [widget_for(n, f) for n, f in Recipe.model_fields.items() if n not in SECTIONS]


def is_prompt(name: str) -> bool:
    """Prompt text is kept as typed; other text (paths, names, ids) is read trimmed."""
    return "prompt" in name


def to_widget(w: Widget, value: Any) -> Any:
    """A params value (as in a recipe) -> what the widget holds."""
    if w.kind == "table":
        rows = value or []
        return [[_cell(r.get(c) if isinstance(r, dict) else getattr(r, c, None)) for c in w.columns] for r in rows] or [
            [""] * len(w.columns)
        ]
    if w.kind == "yaml":
        if value is None or value is PydanticUndefined or (value in ({}, []) and value == w.default):  # blank: the empty default
            return ""
        import yaml

        value = list(value) if isinstance(value, tuple) else value
        value = value.model_dump(mode="json", exclude_none=True) if isinstance(value, BaseModel) else value
        if not isinstance(value, (list, dict)):
            return json.dumps(value)
        # A mapping of mappings (merges by name) one entry per line, its leaves inline; else one line.
        nested = isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())
        return yaml.safe_dump(value, default_flow_style=None if nested else True, sort_keys=False, width=10**6).strip()
    if w.kind == "lines":
        return "\n".join(value) if isinstance(value, list) else ("" if value in (None, PydanticUndefined) else value)
    if w.optional:
        return "" if value is None else str(value)
    if w.kind in ("int", "float", "bool", "choice"):
        return value
    return "" if value is None else value


def _cell(v: Any) -> Any:
    return "" if v is None else v


def _text_column(item: type[BaseModel] | None, column: str) -> bool:
    """True when a table's column holds text only (a prompt, a file path): kept as typed, never
    read as a number."""
    if item is None or column not in item.model_fields:
        return False
    return _unwrap_optional(item.model_fields[column].annotation)[0] is str


def _number(text: Any) -> Any:
    """A table cell as typed: numbers where they read as numbers, else the text."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text) if float(text).is_integer() else text
    s = str(text).strip()
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def from_widget(w: Widget, value: Any, where: str | None = None) -> Any:
    """What the widget holds -> a recipe value; `PydanticUndefined` for "leave it out" (blank,
    or equal to the default). RecipeError naming `where` (default `params.<field>`) for text that
    does not parse. Text other than prompts is trimmed; `lines` text of several lines is a list."""
    where = where or f"params.{w.name}"
    if w.kind == "table":
        rows = []
        for row in value or []:
            cells = {c: v for c, v in zip(w.columns, row) if v is not None and str(v).strip() != ""}
            if cells:
                rows.append({c: (str(v) if _text_column(w.item, c) else _number(v)) for c, v in cells.items()})
        return rows if rows or w.required else PydanticUndefined
    if w.kind == "yaml":
        if value is None or not str(value).strip():
            return PydanticUndefined
        import yaml

        try:
            parsed = yaml.safe_load(str(value))
        except yaml.YAMLError as err:
            raise RecipeError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
        return PydanticUndefined if parsed == _jsonable(w.default) else parsed
    if w.kind == "lines":
        lines = [] if value is None else str(value).split("\n")  # not splitlines: the inverse of to_widget's join
        return PydanticUndefined if not "".join(lines).strip() else lines[0] if len(lines) == 1 else lines
    if w.kind in ("int", "float"):
        if value is None or str(value).strip() == "":
            return PydanticUndefined
        value = _number(value)
        if isinstance(value, str):
            raise RecipeError(f"{where}: {value!r} is not a number")
        if w.kind == "int" and not isinstance(value, int):
            raise RecipeError(f"{where}: {value!r} is not a whole number")
    if value is None and w.kind in ("bool", "choice"):  # an emptied dropdown: the default
        return PydanticUndefined
    if w.kind == "text" and value is None:  # an emptied dropdown
        value = ""
    if w.kind == "text" and isinstance(value, str) and not is_prompt(w.name):
        value = value.strip()
    if w.kind == "text" and value == "" and not w.required:
        return PydanticUndefined
    return PydanticUndefined if value == w.default else value


def _jsonable(v: Any) -> Any:
    if v is PydanticUndefined:
        return PydanticUndefined
    return json.loads(json.dumps(list(v) if isinstance(v, tuple) else v, default=str))


def params_from_widgets(method, values: dict[str, Any], problems: list[str] | None = None) -> dict:
    """The params the widgets set; a field whose text does not parse raises its RecipeError, or,
    given `problems`, adds its line there and is left out (so every such field is named at once)."""
    out = {}
    for w in method_widgets(method):
        v = _collect(problems, from_widget, w, values.get(w.name))
        if v is not PydanticUndefined:
            out[w.name] = v
    return out


def _collect(problems: list[str] | None, read, *args) -> Any:
    """read(*args); with `problems` given, a RecipeError's lines are added there instead of raised
    (the value is then `PydanticUndefined`: left out)."""
    if problems is None:
        return read(*args)
    try:
        return read(*args)
    except RecipeError as err:
        problems.extend(error_lines(err))
        return PydanticUndefined


# ---- the recipe from the whole form ------------------------------------------------------------


def _read(widgets: list[Widget], values: dict[str, Any], prefix: str, problems: list[str] | None = None) -> dict:
    """The fields set by the widgets under `prefix` (blank or default ones left out); RecipeError
    naming `<prefix><field>` for text that does not parse (or its line added to `problems`)."""
    read = {w.name: _collect(problems, from_widget, w, values.get(prefix + w.name), prefix + w.name) for w in widgets}
    return {k: v for k, v in read.items() if v is not PydanticUndefined}


def recipe_from_form(values: dict[str, Any], method: str | None = None, problems: list[str] | None = None) -> dict:
    """The recipe dict the form's `values` (by form key, see the module docstring) describe, with
    `method` in place of the form's own; blank fields left out, so the library's defaults apply.
    Text that does not parse raises a RecipeError naming its field, or, given `problems`, each
    such field's line is added there and the field left out."""
    from multifusion.registry import METHODS

    method = method or values["method"]
    m = METHODS[method]
    params = params_from_widgets(m, {w.name: values.get(f"params:{method}:{w.name}") for w in method_widgets(m)}, problems)
    models = [_read(model_widgets(), values, f"models[{i}].", problems) for i in range(int(values["n_models"]))]
    recipe = {
        "version": 1,
        "method": method,
        "models": models,
        "params": params,
        "sampling": _read(sampling_widgets(), values, "sampling.", problems),
    }
    runtime = _read(runtime_widgets(), values, "runtime.", problems)
    if runtime:
        recipe["runtime"] = runtime
    return {**recipe, **_read(recipe_widgets(), values, "", problems)}


def form_from_recipe(data: dict) -> dict[str, Any]:
    """The form's values (by form key) holding a recipe dict: the method and its form, every
    model slot (those past the recipe's models blank), sampling, the recipe's own fields, and
    runtime only when the recipe has one (an image's recipe has none: the runtime is the
    person's own). RecipeError when the recipe does not parse or the form cannot hold it."""
    from multifusion.recipe import parse_recipe
    from multifusion.registry import get_method

    recipe = parse_recipe(data)
    method = get_method(recipe.method)
    if len(recipe.models) > MAX_MODELS:
        raise RecipeError(
            f"models: the recipe names {len(recipe.models)} models; the UI holds {MAX_MODELS} (run it with `multifusion generate`)"
        )
    values: dict[str, Any] = {"method": recipe.method, "n_models": len(recipe.models)}
    for i in range(MAX_MODELS):
        entry: dict[str, Any] = {}
        if i < len(recipe.models):
            # The recipe's default prompt and negative prompt go to each slot that gives none (the
            # slots are where prompts are written): the same prompts for every model.
            m = recipe.models[i]
            entry = {
                **m.model_dump(),
                "prompt": recipe.prompts_of(i, [0])[0] if m.prompt is None else m.prompt,
                "negative_prompt": recipe.negative_of(i) or None,
            }
            prompts = entry["prompt"] if isinstance(entry["prompt"], list) else [entry["prompt"] or ""]
            if any("\n" in p for p in prompts):
                raise RecipeError(
                    f"models[{i}].prompt: a prompt with a line break; the form holds one prompt per line (run it with "
                    "`multifusion generate`)"
                )
        values.update({f"models[{i}].{w.name}": to_widget(w, entry.get(w.name)) for w in model_widgets()})
    for w in method_widgets(method):
        values[f"params:{recipe.method}:{w.name}"] = to_widget(w, recipe.params.get(w.name, None if w.required else w.default))
    dumped = recipe.model_dump(mode="json")
    values.update({f"sampling.{w.name}": to_widget(w, dumped["sampling"][w.name]) for w in sampling_widgets()})
    if "runtime" in data:
        values.update({f"runtime.{w.name}": to_widget(w, dumped["runtime"][w.name]) for w in runtime_widgets()})
    own = recipe.model_dump(
        mode="json", include={w.name for w in recipe_widgets()}, exclude_defaults=True
    )  # merges: what they set
    values.update({w.name: to_widget(w, own.get(w.name)) for w in recipe_widgets()})
    return values


def restored_form(data: dict) -> tuple[dict[str, Any], list[str]]:
    """`form_from_recipe`, with what the person restoring should know: a recipe turning on
    `runtime.allow_pickle` (pickle weights run code when loaded) is restored with it off, and
    said so, until the person ticks it."""
    values = form_from_recipe(data)
    notes = []
    if values.get("runtime.allow_pickle"):
        values["runtime.allow_pickle"] = False
        notes.append(
            "runtime.allow_pickle: the recipe turns it on; it is left off here (pickle weights can run code when "
            "loaded): tick it under runtime only if you trust every model the recipe names"
        )
    return values, notes


# ---- errors at their field -----------------------------------------------------------------------

_LINE = re.compile(r"^\s*(?P<path>[A-Za-z_][\w\-]*(?:\[\d+\])?(?:\.[\w\-]+(?:\[\d+\])?)*):\s(?P<msg>.*)$")


def error_key(path: str) -> str:
    """Which form field an error path belongs to: `params.<field>`, `models[i].<field>` (a field
    of the model entry), `models[i]` (the slot), `sampling`, `runtime`, a recipe field of its own
    (`merges`), or `general`."""
    if path.startswith("params."):
        return "params." + re.split(r"[.\[]", path[len("params.") :])[0]
    m = re.match(r"models\[(\d+)\](?:\.(\w+))?", path)
    if m:
        fields = {w.name for w in model_widgets()}
        return f"models[{m.group(1)}]" + (f".{m.group(2)}" if m.group(2) in fields else "")
    if path == "models":
        return "models"
    head = re.split(r"[.\[]", path)[0]
    if head in ("sampling", "seeds") or head in {w.name for w in sampling_widgets()}:  # API errors name bare fields
        return "sampling"
    if head == "runtime":
        return "runtime"
    if head in {w.name for w in recipe_widgets()}:
        return head
    return "general"


def route_errors(err: BaseException | str) -> dict[str, list[str]]:
    """The lines of a library error, grouped by `error_key` (a line naming no field: `general`)."""
    text = str(err)
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.strip() != "invalid recipe:"]
    out: dict[str, list[str]] = {}
    for ln in lines:
        m = _LINE.match(ln)
        key = error_key(m.group("path")) if m else "general"
        out.setdefault(key, []).append(ln.strip())
    return out or {"general": [text]}


def error_lines(err: BaseException | str) -> list[str]:
    """The lines of a library error, its "invalid recipe:" heading left out."""
    return [ln.strip() for ln in str(err).splitlines() if ln.strip() and ln.strip() != "invalid recipe:"]


def error_box_of(form_key: str) -> str | None:
    """The error key (`route_errors`) whose box a form field's errors show in, so editing the
    field can clear it: a method's field its own box (`<method>:params.<field>`), a model field
    its own, sampling and runtime fields their section's, the model count the models'."""
    if form_key.startswith("params:"):
        _, method, name = form_key.split(":", 2)
        return f"{method}:params.{name}"
    if form_key == "n_models":
        return "models"
    if form_key in ("method", "preview_every"):
        return None
    key = error_key(form_key)
    return None if key == "general" else key


def check_recipe(data: dict) -> None:
    """Everything `multifusion validate` checks (no model loads); raises the library's errors."""
    from multifusion.recipe import parse_recipe
    from multifusion.validate import validate

    validate(parse_recipe(data))


def check_form(values: dict[str, Any], method: str | None = None) -> dict:
    """The form's recipe (`recipe_from_form`) checked as `multifusion validate` checks it, naming
    every problem found at once rather than the first: text that does not parse in any field;
    then the recipe's own check; then the parts it stops before, each checked alone: the params
    when the recipe's structure fails, and each model slot (as a `single` recipe of that model,
    so its reference, VAE and fields are checked as validate checks them). Raises one error of
    the first problem's kind holding every line."""
    from multifusion.recipe import parse_recipe
    from multifusion.registry import METHODS

    problems: list[str] = []
    data = recipe_from_form(values, method, problems)
    first: MultifusionError | None = RecipeError("invalid recipe") if problems else None
    try:
        check_recipe(data)
        structure_ok = True
    except MultifusionError as err:
        first = first or err
        problems += error_lines(err)
        try:
            parse_recipe(data)
            structure_ok = True
        except MultifusionError:
            structure_ok = False
    if first is None:
        return data
    if not structure_ok:  # the recipe's structure failed before its params were read: read them alone
        try:
            METHODS[data["method"]].parse_params(data["params"], len(data["models"]))
        except MultifusionError as err:
            problems += error_lines(err)
    for i, entry in enumerate(data["models"]):
        alone = {k: v for k, v in data.items() if k not in ("method", "params", "models")}
        alone.update(method="single", params={}, models=[entry])
        if not structure_ok:  # sampling may be what fails: each model is checked on the defaults
            alone["sampling"] = {}
        try:
            check_recipe(alone)
        except MultifusionError as err:
            problems += [f"models[{i}]" + ln.removeprefix("models[0]") for ln in error_lines(err) if ln.startswith("models[0]")]
    lines = list(dict.fromkeys(problems))  # each once, in the order found
    raise type(first)("\n".join(lines))


def read_recipe_file(path: str) -> dict:
    """The recipe in a PNG written by multifusion (or a YAML/JSON recipe file); RecipeError
    naming the dropped file otherwise, as `multifusion generate --from-image` does."""
    from pathlib import Path

    from multifusion.provenance import recipe_from_image

    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        from multifusion.recipe import parse_recipe

        try:  # the CLI's reading, with its limits (UTF-8, YAML aliases expanding past MAX_YAML_NODES)
            recipe = parse_recipe(p)
        except MultifusionError as err:
            raise type(err)(str(err).replace(str(p), p.name)) from None
        return recipe.model_dump(mode="json", exclude_unset=True)
    try:  # the reader of `multifusion generate --from-image`: the same fields, never `runtime` (pickles, devices)
        return recipe_from_image(p)[0]
    except MultifusionError as err:
        raise type(err)(str(err).replace(str(p), p.name)) from None
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"{p.name!r} is not a readable image ({type(err).__name__}: {str(err).replace(str(p), p.name)})"
        ) from None


# ---- canvas: the boxes of a method, drawn, clicked and dragged --------------------------------

BOX = ("row_init", "row_end", "col_init", "col_end")


@dataclass(frozen=True)
class Layer:
    """A table of boxes shown on the canvas: `paint` (regions that denoise: filled, coloured by
    index, counted for coverage), `image` (a reference image shown in its box) or `outline`
    (any other box, e.g. a reroll: a dashed outline)."""

    name: str
    kind: Literal["paint", "image", "outline"]


def canvas_layers(widgets: list[Widget]) -> list[Layer]:
    """The box tables of a method's form (tables whose items have the four box edges), regions
    that paint first; [] when none paints (the method has no canvas)."""
    layers = []
    for w in widgets:
        if w.kind == "table" and set(BOX) <= set(w.columns):
            kind = "paint" if "prompt" in w.columns else "image" if "image" in w.columns else "outline"
            layers.append(Layer(w.name, kind))
    layers.sort(key=lambda layer: ("paint", "image", "outline").index(layer.kind))
    return layers if any(layer.kind == "paint" for layer in layers) else []


def snap(v: float, factor: int, size: int, units: str = "px") -> int:
    """A region edge on the latent grid, in pixels (as `Box.latent_box` places fraction edges)."""
    px = v * size if units == "fraction" else v
    return int(min(max(round(px / factor) * factor, 0), size))


def box_px(item: dict, height: int, width: int, factor: int) -> tuple[int, int, int, int] | None:
    """(row_init, row_end, col_init, col_end) of a table item in pixels, snapped to the grid and
    clamped to the canvas; None when an edge is missing or not a number."""
    try:
        units = item.get("units", "px") or "px"
        r0, r1, c0, c1 = (float(item[k]) for k in BOX)
    except (KeyError, TypeError, ValueError):
        return None
    return (
        snap(r0, factor, height, units),
        snap(r1, factor, height, units),
        snap(c0, factor, width, units),
        snap(c1, factor, width, units),
    )


def canvas_boxes(
    layers: list[tuple[Layer, list[dict]]], height: int, width: int, factor: int
) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Every drawable box in drawing order (later ones on top): (layer index, item index, pixel box)."""
    out = []
    for li, (_, items) in enumerate(layers):
        for i, item in enumerate(items):
            box = box_px(item, height, width, factor)
            if box is not None and box[0] < box[1] and box[2] < box[3]:
                out.append((li, i, box))
    return out


CORNERS = {
    "top-left": (0, 2),
    "top-right": (0, 3),
    "bottom-left": (1, 2),
    "bottom-right": (1, 3),
}  # (row edge, col edge) indices of a box


def grip_size(height: int, width: int, factor: int) -> int:
    """How near a corner (in canvas pixels) a press grabs it for resizing: a tenth of the shorter
    side, at least one latent cell."""
    return max(factor, min(height, width) // 10)


def hit_test(boxes: list[tuple[int, int, int, int]], row: float, col: float, grip: float) -> tuple[int, str] | None:
    """The topmost (last) box under a canvas point and what a drag there does: (index, "move"),
    or (index, corner name) within `grip` pixels of a corner (the grip shrinks to a quarter of a
    small box's shorter side, so a small box can still be moved); None when no box is there."""
    for i in range(len(boxes) - 1, -1, -1):
        r0, r1, c0, c1 = boxes[i]
        if not (r0 <= row <= r1 and c0 <= col <= c1):
            continue
        g = min(grip, min(r1 - r0, c1 - c0) / 4)
        for name, (row_edge, col_edge) in CORNERS.items():
            if abs(row - boxes[i][row_edge]) <= g and abs(col - boxes[i][col_edge]) <= g:
                return i, name
        return i, "move"
    return None


def drag_box(
    box: tuple[int, int, int, int], handle: str, d_row: float, d_col: float, factor: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """A box after a drag of (d_row, d_col) canvas pixels: "move" shifts it whole by the drag
    snapped to the latent grid, stopping at the canvas' edges (its size kept); a corner name
    moves that corner to the grid, inside the canvas, at least one latent cell from the
    opposite corner."""
    r0, r1, c0, c1 = box
    if handle == "move":
        dr = min(max(round(d_row / factor) * factor, -r0), height - r1)
        dc = min(max(round(d_col / factor) * factor, -c0), width - c1)
        return r0 + dr, r1 + dr, c0 + dc, c1 + dc
    if handle not in CORNERS:
        raise ValueError(f"handle must be 'move' or one of {', '.join(CORNERS)}, got {handle!r}")
    out = [r0, r1, c0, c1]
    for edge, delta, size in ((CORNERS[handle][0], d_row, height), (CORNERS[handle][1], d_col, width)):
        v = snap(out[edge] + delta, factor, size)
        if edge in (0, 2):  # an init edge stays a cell before its end
            v = min(v, out[edge + 1] - factor)
        else:
            v = max(v, out[edge - 1] + factor)
        out[edge] = v
    return out[0], out[1], out[2], out[3]


def with_box(item: dict, box: tuple[int, int, int, int]) -> dict:
    """The item with its edges set to a pixel box (an item given in fractions turns to pixels)."""
    out = {**item, **dict(zip(BOX, box))}
    if out.get("units") == "fraction":
        out["units"] = "px"
    return out


def drag_edit(
    layers: list[tuple[Layer, list[dict]]],
    start: tuple[float, float],
    end: tuple[float, float],
    factor: int,
    height: int,
    width: int,
    scale: int,
    new_item: dict,
    draw: bool = False,
) -> tuple[list[tuple[Layer, list[dict]]], str]:
    """The canvas' tables after a drag from `start` to `end` (x, y in preview pixels, `scale`
    preview pixels per canvas pixel), with what happened: a box under `start` is moved, or
    resized when grabbed by a corner; on empty canvas (or with `draw`) the drag draws a new
    region (`new_item` plus its box) in the first table that paints."""
    (x0, y0), (x1, y1) = start, end
    placed = canvas_boxes(layers, height, width, factor)
    hit = None if draw else hit_test([b for _, _, b in placed], y0 / scale, x0 / scale, grip_size(height, width, factor))
    out = [(layer, list(items)) for layer, items in layers]
    if hit is None:
        li = next(k for k, (layer, _) in enumerate(layers) if layer.kind == "paint")
        box = box_from_clicks(start, end, factor, height, width, scale)
        out[li][1].append({**box, **new_item})
        return (
            out,
            f"{layers[li][0].name}[{len(out[li][1]) - 1}] drawn: rows {box['row_init']}-{box['row_end']}, cols {box['col_init']}-{box['col_end']}",
        )
    li, i, box = placed[hit[0]]
    new = drag_box(box, hit[1], (y1 - y0) / scale, (x1 - x0) / scale, factor, height, width)
    out[li][1][i] = with_box(out[li][1][i], new)
    verb = "moved" if hit[1] == "move" else f"resized by its {hit[1]} corner"
    return out, f"{layers[li][0].name}[{i}] {verb}: rows {new[0]}-{new[1]}, cols {new[2]}-{new[3]}"


def canvas_state(layers: list[tuple[Layer, list[dict]]], height: int, width: int, factor: int, scale: int) -> str:
    """JSON for the page's drag script: the boxes in drawing order (pixels), the preview scale and
    the corner grip, so it can show a box following the pointer (the edit itself is
    `drag_edit`'s)."""
    return json.dumps(
        {
            "scale": scale,
            "grip": grip_size(height, width, factor),
            "size": [height, width],
            "boxes": [list(b) for _, _, b in canvas_boxes(layers, height, width, factor)],
        }
    )


def preview_scale(height: int, width: int) -> int:
    """Preview pixels per canvas pixel: small canvases enlarged to about 384 pixels."""
    return max(1, 384 // max(height, width))


def canvas_facts(model: str | None) -> tuple[int, int]:
    """(VAE factor, native size in pixels) of a model read from its local config; (8, 512) when
    it is not local."""
    from multifusion.loading import read_facts, resolve

    try:
        facts = read_facts(resolve(model or ""))
    except (MultifusionError, OSError, TypeError, KeyError, ValueError):
        facts = None
    return (8, 512) if facts is None else (facts.vae_scale_factor, facts.native_px)


def box_label(i: int, item: dict) -> str:
    """What a region's box says on the canvas: its index, its model and its prompt."""
    model = item.get("model")
    prompt = str(item.get("prompt") or "").strip()
    return f"{i} " + (f"[model {model}] " if model not in (None, "") else "") + (prompt or "(no prompt)")


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """`text` cut (with "...") to fit `width` pixels of the drawing's font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def _dashed(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: tuple, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for x in range(x0, x1, 2 * dash):
        draw.line((x, y0, min(x + dash, x1), y0), fill=colour, width=2)
        draw.line((x, y1, min(x + dash, x1), y1), fill=colour, width=2)
    for y in range(y0, y1, 2 * dash):
        draw.line((x0, y, x0, min(y + dash, y1)), fill=colour, width=2)
        draw.line((x1, y, x1, min(y + dash, y1)), fill=colour, width=2)


def _reference(path: Any, size: tuple[int, int]) -> Image.Image | None:
    try:
        with Image.open(str(path)) as im:
            return im.convert("RGB").resize(size)
    except (OSError, ValueError):
        return None


Placed = tuple[str, tuple[int, int, int, int], Any]
"""A denoising region as a method places it: (where, latent box (r0, r1, c0, c1), weights (h, w))."""


def method_regions(
    method, params: dict, n_models: int, height: int, width: int, factor: int
) -> tuple[list[Placed], tuple[int, int]]:
    """The denoising regions `method` places for a form's `params` (its `regions` hook on the
    params validated as a recipe's), with the (height, width) canvas they lie on: the method's
    own when it fixes one (tiles do), else the one given. This is what a run mixes, tiles and
    background expanded by the method itself. RecipeError naming the field when the params do
    not validate or place; no regions when the method places none."""
    if method.regions is None:
        return [], (height, width)
    parsed = method.parse_params(params, n_models)
    size = (method.canvas(parsed) if method.canvas else None) or (height, width)
    return method.regions(parsed, size, factor), size


def uncovered(layers: list[tuple[Layer, list[dict]]], placed: list[Placed] | None, height: int, width: int, factor: int):
    """(h, w) bool tensor on the latent grid: the cells of total weight 0 (`regions.coverage`).
    From `placed` (`method_regions`: what a run mixes) when given; else, while the params do not
    validate, from the boxes of the tables that paint as the canvas draws them."""
    import torch

    from multifusion.noise.regions import coverage

    latent = (height // factor, width // factor)
    if placed is None:
        boxes = [
            tuple(v // factor for v in box)
            for li, _, box in canvas_boxes(layers, height, width, factor)
            if layers[li][0].kind == "paint"
        ]
        placed = [("", b, torch.ones(b[1] - b[0], b[3] - b[2])) for b in boxes]
    return coverage([b for _, b, _ in placed], [w for _, _, w in placed], latent) <= 0


def _derived(
    layers: list[tuple[Layer, list[dict]]], placed: list[Placed] | None
) -> list[tuple[int, str, tuple[int, int, int, int]]]:
    """(index among the placed regions, name, latent box) of the placed regions no table holds
    (tiles, a background): drawn on the canvas, never dragged."""
    tables = {layer.name for layer, _ in layers}
    out = []
    for k, (where, box, _) in enumerate(placed or []):
        name = where.removeprefix("params.")
        if re.sub(r"\[\d+\]$", "", name) not in tables:
            out.append((k, name, box))
    return out


def regions_preview(
    layers: list[tuple[Layer, list[dict]]],
    height: int,
    width: int,
    factor: int,
    scale: int | None = None,
    placed: list[Placed] | None = None,
    problem: str | None = None,
) -> tuple[Image.Image, str]:
    """The canvas with every box snapped to the latent grid: regions that paint filled and
    coloured by index (the colours of the region-weight picture), reference images in their
    boxes, other boxes (rerolls) dashed; regions the method places from other parameters
    (`placed` entries no table holds): a canvas-wide one (a background) tinted and hatched under
    everything, others (tiles) outlined; the latent grid; the `uncovered` pixels hatched in red.
    With a note of what was snapped or lies outside, of the coverage, and of `problem` (why the
    params do not place yet)."""
    from multifusion.viz import PALETTE

    scale = scale or preview_scale(height, width)
    im = Image.new("RGB", (width * scale, height * scale), (245, 245, 245))
    draw = ImageDraw.Draw(im, "RGBA")
    notes = []
    derived = _derived(layers, placed)
    for k, name, box in derived:  # canvas-wide ones (a background) beneath everything
        if box == (0, height // factor, 0, width // factor):
            col = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
            draw.rectangle((0, 0, im.width - 1, im.height - 1), fill=col + (35,))
            for d in range(-im.height, im.width, 12):  # hatched the other way from uncovered cells
                draw.line((d, 0, d + im.height, im.height), fill=col + (70,), width=1)
            label = f"{name} (whole canvas)"  # bottom right: table boxes' labels sit top left
            draw.text(
                (im.width - draw.textlength(label) - 6, im.height - 15),
                label,
                fill=tuple(c // 2 for c in col) + (255,),
                stroke_width=1,
                stroke_fill=(255, 255, 255, 255),
            )
            notes.append(f"{name} covers the whole canvas")
    tiles = [(k, name, box) for k, name, box in derived if box != (0, height // factor, 0, width // factor)]
    if tiles:
        notes.append(
            f"{len(tiles)} region(s) placed from the parameters ({', '.join(n for _, n, _ in tiles)}): outlined, "
            "edited in their field"
        )
    for layer, items in layers:
        for i, r in enumerate(items):
            where = f"{layer.name}[{i}]"
            box = box_px(r, height, width, factor)
            if box is None:
                notes.append(f"{where}: needs row_init, row_end, col_init, col_end")
                continue
            r0, r1, c0, c1 = box
            raw = [float(r[k]) for k in BOX]
            units = r.get("units", "px") or "px"
            if units == "px" and [r0, r1, c0, c1] != raw:
                notes.append(f"{where}: snapped to rows {r0}-{r1}, cols {c0}-{c1} (multiples of {factor})")
            if max(raw[:2]) > (1 if units == "fraction" else height) or max(raw[2:]) > (1 if units == "fraction" else width):
                notes.append(f"{where}: lies outside the {height}x{width} canvas")
            if r1 <= r0 or c1 <= c0:
                notes.append(f"{where}: the box is empty on the {factor}-pixel grid")
                continue
            xy = (c0 * scale, r0 * scale, c1 * scale - 1, r1 * scale - 1)
            if layer.kind == "paint":
                col = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
                draw.rectangle(xy, fill=col + (70,), outline=col + (255,), width=2)
                label = _fit(draw, box_label(i, r), xy[2] - xy[0] - 6)
                draw.text((xy[0] + 4, xy[1] + 3), label, fill=(0, 0, 0, 255), stroke_width=1, stroke_fill=(255, 255, 255, 255))
            elif layer.kind == "image":
                ref = _reference(r.get("image", ""), (xy[2] - xy[0] + 1, xy[3] - xy[1] + 1))
                if ref is not None:
                    im.paste(Image.blend(im.crop((xy[0], xy[1], xy[2] + 1, xy[3] + 1)), ref, 0.8), xy[:2])
                else:
                    notes.append(f"{where}: no readable image at {str(r.get('image', ''))!r}")
                _dashed(draw, xy, (20, 20, 20, 255))
                draw.text(
                    (xy[0] + 4, xy[3] - 13), f"image {i}", fill=(255, 255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0, 255)
                )
            else:
                _dashed(draw, xy, (200, 0, 160, 255))
                draw.text((xy[0] + 4, xy[3] - 13), f"{layer.name.rstrip('s')} {i}", fill=(200, 0, 160, 255))
    for k, name, (r0, r1, c0, c1) in tiles:  # outlines over the tables' fills
        col = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        xy = (c0 * factor * scale, r0 * factor * scale, c1 * factor * scale - 1, r1 * factor * scale - 1)
        draw.rectangle(xy, outline=col + (255,), width=3)
        draw.text((xy[0] + 5, xy[1] + 16), name, fill=col + (255,), stroke_width=1, stroke_fill=(255, 255, 255, 255))
    for y in range(0, height, factor):  # the latent grid
        draw.line((0, y * scale, width * scale, y * scale), fill=(0, 0, 0, 25))
    for x in range(0, width, factor):
        draw.line((x * scale, 0, x * scale, height * scale), fill=(0, 0, 0, 25))
    holes = uncovered(layers, placed, height, width, factor)
    s = factor * scale
    for y, x in holes.nonzero().tolist():
        x0, y0 = x * s, y * s
        draw.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=(255, 0, 0, 60))
        draw.line((x0, y0 + s - 1, x0 + s - 1, y0), fill=(220, 0, 0, 200))
    if problem:
        first = next((ln.strip() for ln in problem.splitlines() if ln.strip() and ln.strip() != "invalid recipe:"), problem)
        notes.append(f"not placed as a run would place it yet ({first}): coverage counts the drawn boxes")
    missing = int(holes.sum()) * factor * factor
    if missing:
        notes.append(f"{missing} of {height * width} pixels are covered by no region (hatched red)")
    else:
        notes.append(f"every pixel of the {height}x{width} canvas is covered")
    return im, "\n".join(f"- {n}" for n in notes)


def tile_rows(
    rows: int, cols: int, tile_height: int, tile_width: int, overlap: int, prompt: str, model: str | int = 0
) -> list[dict]:
    """Regions tiling a canvas in a rows x cols grid with `overlap` pixels between neighbours
    (the tiles of Mixture of Diffusers, as `TilesParams.regions` places them)."""
    from multifusion.noise.methods import TilesParams

    tiles = TilesParams(
        prompts=[[prompt] * cols for _ in range(rows)],
        tile_height=tile_height,
        tile_width=tile_width,
        tile_row_overlap=overlap,
        tile_col_overlap=overlap,
        model=model,
    )
    return [r.model_dump(include={"row_init", "row_end", "col_init", "col_end", "prompt", "model"}) for r in tiles.regions()]


def box_from_clicks(a: tuple[float, float], b: tuple[float, float], factor: int, height: int, width: int, scale: int) -> dict:
    """A region from two corners on the preview (x, y in preview pixels), snapped to the grid."""
    (x0, y0), (x1, y1) = a, b
    rows = sorted((snap(y0 / scale, factor, height), snap(y1 / scale, factor, height)))
    cols = sorted((snap(x0 / scale, factor, width), snap(x1 / scale, factor, width)))
    if rows[0] == rows[1]:
        rows[1] = min(rows[0] + factor, height) if rows[0] < height else height
        rows[0] = rows[1] - factor
    if cols[0] == cols[1]:
        cols[1] = min(cols[0] + factor, width) if cols[0] < width else width
        cols[0] = cols[1] - factor
    return {"row_init": rows[0], "row_end": rows[1], "col_init": cols[0], "col_end": cols[1]}
