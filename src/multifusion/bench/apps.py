"""The benchmark's applications: which models each compares, on which prompts, with which
methods, and what counts as success.

An *app* (ids shared with the demo report: ``fine-grained``, ``cross-domain``, ``cross-domain-photo``, ``regional``,
``aggregation``, ``aggregation-layout``, ``ensemble``) names model *roles* (``general``, ``expert``, ...; role ``r``
defaults to the zoo model ``zoo:r``), draws its target scenes from ShapeWorld with a fixed
seed, says what each model is prompted with, and lists its rows:

- every role alone (method ``single``, on its own kind of prompt): the baselines;
- each fusion method of the app, as a (method id, recipe builder) entry. An entry whose method
  is not in :data:`multifusion.registry.METHODS` yet is skipped (and listed as skipped), so
  adding a method to an app is one line: ``Fusion("amdm", own_prompts("amdm", ROLES))``.

A recipe builder turns one :class:`AppPrompt` and the model references by role into a recipe
dict without sampling settings (the harness adds steps, scheduler, guidance and seeds).

Success is judged per image against the app's target scene (every attribute the full caption
states, see :func:`multifusion.zoo.render.spec_of`):

- ``image`` apps: success = the image shows everything its target states (the background,
  the style when stated, and every object at its slot with its shape, colour and texture);
  a rate over images;
- ``instance`` apps: success = the instance success rate (COCO-MIG): the fraction of all
  stated objects read at their slot with the right shape, colour and texture;
- ``region`` apps: success = the fraction of regions (views) read entirely right: the scene,
  the style and the region's object with every attribute its target states;
- ``elements`` apps (several LoRAs, each adding one element): success = every element is there,
  the style and each object's texture at its slot; a rate over images.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from multifusion.errors import RecipeError, did_you_mean
from multifusion.zoo.render import (
    COLOURS,
    GENERAL_HELD_OUT,
    PLAIN,
    SCENES,
    SHAPES,
    SLOTS,
    TEXTURES,
    Scene,
    SceneSpec,
    ShapeObject,
    caption,
    sample_general,
    spec_of,
)

PROMPT_SEED = 20240917
"""Seed of every app's prompt generator. Prompt ``i`` of an app depends only on
``(PROMPT_SEED, app id, i)``, so asking for more prompts keeps the first ones."""

RecipeBuilder = Callable[["AppPrompt", Mapping[str, str]], dict]


@dataclass(frozen=True)
class AppPrompt:
    """One prompt of an app: the target ``scene`` (what the image should show, in full), the
    prompt each model role is given, and for regional apps one prompt per slot."""

    app: str
    index: int
    scene: Scene
    prompts: Mapping[str, str]  # role -> prompt
    regions: tuple[tuple[str, str], ...] = ()  # (slot, prompt), left to right

    @property
    def target(self) -> SceneSpec:
        """What the judge scores: every field of the full caption of ``scene``."""
        return spec_of(self.scene)

    @property
    def caption(self) -> str:
        return caption(self.scene)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"app": self.app, "index": self.index, "target": self.caption, "prompts": dict(self.prompts)}
        if self.regions:
            out["regions"] = {slot: text for slot, text in self.regions}
        return out


@dataclass(frozen=True)
class View:
    """What the judge reads of one image: the crop ``box`` (left, top, right, bottom in pixels;
    None for the whole image) and the ``scene`` that crop should show."""

    box: tuple[int, int, int, int] | None
    scene: Scene
    state_style: bool = False  # also score the photo style, which captions never state

    @property
    def target(self) -> SceneSpec:
        spec = spec_of(self.scene)
        return replace(spec, style=self.scene.style) if self.state_style else spec


def whole_image(prompt: AppPrompt) -> list[View]:
    """The default reading: the whole image against the prompt's target scene."""
    return [View(None, prompt.scene)]


@dataclass(frozen=True)
class Row:
    """One row of an app's table: a method over some of the app's roles, and how its images
    are read."""

    id: str  # unique within the app and file-name safe: "single-general", "snb"
    method: str  # a method id of multifusion.registry
    models: tuple[str, ...]  # roles, in the recipe's model order
    build: RecipeBuilder = field(compare=False)
    views: Callable[[AppPrompt], list[View]] = field(default=whole_image, compare=False)


@dataclass(frozen=True)
class Fusion:
    """A fusion method of an app: the method id, how to build its recipe, and (optionally) a
    row id when one app runs a method in several variants."""

    method: str
    build: RecipeBuilder
    models: tuple[str, ...]
    id: str | None = None
    views: Callable[[AppPrompt], list[View]] = whole_image


# ----------------------------------------------------------------------------- roles that are LoRAs


@dataclass(frozen=True)
class LoraRole:
    """A role that is another role's model with zoo LoRAs applied: ``loras`` are (zoo LoRA name,
    scale) pairs, loaded by diffusers' ``load_lora_weights`` (``docs/zoo-training.md``)."""

    base: str
    loras: tuple[tuple[str, float], ...]

    def entries(self) -> list[dict[str, Any]]:
        """The model entry's ``loras`` (recipe form)."""
        return [{"path": f"zoo:{name}", "scale": scale} for name, scale in self.loras]


MULTI_LORA_SCALE = 1.0
"""Every LoRA's scale in the `multi-lora` apps, for every method (merge included). The authors use
0.8 (each LoRA at weight 1 under a global LoRA scale of 0.8) for their full-size LoRAs; the zoo's
are weaker: at 0.8 the `striped` LoRA draws stripes on 12 % of its own captions against 54 % at 1.0
(24 captions each), so at 0.8 no LoRA alone would show its own element and the app could not
separate the methods."""

LORA_ROLES: dict[str, LoraRole] = {
    "texture-lora": LoraRole("general", (("texture", 1.0),)),
    "cartoon-lora": LoraRole("general", (("cartoon", 1.0),)),
    "striped": LoraRole("general", (("striped", MULTI_LORA_SCALE),)),
    "dotted": LoraRole("general", (("dotted", MULTI_LORA_SCALE),)),
    "style": LoraRole("general", (("cartoon", MULTI_LORA_SCALE),)),
    "two-loras": LoraRole("general", (("striped", MULTI_LORA_SCALE), ("cartoon", MULTI_LORA_SCALE))),
    "three-loras": LoraRole(
        "general", (("striped", MULTI_LORA_SCALE), ("dotted", MULTI_LORA_SCALE), ("cartoon", MULTI_LORA_SCALE))
    ),
}
"""Roles that are the zoo's ``general`` with zoo LoRAs: ``texture-lora`` and ``cartoon-lora``
stand in for the full fine-tunes ``expert`` and ``cartoon``; the `multi-lora` app's LoRAs each
alone (``striped``, ``dotted``, the ``style``), and one model with two or three of them
(``two-loras``: the subject then the style, as K-LoRA takes them; LoRA Merge is that model as
it is, ``set_adapters`` with several weights). A model overriding the base role
(``--model general=PATH``) carries its LoRA roles along."""


def model_entry(role: str, refs: Mapping[str, str]) -> dict[str, Any]:
    """A recipe's model entry for ``role``: its model, its name, and its LoRAs when it is a LoRA role."""
    entry: dict[str, Any] = {"model": refs[role], "name": role}
    if role in LORA_ROLES:
        entry["loras"] = LORA_ROLES[role].entries()
    return entry


def role_loras(role: str) -> list[dict[str, Any]] | None:
    """The LoRAs ``role``'s model is loaded with (None: a plain model)."""
    return LORA_ROLES[role].entries() if role in LORA_ROLES else None


def zoo_needs(roles: Sequence[str]) -> tuple[set[str], set[str]]:
    """(zoo models, zoo LoRAs) that ``roles`` need when none is overridden."""
    models = {LORA_ROLES[r].base if r in LORA_ROLES else r for r in roles}
    loras = {name for r in roles if r in LORA_ROLES for name, _ in LORA_ROLES[r].loras}
    return models, loras


# ----------------------------------------------------------------------------- recipe builders


def own_prompts(method: str, roles: Sequence[str], params: Mapping[str, Any] | None = None) -> RecipeBuilder:
    """Every role in ``roles`` with its own prompt of the app, under ``method`` with ``params``."""
    roles = tuple(roles)

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        models = [{**model_entry(r, refs), "prompt": prompt.prompts[r]} for r in roles]
        return {"method": method, "models": models, "params": dict(params or {})}

    return build


TILE = 64
"""Side of one Mixture-of-Diffusers tile in pixels: the zoo models' native size. The paper's
regions are the model's native size on a larger canvas; windows smaller than that are images
the model never saw (the ``mod-thirds`` row measures what that costs)."""
TILE_OVERLAP = 16
"""Columns shared by neighbouring tiles (a quarter tile), where Gaussian weights blend."""
REGION_OVERLAP = 1 / 8
"""Width shared by neighbouring third-of-the-canvas regions (``mod-thirds``), as a fraction of
the canvas (8 px of 64): each region reaches half of it beyond its third."""


def tiles_per_slot(role: str, mask_type: str = "gaussian") -> RecipeBuilder:
    """Mixture of Diffusers on one model: one native-size tile per slot, left to right on a
    ``TILE x (3 TILE - 2 TILE_OVERLAP)`` canvas, each prompted with its object centred."""

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        tiles = {
            "prompts": [[text for _, text in prompt.regions]],
            "tile_height": TILE,
            "tile_width": TILE,
            "tile_col_overlap": TILE_OVERLAP,
            "mask_type": mask_type,
        }
        return {"method": "mod", "models": [model_entry(role, refs)], "params": {"tiles": tiles}}

    return build


def tile_canvas() -> tuple[int, int]:
    """(height, width) in pixels of :func:`tiles_per_slot`'s canvas: one tile per slot."""
    return TILE, len(SLOTS) * TILE - (len(SLOTS) - 1) * TILE_OVERLAP


def layout_on_canvas(role: str) -> RecipeBuilder:
    """One model alone on the canvas of :func:`tiles_per_slot` (not its native 64x64), prompted
    with the whole layout: what a user without Mixture of Diffusers would sample at that size."""

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        height, width = tile_canvas()
        return {
            "method": "single",
            "models": [{**model_entry(role, refs), "prompt": prompt.prompts[role]}],
            "params": {},
            "sampling": {"height": height, "width": width},
        }

    return build


def tile_views(prompt: AppPrompt) -> list[View]:
    """Each tile of :func:`tiles_per_slot` read on its own: its object, centred, in the scene."""
    step = TILE - TILE_OVERLAP
    return [
        View(
            (j * step, 0, j * step + TILE, TILE), Scene(prompt.scene.background, prompt.scene.style, (replace(o, slot="centre"),))
        )
        for j, o in enumerate(prompt.scene.objects)
    ]


def regions_per_slot(role: str, mask_type: str = "gaussian") -> RecipeBuilder:
    """Mixture of Diffusers on one model, on the native canvas: one region per slot third (full
    height; widened by half of REGION_OVERLAP on each inner side; fractions of the canvas,
    snapped to the VAE grid), each with its slot's prompt and weights of ``mask_type``."""

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        regions = []
        for slot, text in prompt.regions:
            i = SLOTS.index(slot)
            lo = max(0.0, i / len(SLOTS) - REGION_OVERLAP / 2)
            hi = min(1.0, (i + 1) / len(SLOTS) + REGION_OVERLAP / 2)
            regions.append(
                {
                    "row_init": 0,
                    "row_end": 1,
                    "col_init": lo,
                    "col_end": hi,
                    "units": "fraction",
                    "prompt": text,
                    "mask_type": mask_type,
                }
            )
        return {"method": "mod", "models": [model_entry(role, refs)], "params": {"regions": regions}}

    return build


ATTENTION_BASE_RATIO = 0.2
"""`region-attention` rows: the base prompt's share (Regional Prompter's default; Chen et al. use
0.1-0.3)."""


def attention_regions(role: str, on_tiles: bool = False, slot_prompts: bool = False) -> RecipeBuilder:
    """`region-attention` on one model with the whole layout as the base prompt: on the native
    canvas one region per slot third (as :func:`regions_per_slot`, hard edges, no overlap), or
    with ``on_tiles`` on the canvas of :func:`tiles_per_slot` with its tiles as the regions
    (neighbours share TILE_OVERLAP columns, where their outputs are averaged). Each region is
    prompted as the Mixture-of-Diffusers rows prompt it (its object "in the centre": a window is
    an image of its own), or with ``slot_prompts`` with its object at its own slot ("on the left
    in a desert"), the words of the whole picture, which the model draws at once."""

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        regions, recipe = [], {}
        texts = prompt.regions
        if slot_prompts:
            scene = prompt.scene
            texts = tuple((o.slot, caption(Scene(scene.background, scene.style, (o,)))) for o in scene.objects)
        for slot, text in texts:
            i = SLOTS.index(slot)
            if on_tiles:
                step = TILE - TILE_OVERLAP
                regions.append({"row_init": 0, "row_end": TILE, "col_init": i * step, "col_end": i * step + TILE, "prompt": text})
            else:
                lo, hi = i / len(SLOTS), (i + 1) / len(SLOTS)
                regions.append({"row_init": 0, "row_end": 1, "col_init": lo, "col_end": hi, "units": "fraction", "prompt": text})
        if on_tiles:
            height, width = tile_canvas()
            recipe["sampling"] = {"height": height, "width": width}
        params = {"regions": regions, "base_prompt": prompt.prompts[role], "base_ratio": ATTENTION_BASE_RATIO}
        return {"method": "region-attention", "models": [model_entry(role, refs)], "params": params, **recipe}

    return build


def seam_columns(params: Mapping[str, Any], canvas_px: tuple[int, int], factor: int) -> list[int]:
    """Pixel columns x (0 < x < width) where a region of a row's ``params`` (MoD's regions or
    tiles, region-attention's regions) starts or ends: the places a seam shows."""
    from multifusion.canvas import Box
    from multifusion.noise.methods import TilesParams

    keys = ("row_init", "row_end", "col_init", "col_end", "units")
    boxes = TilesParams(**params["tiles"]).regions() if params.get("tiles") else params["regions"]
    edges = set()
    for r in boxes:
        box = r if isinstance(r, Box) else Box(**{k: v for k, v in r.items() if k in keys})
        _, _, c0, c1 = box.latent_box("region", canvas_px, factor)
        edges.update({c0 * factor, c1 * factor})
    return sorted(x for x in edges if 0 < x < canvas_px[1])


def seam_score(image: np.ndarray, columns: Sequence[int]) -> float:
    """Mean horizontal step |I[:, x] - I[:, x - 1]| at the seam columns over the same at every
    other column of an (H, W, 3) image: 1 means the borders look like the rest, > 1 a visible seam."""
    steps = np.abs(np.diff(image.astype(np.float64), axis=1)).mean(axis=(0, 2))  # (W - 1,): step into column x = i + 1
    at = np.zeros(len(steps), dtype=bool)
    at[[x - 1 for x in columns]] = True
    return float(steps[at].mean() / max(steps[~at].mean(), 1e-12))


# ----------------------------------------------------------------------------- scene makers


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _general_shapes(background: str) -> tuple[str, ...]:
    """Shapes the general model has seen in ``background`` (never a held-out pair)."""
    return tuple(s for s in SHAPES if (background, s) not in GENERAL_HELD_OUT)


def _plain_objects(
    rng: np.random.Generator, background: str, count: int, *, distinct_colours: bool = False
) -> tuple[ShapeObject, ...]:
    slots = sorted(int(i) for i in rng.choice(len(SLOTS), size=count, replace=False))
    colours = (
        list(rng.choice(len(COLOURS), size=count, replace=False))
        if distinct_colours
        else [int(rng.integers(len(COLOURS))) for _ in slots]
    )
    return tuple(
        ShapeObject(_pick(rng, _general_shapes(background)), COLOURS[int(c)], "plain", SLOTS[s]) for s, c in zip(slots, colours)
    )


def fine_grained_scene(rng: np.random.Generator, index: int) -> Scene:
    """A scene with one textured object at a slot (a combination neither model was trained on)."""
    background = _pick(rng, SCENES)
    obj = ShapeObject(_pick(rng, _general_shapes(background)), _pick(rng, COLOURS), _pick(rng, TEXTURES[1:]), _pick(rng, SLOTS))
    return Scene(background, "photo", (obj,))


def fine_grained_prompts(scene: Scene) -> dict[str, str]:
    (obj,) = scene.objects
    expert = caption(Scene(PLAIN, "photo", (obj,)), position=False)  # 'a red striped circle'
    return {
        "general": caption(scene, texture=False),  # 'a red circle on the left in a snowy field'
        "expert": expert,
        "texture-lora": expert,  # the expert's LoRA stand-in, told what the expert is told
    }


_HELD_OUT = tuple(sorted(GENERAL_HELD_OUT))


def cross_domain_scene(rng: np.random.Generator, index: int) -> Scene:
    """A cartoon of one plain object whose (scene, shape) pair the general model never saw,
    cycling through :data:`GENERAL_HELD_OUT` so every pair is asked equally often."""
    background, shape = _HELD_OUT[index % len(_HELD_OUT)]
    return Scene(background, "cartoon", (ShapeObject(shape, _pick(rng, COLOURS), "plain", _pick(rng, SLOTS)),))


def cross_domain_prompts(scene: Scene) -> dict[str, str]:
    return {"cartoon": caption(scene), "general": caption(replace(scene, style="photo")), "cartoon-lora": caption(scene)}


def cross_domain_photo_scene(rng: np.random.Generator, index: int) -> Scene:
    """A photo of one textured object at a slot, in a scene: content only the ``toon`` model
    can draw (textures, which it saw only as cartoons) in the style only the general model
    draws. The shape is one the general model has seen in that scene (no held-out pair), so
    the texture is the one thing the general model lacks. The texture cycles through the
    textures with the prompt index, so every texture is asked equally often (within one when the
    prompt count is not a multiple of their number)."""
    textures = TEXTURES[1:]
    background = _pick(rng, SCENES)
    obj = ShapeObject(
        _pick(rng, _general_shapes(background)), _pick(rng, COLOURS), textures[index % len(textures)], _pick(rng, SLOTS)
    )
    return Scene(background, "photo", (obj,))


def cross_domain_photo_prompts(scene: Scene) -> dict[str, str]:
    """The full caption to both, each in its own style's words: the general model is told the
    photo ('a red striped circle on the left in a desert'), the toon model the cartoon of it."""
    return {"general": caption(scene), "toon": caption(replace(scene, style="cartoon"))}


def photo_view(prompt: AppPrompt) -> list[View]:
    """The whole image against the full target with its photo style stated (captions never
    state it), so an image read as a cartoon fails."""
    return [View(None, prompt.scene, state_style=True)]


def regional_scene(rng: np.random.Generator, index: int) -> Scene:
    """Three plain objects, one per slot, in three different colours."""
    background = _pick(rng, SCENES)
    return Scene(background, "photo", _plain_objects(rng, background, len(SLOTS), distinct_colours=True))


def regional_prompts(scene: Scene) -> dict[str, str]:
    return {"general": caption(scene)}


def regional_regions(scene: Scene) -> tuple[tuple[str, str], ...]:
    """Each slot's region prompt: its object centred in the region, with the scene."""
    return tuple((o.slot, caption(Scene(scene.background, scene.style, (replace(o, slot="centre"),)))) for o in scene.objects)


MIXED_STYLES = ("cartoon", "photo", "photo")
"""`regional-models`: the style of each slot's region, left to right (the left drawn as a cartoon)."""


def mixed_scene(rng: np.random.Generator, index: int) -> Scene:
    """Three plain objects, one per slot, in three colours; the centre one textured."""
    scene = regional_scene(rng, index)
    left, centre, right = scene.objects
    return replace(scene, objects=(left, replace(centre, texture=_pick(rng, TEXTURES[1:])), right))


def _region_scene(scene: Scene, k: int) -> Scene:
    """What region ``k`` of a `regional-models` canvas should show: its object centred, in its style."""
    return Scene(scene.background, MIXED_STYLES[k], (replace(scene.objects[k], slot="centre"),))


def mixed_prompts(scene: Scene) -> dict[str, str]:
    """The whole layout as each model can be told it (the general model knows no textures, the
    expert no scenes or slots: it is told the centre object)."""
    centre = scene.objects[1]
    prompts = {
        "general": caption(scene, texture=False),
        "cartoon": caption(replace(scene, style="cartoon"), texture=False),
        "expert": caption(Scene(PLAIN, "photo", (centre,)), position=False),
    }
    return {**prompts, "cartoon-lora": prompts["cartoon"], "texture-lora": prompts["expert"]}


def mixed_regions(scene: Scene) -> tuple[tuple[str, str], ...]:
    """Each slot's target in full: its object centred, in its region's style, with its texture."""
    return tuple((o.slot, caption(_region_scene(scene, k))) for k, o in enumerate(scene.objects))


def models_per_region(assign: Sequence[str], swap: Mapping[str, str] | None = None) -> RecipeBuilder:
    """Mixture of Diffusers over several models on the tile canvas (one native-size region per
    slot, as :func:`tiles_per_slot` places them): ``assign[k]`` draws region ``k``: ``general``
    or ``cartoon`` (that model alone, told the region's object in its own words), or ``snb``
    (SNB of the general model, told the object without texture, and the expert, told the
    object with it, as in the fine-grained app). ``swap`` puts other roles in the place of
    ``cartoon`` and ``expert`` (their LoRA stand-ins)."""
    swap = dict(swap or {})

    def role(name: str) -> str:
        return swap.get(name, name)

    roles = tuple(dict.fromkeys(role(r) for a in assign for r in (("general", "expert") if a == "snb" else (a,))))

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        scene, step = prompt.scene, TILE - TILE_OVERLAP
        regions = []
        for k, who in enumerate(assign):
            target = _region_scene(scene, k)
            style = "cartoon" if who == "cartoon" else "photo"
            region = {
                "row_init": 0,
                "row_end": TILE,
                "col_init": k * step,
                "col_end": k * step + TILE,
                "model": "general" if who == "snb" else role(who),
                "prompt": caption(replace(target, style=style), texture=False),
            }
            if who == "snb":
                expert = caption(Scene(PLAIN, "photo", (scene.objects[k],)), position=False)
                region["snb"] = {"models": [{"model": role("expert"), "prompt": expert}]}
            regions.append(region)
        height, width = tile_canvas()
        return {
            "method": "mod",
            "models": [model_entry(r, refs) for r in roles],
            "params": {"regions": regions},
            "sampling": {"height": height, "width": width},
        }

    build.roles = roles  # type: ignore[attr-defined]
    return build


def mixed_views(prompt: AppPrompt) -> list[View]:
    """Each region of the tile canvas read on its own against its full target (its style, photo
    included, and the texture)."""
    step = TILE - TILE_OVERLAP
    return [
        View((k * step, 0, k * step + TILE, TILE), _region_scene(prompt.scene, k), state_style=True)
        for k in range(len(prompt.scene.objects))
    ]


def _mixed(row_id: str, assign: Sequence[str], swap: Mapping[str, str] | None = None) -> Fusion:
    build = models_per_region(assign, swap)
    return Fusion("mod", build, build.roles, id=row_id, views=mixed_views)  # type: ignore[attr-defined]


def aggregation_scene(rng: np.random.Generator, index: int) -> Scene:
    """One to three plain coloured objects at their slots (the general data's distribution)."""
    background = _pick(rng, SCENES)
    return Scene(background, "photo", _plain_objects(rng, background, int(rng.integers(1, len(SLOTS) + 1))))


def aggregation_prompts(scene: Scene) -> dict[str, str]:
    # The palette data lists objects in random order; a fixed left-to-right order would leak
    # positions into its prompt. The order is drawn from the scene itself (deterministic).
    order = np.random.default_rng(zlib.crc32(caption(scene).encode())).permutation(len(scene.objects))
    shuffled = replace(scene, objects=tuple(scene.objects[int(i)] for i in order))
    return {"layout": caption(scene, colour=False), "palette": caption(shuffled, position=False)}


def aggregation_layout_prompts(scene: Scene) -> dict[str, str]:
    """The layout to both models, each with the part of the caption it was trained on: shapes
    at their slots to ``layout`` ('a circle on the left and ...'), colours at their slots to
    ``tint`` ('a red on the left and ...'), as AMDM's InteractDiffusion and MIGC both get the boxes."""
    return {"layout": caption(scene, colour=False), "tint": caption(scene, shape=False)}


def multi_lora_scene(rng: np.random.Generator, index: int) -> Scene:
    """A cartoon of one striped object at a slot, in a scene: the striped LoRA's texture in the
    style LoRA's style (the general model gives the scene, the shape, the colour and the slot)."""
    background = _pick(rng, SCENES)
    (obj,) = _plain_objects(rng, background, 1)
    return Scene(background, "cartoon", (replace(obj, texture="striped"),))


def multi_lora_3_scene(rng: np.random.Generator, index: int) -> Scene:
    """A cartoon of two objects, one striped and one dotted (which one is left is drawn), in a
    scene: one element of each of three LoRAs."""
    background = _pick(rng, SCENES)
    objects = _plain_objects(rng, background, 2, distinct_colours=True)
    textures = ("striped", "dotted") if rng.integers(2) == 0 else ("dotted", "striped")
    return Scene(background, "cartoon", tuple(replace(o, texture=t) for o, t in zip(objects, textures)))


def multi_lora_prompts(roles: Sequence[str]) -> Callable[[Scene], dict[str, str]]:
    """Every role told the full caption, as the authors prompt every method with all of the
    LoRAs' trigger words ('a cartoon of a red striped circle on the left in a desert')."""
    return lambda scene: {r: caption(scene) for r in roles}


def ensemble_scene(rng: np.random.Generator, index: int) -> Scene:
    """A scene of the general data (every scene, so each slice model knows only some)."""
    return sample_general(rng)


def ensemble_prompts(scene: Scene) -> dict[str, str]:
    text = caption(scene)
    return {"slice0": text, "slice1": text, "general": text}  # general: the task-vector rows' base


# ----------------------------------------------------------------------------- apps


@dataclass(frozen=True)
class App:
    """One comparison: roles, prompts, rows and the definition of success."""

    id: str
    summary: str
    roles: tuple[str, ...]
    success: Literal["image", "instance", "region", "elements"]
    success_text: str
    make_scene: Callable[[np.random.Generator, int], Scene] = field(compare=False)
    make_prompts: Callable[[Scene], dict[str, str]] = field(compare=False)
    fusions: tuple[Fusion, ...] = ()
    make_regions: Callable[[Scene], tuple[tuple[str, str], ...]] | None = field(default=None, compare=False)
    baselines: tuple[str, ...] | None = None  # roles with a `single-ROLE` row (None: every role)
    baseline_views: Callable[[AppPrompt], list[View]] = field(default=whole_image, compare=False)  # how they are read

    def prompt(self, index: int, seed: int = PROMPT_SEED) -> AppPrompt:
        """Prompt ``index``: depends only on ``(seed, app id, index)``."""
        rng = np.random.default_rng([int(seed), zlib.crc32(self.id.encode()), int(index)])
        scene = self.make_scene(rng, index)
        regions = self.make_regions(scene) if self.make_regions else ()
        return AppPrompt(self.id, index, scene, self.make_prompts(scene), regions)

    def prompts(self, n: int, seed: int = PROMPT_SEED) -> list[AppPrompt]:
        return [self.prompt(i, seed) for i in range(n)]

    def rows(self, available: Mapping[str, Any] | None = None) -> tuple[list[Row], list[str]]:
        """(rows that run, fusion method ids skipped because ``available`` lacks them)."""
        if available is None:
            from multifusion.registry import METHODS as available
        rows = [
            Row(f"single-{r}", "single", (r,), own_prompts("single", (r,)), self.baseline_views)
            for r in (self.roles if self.baselines is None else self.baselines)
        ]
        skipped = []
        for f in self.fusions:
            if f.method in available:
                rows.append(Row(f.id or f.method, f.method, f.models, f.build, f.views))
            else:
                skipped.append(f.id or f.method)
        return rows, skipped


_FG = ("general", "expert")
_CD = ("cartoon", "general")
_CP = ("general", "toon")
_AG = ("layout", "palette")
_AL = ("layout", "tint")
_EN = ("slice0", "slice1")
_FG_LORA = ("general", "texture-lora")
_CD_LORA = ("cartoon-lora", "general")
_ML2 = ("striped", "style")
_ML3 = ("striped", "dotted", "style")

MBW_PRESET = "GRAD_V"
"""The `mbw` rows' preset: the merge-block-weighted extension's first and best-known gradient,
model A (the first role) in the deep, low-resolution blocks (layout, composition; M00 is all
A) and model B more and more towards the outer, high-resolution ones (detail, texture). It is
resampled from 25 to the zoo UNet's 13 blocks."""


def merged(method: str, roles: Sequence[str], params: Mapping[str, Any] | None = None) -> Fusion:
    """A weight-merge row (`merge`, `mbw`) over ``roles``. A merged model is one model and takes
    ONE prompt: the first role's (the recipe's first model's). The roles are in app order, and
    the first role's prompt is the one that states the most of the target: ``general``'s in
    fine-grained (scene, slot, shape and colour; the texture is left to the expert's weights),
    ``cartoon``'s in cross-domain (the full caption), either in ensemble (they are the same)."""
    return Fusion(method, own_prompts(method, roles, params), tuple(roles))


def merge_rows(roles: Sequence[str]) -> tuple[Fusion, ...]:
    """`merge` with equal weights and `mbw` with :data:`MBW_PRESET`, both over ``roles``."""
    return (merged("merge", roles), merged("mbw", roles, {"blocks": MBW_PRESET}))


TIES_PARAMS = {"merge_method": "ties", "density": 0.2, "alpha": 1.0}
"""The `ties` rows: the paper's defaults (Yadav et al., arXiv 2306.01708: keep the top 20 % of
each task vector, lambda = 1)."""
DARE_PARAMS = {"merge_method": "dare", "drop_rate": 0.5, "alpha": 0.5, "merge_seed": 0}
"""The `dare` rows: drop half of each task vector and double the rest (DARE, arXiv 2311.03099),
with alpha = 0.5 so that the merge's expectation is the equal-weight `merge` row over the same
models (base + (tau_1 + tau_2) / 2 = (A + B) / 2 in `ensemble`; base + tau / 2 = (base + B) / 2
where the base is one of the app's two models): what the row adds to `merge` is the drop alone.
A fixed merge seed, so the row is one merged model."""


def task_merged(row_id: str, params: Mapping[str, Any], base: str, roles: Sequence[str], prompt_role: str) -> Fusion:
    """A weight-merge row of a task-vector method (`ties`, `dare`, `model_stock`): the `base`
    role first (the recipe's first model is the methods' base), then the fine-tunes ``roles``.
    Every model is given ``prompt_role``'s prompt: the merged model takes the first model's, and
    that must be the prompt the app's `merge` row uses (the one stating the most of the target),
    not the base's own."""
    models = (base, *[r for r in roles if r != base])

    def build(prompt: AppPrompt, refs: Mapping[str, str]) -> dict:
        text = prompt.prompts[prompt_role]
        return {
            "method": "merge",
            "models": [{**model_entry(r, refs), "prompt": text} for r in models],
            "params": dict(params),
        }

    return Fusion("merge", build, models, id=row_id)


def task_merge_rows(base: str, roles: Sequence[str], prompt_role: str, *, stock: bool) -> tuple[Fusion, ...]:
    """`ties` and `dare` rows over ``roles`` from ``base``, and `model-stock` when ``stock``
    (Model Stock needs a base and at least two fine-tunes of it)."""
    rows = (
        task_merged("ties", TIES_PARAMS, base, roles, prompt_role),
        task_merged("dare", DARE_PARAMS, base, roles, prompt_role),
    )
    if stock:
        rows += (task_merged("model-stock", {"merge_method": "model_stock"}, base, roles, prompt_role),)
    return rows


APPS: dict[str, App] = {
    a.id: a
    for a in (
        App(
            "fine-grained",
            "general scene model + fine-grained (texture) expert (or its LoRA stand-in on the general model)",
            (*_FG, "texture-lora"),
            "image",
            "the scene is right and the object is read at its slot with the right shape, colour and texture",
            fine_grained_scene,
            fine_grained_prompts,
            (
                Fusion("average", own_prompts("average", _FG), _FG),
                Fusion("snb", own_prompts("snb", _FG), _FG),
                *merge_rows(_FG),
                # The expert was trained from scratch: `general` is no base of it (no Model Stock).
                *task_merge_rows("general", _FG, "general", stock=False),
                Fusion("snb", own_prompts("snb", _FG, {"gate": "base"}), _FG, id="snb-gate"),
                Fusion("snb", own_prompts("snb", _FG, {"gate": "region"}), _FG, id="snb-gate-region"),
                # The expert's LoRA stand-in: a LoRA of the general model on the expert's data.
                Fusion("average", own_prompts("average", _FG_LORA), _FG_LORA, id="average-lora"),
                Fusion("snb", own_prompts("snb", _FG_LORA), _FG_LORA, id="snb-lora"),
            ),
        ),
        App(
            "cross-domain",
            "cartoon style model (or its LoRA stand-in) + general model, on (scene, shape) pairs only the cartoon data shows",
            (*_CD, "cartoon-lora"),
            "image",
            "the image is read as a cartoon, the scene is right and the object is at its slot with the right shape and colour",
            cross_domain_scene,
            cross_domain_prompts,
            (
                Fusion("average", own_prompts("average", _CD), _CD),
                Fusion("snb", own_prompts("snb", _CD, {"blur": "none"}), _CD),
                *merge_rows(_CD),
                # cartoon is a fine-tune of the shipped general: one task vector, so no Model Stock.
                *task_merge_rows("general", _CD, "cartoon", stock=False),
                # The cartoon model's LoRA stand-in: a LoRA of the general model on the cartoon data.
                Fusion("average", own_prompts("average", _CD_LORA), _CD_LORA, id="average-lora"),
                Fusion("snb", own_prompts("snb", _CD_LORA, {"blur": "none"}), _CD_LORA, id="snb-lora"),
            ),
        ),
        App(
            "cross-domain-photo",
            "general (photo) model + toon model (cartoons of textured objects): a photo of a textured "
            "object, content only the toon model draws in the style only the general model draws",
            _CP,
            "image",
            "the image is read as a photo, the scene is right and the object is at its slot with the right shape, colour and texture",
            cross_domain_photo_scene,
            cross_domain_photo_prompts,
            (
                Fusion("average", own_prompts("average", _CP), _CP, views=photo_view),
                Fusion("snb", own_prompts("snb", _CP, {"blur": "none"}), _CP, views=photo_view),
            ),
            baseline_views=photo_view,
        ),
        App(
            "regional",
            "three-object layouts: Mixture of Diffusers (one native-size tile per slot) vs one prompt for the whole layout",
            ("general",),
            "instance",
            "instance success rate: the fraction of objects read where they were asked for (their slot of the 64x64 image; "
            "for tiled rows, the centre of their own 64x64 tile) with the right shape and colour",
            regional_scene,
            regional_prompts,
            (
                Fusion("mod", tiles_per_slot("general"), ("general",), views=tile_views),
                Fusion("mod", tiles_per_slot("general", "constant"), ("general",), id="mod-constant", views=tile_views),
                Fusion("mod", regions_per_slot("general"), ("general",), id="mod-thirds"),
                Fusion("region-attention", attention_regions("general"), ("general",), id="region-attention-thirds"),
                Fusion(
                    "region-attention",
                    attention_regions("general", slot_prompts=True),
                    ("general",),
                    id="region-attention-slots",
                ),
                Fusion(
                    "region-attention",
                    attention_regions("general", on_tiles=True),
                    ("general",),
                    id="region-attention-canvas",
                    views=tile_views,
                ),
                Fusion("single", layout_on_canvas("general"), ("general",), id="single-canvas", views=tile_views),
            ),
            regional_regions,
        ),
        App(
            "regional-models",
            "three-object layouts whose regions need different models: the left a cartoon (cartoon model), "
            "the centre textured (SNB of the general model and the expert), the right a plain photo (general model)",
            ("general", "cartoon", "expert", "cartoon-lora", "texture-lora"),
            "region",
            "region success rate: the fraction of the three 64x64 regions of the 64x160 canvas read entirely right: the scene, "
            "the region's style, and its object in the centre with the right shape, colour and (centre) texture",
            mixed_scene,
            mixed_prompts,
            (
                _mixed("mod-general", ("general", "general", "general")),
                _mixed("mod-cartoon", ("cartoon", "general", "general")),
                _mixed("mod-snb", ("general", "snb", "general")),
                _mixed("mod-models", ("cartoon", "snb", "general")),
                _mixed("mod-models-lora", ("cartoon", "snb", "general"), {"cartoon": "cartoon-lora", "expert": "texture-lora"}),
            ),
            mixed_regions,
            baselines=(),
        ),
        App(
            "aggregation",
            "layout model (positions, no colour) + palette model (colours, no positions)",
            _AG,
            "instance",
            "instance success rate: the fraction of objects read at their slot with the right shape and colour",
            aggregation_scene,
            aggregation_prompts,
            (
                Fusion("average", own_prompts("average", _AG), _AG),
                Fusion("snb", own_prompts("snb", _AG), _AG),
                Fusion("amdm", own_prompts("amdm", _AG), _AG),
            ),
        ),
        App(
            "aggregation-layout",
            "layout model (shapes at their slots, no colour) + tint model (colours at their slots, no shape): "
            "both told the layout, each strong at a different part of it",
            _AL,
            "instance",
            "instance success rate: the fraction of objects read at their slot with the right shape and colour",
            aggregation_scene,
            aggregation_layout_prompts,
            (
                Fusion("average", own_prompts("average", _AL), _AL),
                Fusion("snb", own_prompts("snb", _AL), _AL),
                Fusion("amdm", own_prompts("amdm", _AL), _AL),
                Fusion("amdm", own_prompts("amdm", _AL, {"preset": "paper"}), _AL, id="amdm-paper"),
                # The other way round: tint's image, layout's shapes aggregated into it.
                Fusion("amdm", own_prompts("amdm", _AL, {"specified": "tint"}), _AL, id="amdm-tint"),
                Fusion("amdm", own_prompts("amdm", _AL, {"preset": "paper", "specified": "tint"}), _AL, id="amdm-paper-tint"),
            ),
        ),
        App(
            "multi-lora",
            "two LoRAs of the general model, a texture (striped) and a style (cartoon): a cartoon of a striped object",
            ("general", *_ML2, "two-loras"),
            "elements",
            "every element a LoRA adds is there: the image is read as a cartoon and the object at its slot is read striped",
            multi_lora_scene,
            multi_lora_prompts(("general", *_ML2, "two-loras")),
            (
                Fusion("single", own_prompts("single", ("two-loras",)), ("two-loras",), id="lora-merge"),
                Fusion("lora-switch", own_prompts("lora-switch", _ML2), _ML2),
                Fusion("lora-composite", own_prompts("lora-composite", _ML2), _ML2),
                Fusion("k-lora", own_prompts("k-lora", ("two-loras",)), ("two-loras",)),
                # SNB with the style model as its base and the texture model as its expert.
                Fusion("snb", own_prompts("snb", ("style", "striped"), {"blur": "none"}), ("style", "striped"), id="snb-lora"),
            ),
            baselines=("general", *_ML2),
        ),
        App(
            "multi-lora-3",
            "three LoRAs of the general model, two textures (striped, dotted) and a style (cartoon): a cartoon of "
            "a striped and a dotted object",
            (*_ML3, "three-loras"),
            "elements",
            "every element a LoRA adds is there: the image is read as a cartoon, and each object at its slot is read "
            "with its texture (striped, dotted)",
            multi_lora_3_scene,
            multi_lora_prompts((*_ML3, "three-loras")),
            (
                Fusion("single", own_prompts("single", ("three-loras",)), ("three-loras",), id="lora-merge"),
                Fusion("lora-switch", own_prompts("lora-switch", _ML3), _ML3),
                Fusion("lora-composite", own_prompts("lora-composite", _ML3), _ML3),
            ),
            baselines=_ML3,
        ),
        App(
            "ensemble",
            "two same-architecture models trained on disjoint scene slices of the general data",
            (*_EN, "general"),
            "image",
            "the scene is right and every stated object is read at its slot with the right shape and colour",
            ensemble_scene,
            ensemble_prompts,
            (
                Fusion("average", own_prompts("average", _EN), _EN),
                Fusion("afa", own_prompts("afa", _EN), _EN),
                *merge_rows(_EN),
                # `general` is the base of the task-vector rows only (the slices' nearest shipped ancestor).
                *task_merge_rows("general", _EN, "slice0", stock=True),
            ),
            baselines=_EN,
        ),
    )
}
"""Every app, in the order `bench all` runs them."""


def get_app(name: str) -> App:
    """The app called ``name``; RecipeError with a "did you mean" otherwise."""
    if name in APPS:
        return APPS[name]
    raise RecipeError(f"unknown app {name!r} (apps: {', '.join(APPS)}, or 'all'){did_you_mean(name, APPS)}")


def resolve_apps(apps: str | Sequence[str]) -> list[App]:
    """``"all"``, one app id, or a list of ids -> apps, in :data:`APPS` order, each once."""
    names = [apps] if isinstance(apps, str) else list(apps)
    if not names:
        raise RecipeError("no app given; name one of: " + ", ".join(APPS) + ", or 'all'")
    if "all" in names:
        return list(APPS.values())
    chosen = {get_app(n).id for n in names}
    return [a for a in APPS.values() if a.id in chosen]
