"""Canvas geometry: the canvas size a run samples, its limits, and the grids that sizes and
region boxes must lie on (the VAE factor; for transformers the patch grid)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from multifusion.errors import RecipeError

# What these functions read of a recipe, a method and its params (`recipe.Recipe`,
# `method.Method`, `method.Params`); named loosely here so that geometry depends on nothing above it.
Recipe = Method = Params = Any


def pixels_problem(height: int, width: int, max_pixels: int) -> str | None:
    """What is wrong with a height x width canvas beyond `max_pixels`, with a floor estimate of the
    memory it needs (the decoded float32 image alone: 12 bytes a pixel; the UNet's activations
    grow faster still, with the square of the latent area in attention layers); None if it fits."""
    pixels = height * width
    if pixels <= max_pixels:
        return None
    need = pixels * 3 * 4
    return (
        f"{height} x {width} = {pixels:,} pixels exceeds runtime.max_pixels ({max_pixels:,}); one image needs "
        f"at least {need / 2**30:,.1f} GiB for its decoded float32 pixels alone, and far more for the UNet's "
        "activations. Use a smaller canvas, or raise runtime.max_pixels on purpose if the machine has the memory"
    )


def check_pixels(height: int, width: int, max_pixels: int, where: str) -> None:
    """RecipeError naming `where` when the canvas exceeds `max_pixels` (see `pixels_problem`)."""
    problem = pixels_problem(height, width, max_pixels)
    if problem:
        raise RecipeError(f"{where}: {problem}")


def grid_hint(v: int, step: int, *, positive: bool = False) -> str:
    """ "use A or B": the multiples of `step` around `v` (A at least `step` when `positive`)."""
    below = v // step * step
    return f"use {max(step, below) if positive else below} or {below + step}"


def check_patch_grid(height: int, width: int, patch_px: int, family: str) -> None:
    """RecipeError unless the canvas lies on the model's patch grid: a transformer sees latents
    in patches (2x2 for SD3 and FLUX), so its sides are multiples of VAE factor x patch side."""
    for side, v in (("height", height), ("width", width)):
        if v % patch_px:
            raise RecipeError(
                f"sampling.{side}: {v} is not a multiple of {patch_px}, the patch grid of {family} models "
                f"(VAE factor x the transformer's patch side); {grid_hint(v, patch_px, positive=True)}"
            )


def check_box_on_patch_grid(where: str, box: tuple[int, int, int, int], factor: int, patch_px: int, family: str) -> None:
    """RecipeError naming the coordinate of a latent `box` whose pixel position is off the model's
    patch grid (a transformer sees latents in patches: a region must be whole patches)."""
    if patch_px == factor:
        return
    for name, v in zip(("row_init", "row_end", "col_init", "col_end"), box):
        px = v * factor
        if px % patch_px:
            raise RecipeError(
                f"{where}.{name}: {px} px is not on the {patch_px}-pixel patch grid of {family} models (a region "
                f"must be whole transformer patches); {grid_hint(px, patch_px)}"
            )


def check_covered(covered, factor: int, fix: str) -> None:
    """RecipeError naming the latent pixels of the canvas no region covers (`covered`: a bool
    tensor (h, w) on the latent grid), in pixel rows and columns, and `fix`."""
    holes = (~covered).nonzero()
    if len(holes):
        (r0, c0), (r1, c1) = holes.min(0).values.tolist(), holes.max(0).values.tolist()
        raise RecipeError(
            f"params.regions: {len(holes)} latent pixels of the canvas are covered by no region (pixel rows "
            f"{r0 * factor}-{(r1 + 1) * factor}, columns {c0 * factor}-{(c1 + 1) * factor}); {fix}"
        )


def check_canvas(recipe: Recipe, method: Method, params: Params, factor: int, default: int | None) -> tuple[int, int] | None:
    """The canvas size (see `canvas_size`) with the method's own size checks run on it, when the
    size is known."""
    size = canvas_size(recipe, method, params, factor, default)
    if size is not None and method.check is not None:
        method.check(params, size, factor, [m.label for m in recipe.models])
    return size


def canvas_size(recipe: Recipe, method: Method, params: Params, factor: int, default: int | None) -> tuple[int, int] | None:
    """(height, width) in pixels: the method's own canvas (tiles), else the sampling size, else
    `default` (the model's native size). Raises RecipeError for sizes off the VAE grid or a
    sampling size contradicting the method's canvas. None when unknown yet."""
    fixed = method.canvas(params) if method.canvas else None
    h, w = recipe.sampling.height, recipe.sampling.width
    if fixed is not None:
        for side, given, need in (("height", h, fixed[0]), ("width", w, fixed[1])):
            if given is not None and given != need:
                raise RecipeError(
                    f"sampling.{side}: {given} contradicts the tiles' canvas {side} {need}; drop sampling.{side} or change the tiles"
                )
        h, w = fixed
    h = h or default
    w = w or default
    for side, v in (("height", h), ("width", w)):
        if v is not None and v % factor:
            raise RecipeError(
                f"sampling.{side}: {v} is not a multiple of the VAE downsampling factor {factor}; "
                f"{grid_hint(v, factor, positive=True)}"
            )
    if h is not None and w is not None:
        check_pixels(
            h,
            w,
            recipe.runtime.pixel_limit,
            "params.tiles (the canvas)" if fixed is not None else "sampling.height x sampling.width",
        )
    return None if h is None or w is None else (h, w)


class Box(BaseModel):
    """A rectangle of the canvas: rows [row_init, row_end), columns [col_init, col_end), in
    pixels (multiples of the VAE factor) or as fractions of the canvas (snapped to that grid).
    Mixture of Diffusers' regions and attention regions are boxes (their params subclass it), so a
    recipe's regions read the same under either method."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    row_init: float = Field(ge=0)
    row_end: float = Field(gt=0)
    col_init: float = Field(ge=0)
    col_end: float = Field(gt=0)
    units: Literal["px", "fraction"] = "px"

    @model_validator(mode="after")
    def _order(self):
        if self.row_end <= self.row_init or self.col_end <= self.col_init:
            raise ValueError(
                f"empty box: needs row_init < row_end and col_init < col_end, got rows {self.row_init}-{self.row_end}, cols {self.col_init}-{self.col_end}"
            )
        if self.units == "fraction" and max(self.row_end, self.col_end) > 1:
            raise ValueError("fraction coordinates must lie in [0, 1]")
        return self

    def latent_box(self, where: str, canvas_px: tuple[int, int], factor: int) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1) in latent pixels; RecipeError naming `where` when off the grid or canvas."""
        H, W = canvas_px
        coords = {"row_init": self.row_init, "row_end": self.row_end, "col_init": self.col_init, "col_end": self.col_end}
        out = {}
        for name, v in coords.items():
            size = H if name.startswith("row") else W
            shown = int(v) if float(v).is_integer() else v
            if self.units == "fraction":
                px = round(v * size / factor) * factor
            else:
                px = v
                if px != int(px) or int(px) % factor:
                    raise RecipeError(
                        f"{where}.{name}: {shown} is not a multiple of the VAE factor {factor}; {grid_hint(int(px), factor)}"
                    )
            if px > size:
                raise RecipeError(f"{where}.{name}: {shown} lies outside the {H}x{W} canvas (height x width)")
            out[name] = int(px) // factor
        if out["row_end"] <= out["row_init"] or out["col_end"] <= out["col_init"]:
            raise RecipeError(f"{where}: the box is empty on the {factor}-pixel latent grid; make it larger")
        return out["row_init"], out["row_end"], out["col_init"], out["col_end"]
