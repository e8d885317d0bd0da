"""What the web UI shows, without Gradio: widgets described from a method's params model, form
values turned into a recipe and back, errors routed to the field they name, the region preview.

Nothing here knows a particular method: a widget is chosen from each field's annotation
(`Literal` -> a choice, `bool` -> a checkbox, `int`/`float` -> a number, `str` -> a text box,
a list of parameter models -> a table with one column per field of the item model, anything
else -> YAML text), with the field's default and description from the registry. A method
registered later appears in the UI with no code here.
"""

from __future__ import annotations

import json
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

ZOO_NAMES = ("general", "expert", "cartoon", "layout", "palette", "slice0", "slice1")


@dataclass(frozen=True)
class Widget:
    """One form field of a method's params: how to show it and how to read it back."""

    name: str
    kind: Literal["choice", "bool", "int", "float", "text", "table", "yaml"]
    default: Any  # PydanticUndefined when required
    description: str
    choices: tuple = ()
    columns: tuple[str, ...] = ()  # table: the item model's fields, required ones first
    item: type[BaseModel] | None = None

    @property
    def required(self) -> bool:
        return self.default is PydanticUndefined

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
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return ann, False


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def table_columns(item: type[BaseModel]) -> tuple[str, ...]:
    fields = item.model_fields
    return tuple([n for n, f in fields.items() if f.is_required()] + [n for n, f in fields.items() if not f.is_required()])


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
    if ann in (int, float) and not optional:
        return Widget(name, ann.__name__, default, desc)
    if ann is str and not optional:
        return Widget(name, "text", default, desc)
    if origin is list and len(args) == 1 and _is_model(args[0]):
        return Widget(name, "table", default, desc, columns=table_columns(args[0]), item=args[0])
    # Unions, optional numbers, lists, tuples, nested models: YAML text, blank for "default".
    hint = f"YAML; blank: {json.dumps(default) if default not in (None, PydanticUndefined) else 'none'}"
    return Widget(name, "yaml", default, f"{desc} ({hint})" if desc else hint)


def method_widgets(method) -> list[Widget]:
    return [widget_for(n, f) for n, f in method.params.model_fields.items()]


def to_widget(w: Widget, value: Any) -> Any:
    """A params value (as in a recipe) -> what the widget holds."""
    if w.kind == "table":
        rows = value or []
        return [[_cell(r.get(c) if isinstance(r, dict) else getattr(r, c, None)) for c in w.columns] for r in rows] or [[""] * len(w.columns)]
    if w.kind == "yaml":
        if value is None or value is PydanticUndefined:
            return ""
        import yaml

        value = list(value) if isinstance(value, tuple) else value
        value = value.model_dump(mode="json", exclude_none=True) if isinstance(value, BaseModel) else value
        if not isinstance(value, (list, dict)):
            return json.dumps(value)
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    if w.kind in ("int", "float", "bool", "choice"):
        return value
    return "" if value is None else value


def _cell(v: Any) -> Any:
    return "" if v is None else v


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


def from_widget(w: Widget, value: Any) -> Any:
    """What the widget holds -> a params value; `PydanticUndefined` for "leave it out" (blank,
    or equal to the default). RecipeError naming `params.<field>` for text that does not parse."""
    if w.kind == "table":
        rows = []
        for row in value or []:
            cells = {c: v for c, v in zip(w.columns, row) if v is not None and str(v).strip() != ""}
            if cells:
                rows.append({c: (_number(v) if c != "prompt" and c != "negative_prompt" else str(v)) for c, v in cells.items()})
        return rows if rows or w.required else PydanticUndefined
    if w.kind == "yaml":
        if value is None or not str(value).strip():
            return PydanticUndefined
        import yaml

        try:
            parsed = yaml.safe_load(str(value))
        except yaml.YAMLError as err:
            raise RecipeError(f"params.{w.name}: not valid YAML ({str(err).splitlines()[0]})") from None
        return PydanticUndefined if parsed == _jsonable(w.default) else parsed
    if w.kind in ("int", "float"):
        if value is None or str(value).strip() == "":
            return PydanticUndefined
        value = _number(value)
    if w.kind == "text" and value == "" and not w.required:
        return PydanticUndefined
    return PydanticUndefined if value == w.default else value


def _jsonable(v: Any) -> Any:
    if v is PydanticUndefined:
        return PydanticUndefined
    return json.loads(json.dumps(list(v) if isinstance(v, tuple) else v, default=str))


def params_from_widgets(method, values: dict[str, Any]) -> dict:
    out = {}
    for w in method_widgets(method):
        v = from_widget(w, values.get(w.name))
        if v is not PydanticUndefined:
            out[w.name] = v
    return out


# ---- the recipe from the whole form ------------------------------------------------------------

MODEL_KEYS = ("model", "name", "prompt", "guidance_scale", "negative_prompt")
SAMPLING_FORM = ("num_inference_steps", "scheduler", "guidance_scale", "seed", "num_images", "height", "width", "eta")


def recipe_from_form(method: str, n_models: int, models: list[dict], params: dict, sampling: dict) -> dict:
    """The recipe dict the form describes (blank fields left out, so the library's defaults apply)."""
    def number(where: str, v: Any, cast: type) -> Any:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: {str(v)!r} is not a number") from None
        if cast is int and not x.is_integer():
            raise RecipeError(f"{where}: {str(v)!r} is not a whole number")
        return cast(x)

    entries = []
    for i, m in enumerate(models[: int(n_models)]):
        e = {k: (v.strip() if isinstance(v, str) and k in ("model", "name") else v) for k, v in m.items() if v is not None and str(v).strip() != ""}
        if "guidance_scale" in e:
            e["guidance_scale"] = number(f"models[{i}].guidance_scale", e["guidance_scale"], float)
        entries.append(e)
    samp = {}
    for k, v in sampling.items():
        if v is None or str(v).strip() == "":
            continue
        samp[k] = v if k == "scheduler" else number(f"sampling.{k}", v, float if k in ("guidance_scale", "eta") else int)
    return {"version": 1, "method": method, "models": entries, "params": params, "sampling": samp}


def form_from_recipe(data: dict) -> tuple[str, int, list[dict], dict, dict]:
    """(method, number of models, model slots, params, sampling) of a recipe dict; RecipeError
    when the form cannot hold it."""
    from multifusion.recipe import parse_recipe

    recipe = parse_recipe(data)
    if len(recipe.models) > MAX_MODELS:
        raise RecipeError(f"models: the recipe names {len(recipe.models)} models; the UI holds {MAX_MODELS} (run it with `multifusion generate`)")
    default_prompt = recipe.prompt
    slots = []
    for m in recipe.models:
        prompt = m.prompt if m.prompt is not None else default_prompt
        slots.append({"model": m.model, "name": m.name or "", "prompt": prompt[0] if isinstance(prompt, list) else (prompt or ""),
                      "guidance_scale": m.guidance_scale, "negative_prompt": m.negative_prompt or ""})
    sampling = recipe.sampling.model_dump()
    return recipe.method, len(recipe.models), slots, dict(recipe.params), sampling


# ---- errors at their field -----------------------------------------------------------------------

_LINE = re.compile(r"^\s*(?P<path>[A-Za-z_][\w\-]*(?:\[\d+\])?(?:\.[\w\-]+(?:\[\d+\])?)*):\s(?P<msg>.*)$")


def error_key(path: str) -> str:
    """Which form field an error path belongs to: `params.<field>`, `models[i]`, `sampling`,
    `png`, or `general`."""
    if path.startswith("params."):
        return "params." + re.split(r"[.\[]", path[len("params."):])[0]
    m = re.match(r"models\[(\d+)\]", path)
    if m:
        return f"models[{m.group(1)}]"
    if path == "models":
        return "models"
    if path.startswith("sampling") or path in SAMPLING_FORM or path == "seeds":
        return "sampling"
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


def check_recipe(data: dict) -> None:
    """Everything `multifusion validate` checks (no model loads); raises the library's errors."""
    from multifusion.recipe import parse_recipe, validate

    validate(parse_recipe(data))


def read_recipe_file(path: str) -> dict:
    """The recipe in a PNG written by multifusion (or a YAML/JSON recipe file); RecipeError
    naming the dropped file otherwise, as `multifusion generate --from-image` does."""
    from pathlib import Path

    from multifusion.io import recipe_from_image

    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except Exception as err:
            raise RecipeError(f"{p.name!r} is not a valid recipe file: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p.name!r} must hold a mapping at top level")
        return data
    try:  # the reader of `multifusion generate --from-image`: the same fields, never `runtime` (pickles, devices)
        return recipe_from_image(p)[0]
    except MultifusionError as err:
        raise type(err)(str(err).replace(str(p), p.name)) from None
    except (OSError, ValueError) as err:
        raise RecipeError(f"{p.name!r} is not a readable image ({type(err).__name__}: {str(err).replace(str(p), p.name)})") from None


# ---- canvas: regions preview ---------------------------------------------------------------------

PALETTE = [(230, 80, 60), (60, 130, 230), (250, 200, 40), (70, 180, 90), (170, 90, 200), (240, 140, 40), (90, 200, 210), (200, 200, 200)]


def canvas_facts(model: str | None) -> tuple[int, int]:
    """(VAE factor, native size in pixels) of a model read from its local config; (8, 512) when
    it is not local."""
    from pathlib import Path

    from multifusion.loading import read_local_config, resolve

    try:
        ref = resolve(model or "")
        cfg = read_local_config(ref)
        unet = json.loads((Path(ref.location) / "unet" / "config.json").read_text())
        return cfg["vae_scale_factor"], int(unet["sample_size"]) * cfg["vae_scale_factor"]
    except (MultifusionError, OSError, TypeError, KeyError, ValueError):
        return 8, 512


def snap(v: float, factor: int, size: int, units: str = "px") -> int:
    """A region edge on the latent grid, in pixels (as `Box.latent_box` places fraction edges)."""
    px = v * size if units == "fraction" else v
    return int(min(max(round(px / factor) * factor, 0), size))


def regions_preview(rows: list[dict], height: int, width: int, factor: int, scale: int | None = None) -> tuple[Image.Image, str]:
    """The canvas with each region's box snapped to the latent grid (coloured by region, labelled
    by index), the latent grid, and the pixels no region covers hatched in red; with a note of
    what was snapped and how many pixels are uncovered."""
    scale = scale or max(1, 384 // max(height, width))
    im = Image.new("RGB", (width * scale, height * scale), (245, 245, 245))
    draw = ImageDraw.Draw(im, "RGBA")
    covered = [[False] * (width // factor) for _ in range(height // factor)]
    notes = []
    for i, r in enumerate(rows):
        try:
            units = r.get("units", "px") or "px"
            raw = [float(r[k]) for k in ("row_init", "row_end", "col_init", "col_end")]
        except (KeyError, TypeError, ValueError):
            notes.append(f"region {i}: needs row_init, row_end, col_init, col_end")
            continue
        r0, r1 = (snap(v, factor, height, units) for v in raw[:2])
        c0, c1 = (snap(v, factor, width, units) for v in raw[2:])
        if units == "px" and [r0, r1, c0, c1] != raw:
            notes.append(f"region {i}: snapped to rows {r0}-{r1}, cols {c0}-{c1} (multiples of {factor})")
        if max(raw[1], raw[0]) > (1 if units == "fraction" else height) or max(raw[3], raw[2]) > (1 if units == "fraction" else width):
            notes.append(f"region {i}: lies outside the {height}x{width} canvas")
        for y in range(r0 // factor, r1 // factor):
            for x in range(c0 // factor, c1 // factor):
                covered[y][x] = True
        col = PALETTE[i % len(PALETTE)]
        draw.rectangle((c0 * scale, r0 * scale, c1 * scale - 1, r1 * scale - 1), fill=col + (70,), outline=col + (255,), width=2)
        draw.text((c0 * scale + 4, r0 * scale + 3), str(i), fill=(0, 0, 0, 255))
    for y in range(0, height, factor):  # the latent grid
        draw.line((0, y * scale, width * scale, y * scale), fill=(0, 0, 0, 25))
    for x in range(0, width, factor):
        draw.line((x * scale, 0, x * scale, height * scale), fill=(0, 0, 0, 25))
    missing = 0
    for y, row in enumerate(covered):
        for x, c in enumerate(row):
            if not c:
                missing += factor * factor
                x0, y0 = x * factor * scale, y * factor * scale
                s = factor * scale
                draw.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=(255, 0, 0, 60))
                draw.line((x0, y0 + s - 1, x0 + s - 1, y0), fill=(220, 0, 0, 200))
    if missing:
        notes.append(f"{missing} of {height * width} pixels are covered by no region (hatched red)")
    else:
        notes.append(f"every pixel of the {height}x{width} canvas is covered")
    return im, "\n".join(f"- {n}" for n in notes)


def tile_rows(rows: int, cols: int, tile_height: int, tile_width: int, overlap: int, prompt: str, model: str | int = 0) -> list[dict]:
    """Regions tiling a canvas in a rows x cols grid with `overlap` pixels between neighbours
    (the tiles of Mixture of Diffusers, as `TilesParams.regions` places them)."""
    from multifusion.noise.methods import TilesParams

    tiles = TilesParams(prompts=[[prompt] * cols for _ in range(rows)], tile_height=tile_height, tile_width=tile_width,
                        tile_row_overlap=overlap, tile_col_overlap=overlap, model=model)
    return [r.model_dump(include={"row_init", "row_end", "col_init", "col_end", "prompt", "model"}) for r in tiles.regions()]


def box_from_clicks(a: tuple[float, float], b: tuple[float, float], factor: int, height: int, width: int, scale: int) -> dict:
    """A region from two clicks on the preview (x, y in preview pixels), snapped to the grid."""
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
