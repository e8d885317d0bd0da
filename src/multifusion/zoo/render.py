"""ShapeWorld: a deterministic procedural renderer of small captioned scenes.

A scene is a background (one of :data:`SCENES`, or ``"plain"``), a style (``"photo"`` or
``"cartoon"``) and up to three objects, one per horizontal third of the image (:data:`SLOTS`),
each with a shape, a colour and a texture. :func:`render` draws it as a ``(64, 64, 3)`` uint8
image; :func:`caption` says it in plain words; :func:`parse_caption` inverts :func:`caption`
into a :class:`SceneSpec` that holds only what the words state (benchmarks score images
against it). The module-level tuples are the single source of truth for the vocabulary.

Design choices that keep the scenes learnable by small latent diffusion models (factor-4 VAE,
16x16 latents): objects are ~17 px wide, textures have a period of 8 px (two latent pixels),
every object colour contrasts with every background, and nothing in a background looks like an
object (no sun, no moon).

The training distributions of the zoo models are :class:`Distribution` objects in
:data:`DISTRIBUTIONS` (a scene sampler plus the caption flags to use), and
:func:`make_dataset` draws examples from them; example ``i`` of a data set depends only on
``(seed, distribution name, i)``, so any slice can be regenerated on its own.
"""

from __future__ import annotations

import difflib
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multifusion.errors import MultifusionError

# ----------------------------------------------------------------------------- vocabulary

SIZE = 64
"""Height and width of every render, in pixels."""

SCENES: tuple[str, ...] = ("snowy field", "desert", "forest", "night sky", "sea")
"""Background scenes that captions name."""
PLAIN = "plain"
"""The neutral grey-ish backdrop of the expert's data; captions never name it."""
BACKGROUNDS: tuple[str, ...] = SCENES + (PLAIN,)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[str, ...] = ("red", "blue", "yellow", "purple", "orange", "pink")
"""Object colours of captioned data. Each contrasts with every background."""
GREY = "grey"
"""The colour of the layout model's uncoloured objects."""
ALL_COLOURS: tuple[str, ...] = COLOURS + (GREY,)
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SLOTS: tuple[str, ...] = ("left", "centre", "right")
STYLES: tuple[str, ...] = ("photo", "cartoon")
MAX_OBJECTS = len(SLOTS)

SLOT_BOUNDS: dict[str, tuple[float, float]] = {
    slot: (i * SIZE / len(SLOTS), (i + 1) * SIZE / len(SLOTS)) for i, slot in enumerate(SLOTS)
}
"""Horizontal extent ``[x_lo, x_hi)`` of each slot, in pixels: the thirds of the image."""

TEXTURE_PERIOD = 8
"""Pixels per texture repeat: two latent pixels of a factor-4 VAE, so textures survive it."""

RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "blue": (38, 80, 226),
    "yellow": (246, 214, 38),
    "purple": (138, 52, 190),
    "orange": (246, 132, 24),
    "pink": (246, 142, 204),
    "grey": (128, 128, 128),
}
"""Fill colour of each object colour (before shading)."""

SLOT_PHRASES: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
SCENE_PHRASES: dict[str, str] = {
    "snowy field": "in a snowy field",
    "desert": "in a desert",
    "forest": "in a forest",
    "night sky": "in the night sky",
    "sea": "at sea",
}
"""How a caption places its objects in each scene (the plain backdrop has no phrase)."""
EMPTY_PHRASES: dict[str, str] = {
    "snowy field": "a snowy field",
    "desert": "a desert",
    "forest": "a forest",
    "night sky": "the night sky",
    "sea": "the sea",
    "plain": "a plain background",
}
"""The caption of a scene without objects."""
CARTOON_PREFIX = "a cartoon of "

GENERAL_HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("snowy field", "triangle"),
        ("desert", "diamond"),
        ("forest", "square"),
        ("night sky", "circle"),
        ("sea", "triangle"),
    }
)
"""(scene, shape) pairs the ``general`` data never shows and the ``cartoon`` data does.

They give the cross-domain application combinations that only the style model has seen.
"""


class ShapeWorldError(MultifusionError):
    """A ShapeWorld value outside the vocabulary, or a caption that cannot be parsed."""


def _check_word(field: str, value: object, allowed: Sequence[str]) -> None:
    if isinstance(value, str) and value in allowed:
        return
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, allowed, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise ShapeWorldError(f"{field}={value!r} is not one of {tuple(allowed)}{hint}")


# ----------------------------------------------------------------------------- scene types


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` in SHAPES, ``colour`` in ALL_COLOURS, ``texture`` in TEXTURES,
    ``slot`` in SLOTS."""

    shape: str
    colour: str
    texture: str
    slot: str

    def __post_init__(self) -> None:
        _check_word("shape", self.shape, SHAPES)
        _check_word("colour", self.colour, ALL_COLOURS)
        _check_word("texture", self.texture, TEXTURES)
        _check_word("slot", self.slot, SLOTS)


@dataclass(frozen=True)
class Scene:
    """A full scene: ``background`` in BACKGROUNDS, ``style`` in STYLES, at most one object per
    slot. ``objects`` keeps its order (the order a caption names them in)."""

    background: str
    style: str
    objects: tuple[ShapeObject, ...] = ()

    def __post_init__(self) -> None:
        _check_word("background", self.background, BACKGROUNDS)
        _check_word("style", self.style, STYLES)
        object.__setattr__(self, "objects", tuple(self.objects))
        for i, obj in enumerate(self.objects):
            if not isinstance(obj, ShapeObject):
                raise ShapeWorldError(f"objects[{i}]={obj!r} is not a ShapeObject; build it with ShapeObject(...)")
        _check_distinct_slots([obj.slot for obj in self.objects])


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption states about one object; ``None`` means not stated (the ``tint`` data's
    captions state no shape: "a red on the left"). A shape or a colour is always stated."""

    shape: str | None
    colour: str | None = None
    texture: str | None = None
    slot: str | None = None

    def __post_init__(self) -> None:
        if self.shape is None and self.colour is None:
            raise ShapeWorldError("an object states a shape or a colour (or both); give shape= or colour=")
        if self.shape is not None:
            _check_word("shape", self.shape, SHAPES)
        if self.colour is not None:
            _check_word("colour", self.colour, ALL_COLOURS)
        if self.texture is not None:
            _check_word("texture", self.texture, TEXTURES)
        if self.slot is not None:
            _check_word("slot", self.slot, SLOTS)


@dataclass(frozen=True)
class SceneSpec:
    """What a caption states about a scene; ``None`` means not stated.

    A :class:`Scene` carries the same fields, so metrics accept either.
    """

    background: str | None = None
    style: str | None = None
    objects: tuple[ObjectSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.background is not None:
            _check_word("background", self.background, BACKGROUNDS)
        if self.style is not None:
            _check_word("style", self.style, STYLES)
        object.__setattr__(self, "objects", tuple(self.objects))
        for i, obj in enumerate(self.objects):
            if not isinstance(obj, ObjectSpec):
                raise ShapeWorldError(f"objects[{i}]={obj!r} is not an ObjectSpec; build it with ObjectSpec(...)")
        if len(self.objects) > MAX_OBJECTS:
            raise ShapeWorldError(f"objects has {len(self.objects)} entries; a scene holds at most {MAX_OBJECTS}, one per slot")
        _check_distinct_slots([obj.slot for obj in self.objects if obj.slot is not None])


def _check_distinct_slots(slots: list[str]) -> None:
    if len(slots) > MAX_OBJECTS:
        raise ShapeWorldError(f"objects has {len(slots)} entries; a scene holds at most {MAX_OBJECTS}, one per slot")
    if len(set(slots)) != len(slots):
        raise ShapeWorldError(f"objects use slots {slots}; each slot holds at most one object, give each its own slot")


# ----------------------------------------------------------------------------- captions


def _with_article(words: list[str]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def spec_of(scene: Scene, *, colour: bool = True, position: bool = True, texture: bool = True, shape: bool = True) -> SceneSpec:
    """The :class:`SceneSpec` that ``caption(scene, ...)`` with the same flags states.

    Implicit defaults are not stated: the plain backdrop, the photo style and the plain texture.
    ``parse_caption(caption(scene, **flags)) == spec_of(scene, **flags)`` always holds.
    """
    objects = tuple(
        ObjectSpec(
            shape=obj.shape if shape else None,
            colour=obj.colour if colour else None,
            texture=obj.texture if texture and obj.texture != "plain" else None,
            slot=obj.slot if position else None,
        )
        for obj in scene.objects
    )
    return SceneSpec(
        background=None if scene.background == PLAIN else scene.background,
        style="cartoon" if scene.style == "cartoon" else None,
        objects=objects,
    )


def caption(scene: Scene, *, colour: bool = True, position: bool = True, texture: bool = True, shape: bool = True) -> str:
    """Describe ``scene`` in plain words, naming its objects in ``scene.objects`` order.

    Example: ``"a red striped circle on the left and a blue square on the right in a snowy field"``;
    the cartoon style is prefixed with ``"a cartoon of "``. The flags drop words: ``colour=False``
    drops colour words (layout data), ``position=False`` drops slot phrases (palette data),
    ``texture=False`` drops texture words, ``shape=False`` drops shape words (``tint`` data: "a red on the left"). The plain texture, the plain backdrop and the photo
    style are never named.
    """
    if not (shape or colour) and scene.objects:
        raise ShapeWorldError("caption(shape=False, colour=False) would state nothing of an object; keep one of them")
    spec = spec_of(scene, colour=colour, position=position, texture=texture, shape=shape)
    phrases = []
    for obj in spec.objects:
        words = [w for w in (obj.colour, obj.texture, obj.shape) if w is not None]
        phrase = _with_article(words)
        if obj.slot is not None:
            phrase += " " + SLOT_PHRASES[obj.slot]
        phrases.append(phrase)
    if phrases:
        body = " and ".join(phrases)
        if scene.background != PLAIN:
            body += " " + SCENE_PHRASES[scene.background]
    else:
        body = EMPTY_PHRASES[scene.background]
    return CARTOON_PREFIX + body if scene.style == "cartoon" else body


_OBJECT_RE = re.compile(r"^an? (?P<words>.+?)(?: (?P<slot>{p}))?$".format(p="|".join(SLOT_PHRASES.values())))
_WORD_ORDER = (("colour", ALL_COLOURS), ("texture", TEXTURES[1:]), ("shape", SHAPES))


def _object_words(words: str) -> dict[str, str | None] | None:
    """'red striped circle' -> {colour, texture, shape} (absent ones None), in that order, with
    a shape or a colour; None when the words are not of that form."""
    rest, found = words.split(" "), {}
    for name, vocabulary in _WORD_ORDER:
        found[name] = rest.pop(0) if rest and rest[0] in vocabulary else None
    return None if rest or (found["shape"] is None and found["colour"] is None) else found


_SLOT_OF_PHRASE = {phrase: slot for slot, phrase in SLOT_PHRASES.items()}
_KNOWN_WORDS = sorted(
    {"a", "an", "and", "of", "cartoon"}
    | set(ALL_COLOURS)
    | set(TEXTURES)
    | set(SHAPES)
    | {w for p in (*SLOT_PHRASES.values(), *SCENE_PHRASES.values(), *EMPTY_PHRASES.values()) for w in p.split()}
)


def _object_error(phrase: str, text: str) -> ShapeWorldError:
    hints = []
    for word in phrase.split():
        if word not in _KNOWN_WORDS:
            close = difflib.get_close_matches(word, _KNOWN_WORDS, n=1)
            hints.append(f"unknown word {word!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    detail = "; ".join(hints) if hints else "words out of order"
    return ShapeWorldError(
        f"caption {text!r}: cannot parse object phrase {phrase!r}: {detail}; expected "
        f"'a [colour] [texture] [shape] [on the left | in the centre | on the right]', objects joined "
        f"with ' and ', then an optional scene phrase such as 'in a desert'"
    )


def parse_caption(text: str) -> SceneSpec:
    """Invert :func:`caption`: the :class:`SceneSpec` that ``text`` states (absent fields ``None``).

    Case, surrounding spaces and a final full stop are ignored. Raises :class:`ShapeWorldError`
    naming the unknown word when ``text`` is not in the caption grammar.
    """
    if not isinstance(text, str):
        raise ShapeWorldError(f"caption={text!r} is not a string; pass the prompt text")
    body = " ".join(text.lower().strip().rstrip(".").split())
    style = None
    if body.startswith(CARTOON_PREFIX):
        style, body = "cartoon", body[len(CARTOON_PREFIX) :]
    for background, phrase in EMPTY_PHRASES.items():
        if body == phrase:
            return SceneSpec(background=None if background == PLAIN else background, style=style)
    background = None
    for scene, phrase in SCENE_PHRASES.items():
        if body.endswith(" " + phrase):
            background, body = scene, body[: -len(phrase) - 1]
            break
    objects = []
    for phrase in body.split(" and "):
        match = _OBJECT_RE.match(phrase)
        words = None if match is None else _object_words(match.group("words"))
        if words is None:
            raise _object_error(phrase, text)
        slot_phrase = match.group("slot")
        objects.append(ObjectSpec(**words, slot=None if slot_phrase is None else _SLOT_OF_PHRASE[slot_phrase]))
    try:
        return SceneSpec(background=background, style=style, objects=tuple(objects))
    except ShapeWorldError as err:
        raise ShapeWorldError(f"caption {text!r}: {err}") from None


# ----------------------------------------------------------------------------- rendering

_SS = 4  # supersampling factor per axis: antialiased edges and textures
_TEXTURE_INK = 0.3  # texture marks are the object colour darkened to this fraction
_OUTLINE_RGB = np.array([28.0, 26.0, 32.0])
_OUTLINE_WIDTH = 1.1  # cartoon outline, pixels
_SIZE_RANGE = (16.0, 18.0)  # object bounding box, pixels
_Y_RANGE = (27.0, 39.0)  # object centre row
_EXTENT_PAD = _OUTLINE_WIDTH + 0.15  # drawn pixels reach this far beyond the shape


@dataclass(frozen=True)
class Placement:
    """Where one object is drawn: centre ``(cx, cy)`` and bounding-box ``size``, in pixels."""

    cx: float
    cy: float
    size: float


def _place(slot: str, rng: np.random.Generator) -> Placement:
    size = float(rng.uniform(*_SIZE_RANGE))
    lo, hi = SLOT_BOUNDS[slot]
    half = size / 2 + _EXTENT_PAD
    cx = float(rng.uniform(lo + half, hi - half))
    cy = float(rng.uniform(*_Y_RANGE))
    return Placement(cx, cy, size)


def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Signed distance-like field of ``shape`` centred at 0: <= 0 inside, ~pixels outside."""
    h = size / 2
    if shape == "circle":
        return np.hypot(dx, dy) - h
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.86 * h
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - h) / math.sqrt(2.0)
    if shape == "triangle":
        # Upward triangle with apex (0, -h) and base y = +h from x = -h to +h; the slanted edges
        # have outward normals (+-2, -1) / sqrt(5).
        slant = (2 * np.abs(dx) - dy - h) / math.sqrt(5.0)
        return np.maximum(slant, dy - h)
    raise ShapeWorldError(f"shape={shape!r} is not one of {SHAPES}")


def _texture_marks(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of texture marks at offsets ``(u, v)`` from the object centre."""
    p = TEXTURE_PERIOD
    if texture == "plain":
        return np.zeros(u.shape, dtype=bool)
    if texture == "striped":
        return np.floor((v + p / 4) / (p / 2)) % 2 == 1
    if texture == "dotted":
        du = (u + p / 2) % p - p / 2
        dv = (v + p / 2) % p - p / 2
        return du * du + dv * dv <= 2.5**2
    if texture == "checkered":
        return (np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 1
    raise ShapeWorldError(f"texture={texture!r} is not one of {TEXTURES}")


def _draw_object(canvas: np.ndarray, obj: ShapeObject, place: Placement, style: str, rng: np.random.Generator) -> np.ndarray:
    """Composite ``obj`` onto ``canvas`` (float (64, 64, 3), modified in place); returns its
    (64, 64) coverage in [0, 1]."""
    reach = place.size / 2 + _EXTENT_PAD + 0.5
    x0, x1 = max(math.floor(place.cx - reach), 0), min(math.ceil(place.cx + reach), SIZE)
    y0, y1 = max(math.floor(place.cy - reach), 0), min(math.ceil(place.cy + reach), SIZE)
    h, w = y1 - y0, x1 - x0
    # Subpixel centres of the window, (h*SS, w*SS), relative to the object centre.
    u = x0 + (np.arange(w * _SS) + 0.5) / _SS - place.cx
    v = y0 + (np.arange(h * _SS) + 0.5) / _SS - place.cy
    u, v = np.meshgrid(u, v)
    dist = _shape_distance(obj.shape, u, v, place.size)
    inside = dist <= 0
    base = np.array(RGB[obj.colour], dtype=np.float64)
    marks = _texture_marks(obj.texture, u, v)[..., None]
    fill = np.where(marks, base * _TEXTURE_INK, base)  # (h*SS, w*SS, 3)
    if style == "photo":
        # Soft light from the top left: brighter there, darker towards the bottom right.
        light = 1.1 - 0.3 * (u + v + place.size) / (2 * place.size)
        fill = fill * light[..., None]
        drawn = inside
    else:
        ring = (dist <= _OUTLINE_WIDTH) & ~inside
        fill = np.where(ring[..., None], _OUTLINE_RGB, fill)
        drawn = inside | ring
    window = canvas[y0:y1, x0:x1]
    under = np.repeat(np.repeat(window, _SS, axis=0), _SS, axis=1)
    sub = np.where(drawn[..., None], fill, under)
    coverage_win = drawn.reshape(h, _SS, w, _SS).mean(axis=(1, 3))
    pixels = sub.reshape(h, _SS, w, _SS, 3).mean(axis=(1, 3))
    if style == "photo":
        pixels = pixels + rng.normal(0.0, 2.5, size=pixels.shape) * coverage_win[..., None]
    canvas[y0:y1, x0:x1] = pixels
    coverage = np.zeros((SIZE, SIZE), dtype=np.float32)
    coverage[y0:y1, x0:x1] = coverage_win
    return coverage


def _vgrad(top: Sequence[float], bottom: Sequence[float], y0: float, y1: float) -> np.ndarray:
    """(64, 1, 3) vertical colour gradient from ``top`` at row y0 to ``bottom`` at row y1."""
    t = np.clip((np.arange(SIZE, dtype=np.float64) - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)[:, None, None]
    return (1 - t) * np.asarray(top, dtype=np.float64) + t * np.asarray(bottom, dtype=np.float64)


def _horizon(rng: np.random.Generator, mean: float, amplitude: float) -> np.ndarray:
    """(64,) horizon row per column: a gentle random wave."""
    x = np.arange(SIZE)
    phase = rng.uniform(0, 2 * math.pi)
    freq = rng.uniform(0.5, 1.5)
    return mean + rng.uniform(-1.5, 1.5) + amplitude * np.sin(2 * math.pi * freq * x / SIZE + phase)


_Y = np.arange(SIZE, dtype=np.float64)[:, None]  # (64, 1) row index
_X = np.arange(SIZE, dtype=np.float64)[None, :]  # (1, 64) column index


def _full(colour: np.ndarray) -> np.ndarray:
    """Broadcast a colour or a (64, 1, 3) gradient to a writable (64, 64, 3) image."""
    return np.broadcast_to(colour, (SIZE, SIZE, 3)).copy()


# (sky, ground) colours of the scenes with a horizon: photo gradients (top, bottom, rows) and
# flat cartoon colours.
_HORIZON_SCENES: dict[str, dict[str, Any]] = {
    "snowy field": {
        "row": 21.0, "amplitude": 2.0,
        "photo": (((168, 194, 226), (214, 224, 238), 0, 22), ((232, 236, 246), (246, 247, 251), 22, 63)),
        "cartoon": ((178, 208, 240), (248, 248, 252)),
    },
    "desert": {
        "row": 23.0, "amplitude": 2.0,
        "photo": (((112, 170, 228), (196, 214, 230), 0, 24), ((226, 194, 128), (208, 170, 104), 24, 63)),
        "cartoon": ((128, 190, 240), (236, 202, 122)),
    },
    "sea": {
        "row": 22.0, "amplitude": 0.0,
        "photo": (((148, 194, 236), (200, 224, 240), 0, 22), ((28, 118, 146), (14, 78, 108), 22, 63)),
        "cartoon": ((160, 212, 246), (30, 132, 162)),
    },
}  # fmt: skip


def _horizon_scene(name: str, photo: bool, rng: np.random.Generator) -> np.ndarray:
    """Snowy field, desert or sea: sky above a wavy horizon, ground (or water) below."""
    spec = _HORIZON_SCENES[name]
    hz = _horizon(rng, spec["row"], spec["amplitude"])[None, :]  # (1, 64)
    if photo:
        sky, ground = (_vgrad(*gradient) for gradient in spec["photo"])
    else:
        sky, ground = (np.array(colour, dtype=np.float64) for colour in spec["cartoon"])
    img = np.where((_Y >= hz)[..., None], ground, sky)
    if name == "sea":
        phase = rng.uniform(0, 2 * math.pi)
        wave = ((_Y + 1.5 * np.sin(_X / 4.0 + phase)) % 7.0 < 1.0) & (_Y > hz + 2)
        if photo:
            img = np.where(wave[..., None], 0.55 * img + 0.45 * np.array([90, 170, 190.0]), img)
        else:
            wave &= rng.random((1, SIZE)) < 0.5  # broken white wave marks
            img = np.where(wave[..., None], np.array([235, 245, 250.0]), img)
    elif name == "desert" and photo:
        phase = rng.uniform(0, 2 * math.pi)
        ripple = np.sin((_Y + 2.0 * np.sin(_X / 9.0 + phase)) / 1.6) * (_Y > hz + 1)
        img = img + 7.0 * ripple[..., None]
    if not photo:
        img = np.where((np.abs(_Y - hz) < 0.6)[..., None], _OUTLINE_RGB, img)
    return img


def _forest(photo: bool, rng: np.random.Generator) -> np.ndarray:
    """Green canopy, six tree trunks, brown ground; leafy blotches in the photo style."""
    img = _full(_vgrad((22, 64, 32), (40, 98, 46), 0, 50) if photo else np.array([48, 128, 58.0]))
    trunk_rgb = np.array([70, 50, 32.0]) if photo else np.array([112, 76, 40.0])
    width = 2.0 if photo else 2.5
    for tx in rng.uniform(0, SIZE, size=6):
        trunk = (np.abs(_X - tx) < width / 2) & (_Y > 30)
        img = np.where(trunk[..., None], trunk_rgb, img)
    ground_row = 52 + rng.uniform(-1.5, 1.5)
    ground = np.broadcast_to(_Y >= ground_row, (SIZE, SIZE))[..., None]
    img = np.where(ground, np.array([86, 66, 40.0]) if photo else np.array([122, 92, 52.0]), img)
    if photo:
        kx, ky, ph = rng.uniform(0.2, 0.5, 2), rng.uniform(0.2, 0.5, 2), rng.uniform(0, 2 * math.pi, 2)
        leaves = sum(np.sin(kx[i] * _X + ky[i] * _Y + ph[i]) for i in range(2))  # smooth random field
        img = img + 6.0 * leaves[..., None] * (_Y < ground_row)[..., None]
    return img


def _night_sky(photo: bool, rng: np.random.Generator) -> np.ndarray:
    """Dark blue sky with single-pixel stars (never object-sized) above a black hill."""
    img = _full(_vgrad((8, 12, 36), (30, 36, 78), 0, 63) if photo else np.array([20, 26, 72.0]))
    n = 28 if photo else 14
    sx, sy = rng.integers(0, SIZE, n), rng.integers(0, 52, n)
    bright = rng.uniform(120, 255, n) if photo else np.full(n, 250.0)
    img[sy, sx] = bright[:, None] * np.array([1.0, 1.0, 0.9])
    hill = _Y >= 54 + 2 * np.sin(_X / 10.0 + rng.uniform(0, 2 * math.pi))
    return np.where(hill[..., None], np.array([10, 12, 22.0]), img)


def _background(name: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) float background in [0, 255]. Draws a fixed number of values from ``rng``
    for a given (name, style), whatever the objects."""
    photo = style == "photo"
    if name in _HORIZON_SCENES:
        img = _horizon_scene(name, photo, rng)
    elif name == "forest":
        img = _forest(photo, rng)
    elif name == "night sky":
        img = _night_sky(photo, rng)
    elif name == PLAIN:
        img = _full(_vgrad((202, 200, 194), (188, 186, 180), 0, 63) if photo else np.array([205, 203, 198.0]))
    else:
        raise ShapeWorldError(f"background={name!r} is not one of {BACKGROUNDS}")
    if photo:
        img = img + rng.normal(0.0, 3.0, size=(SIZE, SIZE, 3))  # sensor-like noise
    return np.asarray(img, dtype=np.float64)


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ShapeWorldError(f"rng={rng!r} is not a numpy Generator; pass np.random.default_rng(seed)")


def render_with_masks(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene``; also return each object's coverage.

    Returns ``image`` (64, 64, 3) uint8 and ``masks`` (len(scene.objects), 64, 64) float32 in
    [0, 1], in ``scene.objects`` order. ``rng`` only drives jitter and noise: the background
    draws first (a fixed number of values per background and style), then each object its
    placement and noise, so adding an object never changes the background.
    """
    if not isinstance(scene, Scene):
        raise ShapeWorldError(f"scene={scene!r} is not a Scene; build one with Scene(background, style, objects)")
    _check_rng(rng)
    canvas = _background(scene.background, scene.style, rng)
    masks = np.zeros((len(scene.objects), SIZE, SIZE), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        masks[i] = _draw_object(canvas, obj, _place(obj.slot, rng), scene.style, rng)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, masks


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw ``scene`` as a (64, 64, 3) uint8 RGB image; ``rng`` drives only jitter and noise."""
    return render_with_masks(scene, rng)[0]


# ----------------------------------------------------------------------------- distributions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _random_objects(
    rng: np.random.Generator,
    count: int,
    colours: Sequence[str],
    textures: Sequence[str],
    shapes_for: Callable[[str], Sequence[str]] = lambda slot: SHAPES,
) -> tuple[ShapeObject, ...]:
    """``count`` objects in distinct random slots, ordered left to right."""
    slots = sorted(int(i) for i in rng.choice(len(SLOTS), size=count, replace=False))
    return tuple(
        ShapeObject(_pick(rng, shapes_for(SLOTS[s])), _pick(rng, colours), _pick(rng, textures), SLOTS[s]) for s in slots
    )


def _count(rng: np.random.Generator) -> int:
    return int(rng.integers(1, MAX_OBJECTS + 1))


def sample_general(rng: np.random.Generator, backgrounds: Sequence[str] = SCENES) -> Scene:
    """``general`` data: a scene from ``backgrounds``, 1-3 plain coloured objects, photo style.

    Never yields the (scene, shape) pairs in :data:`GENERAL_HELD_OUT`.
    """
    background = _pick(rng, backgrounds)
    allowed = tuple(s for s in SHAPES if (background, s) not in GENERAL_HELD_OUT)
    objects = _random_objects(rng, _count(rng), COLOURS, ("plain",), lambda slot: allowed)
    return Scene(background, "photo", objects)


def sample_expert(rng: np.random.Generator) -> Scene:
    """``expert`` data: one textured (never plain) object of any colour on the plain backdrop,
    at a random slot, photo style."""
    return Scene(PLAIN, "photo", _random_objects(rng, 1, COLOURS, TEXTURES[1:]))


def sample_one_texture(texture: str) -> Callable[[np.random.Generator], Scene]:
    """``striped`` / ``dotted`` data: photos of one object in ``texture``, any colour, shape and
    slot, in one of the five scenes (the ``toon`` data as photos, one texture each). The general
    model never saw a texture: a LoRA trained on this data adds that texture to its scenes."""
    return lambda rng: Scene(_pick(rng, SCENES), "photo", _random_objects(rng, 1, COLOURS, (texture,)))


def sample_cartoon(rng: np.random.Generator) -> Scene:
    """``cartoon`` data: any scene (all scene/shape pairs), 1-3 plain coloured objects, cartoon."""
    return Scene(_pick(rng, SCENES), "cartoon", _random_objects(rng, _count(rng), COLOURS, ("plain",)))


def sample_toon(rng: np.random.Generator) -> Scene:
    """``toon`` data: cartoons of textured objects. Any scene, one object at a random slot,
    always textured (never plain), any colour and shape.

    It is the content only a cartoon model can draw in the cross-domain application: the
    general model never saw a texture, the ``toon`` model saw textures only as cartoons.
    """
    return Scene(_pick(rng, SCENES), "cartoon", _random_objects(rng, 1, COLOURS, TEXTURES[1:]))


def sample_layout(rng: np.random.Generator) -> Scene:
    """``layout`` data: a scene with 1-3 grey plain objects at their slots, photo style."""
    return Scene(_pick(rng, SCENES), "photo", _random_objects(rng, _count(rng), (GREY,), ("plain",)))


def sample_palette(rng: np.random.Generator) -> Scene:
    """``palette`` data: a scene with 1-3 coloured plain objects at random slots, photo style.

    Objects are listed in random order, so a caption without position words carries no
    left-to-right hint either.
    """
    objects = _random_objects(rng, _count(rng), COLOURS, ("plain",))
    order = rng.permutation(len(objects))
    return Scene(_pick(rng, SCENES), "photo", tuple(objects[int(i)] for i in order))


def sample_tint(rng: np.random.Generator) -> Scene:
    """``tint`` data: a scene with 1-3 coloured plain objects of any shape at their slots, photo
    style (palette's scenes in left-to-right order); captioned with colours and slots but no
    shapes ("a red on the left and a blue in the centre in a forest"): a model that places and
    colours objects from the layout but never learns which shape is asked."""
    return Scene(_pick(rng, SCENES), "photo", _random_objects(rng, _count(rng), COLOURS, ("plain",)))


def sample_any(rng: np.random.Generator) -> Scene:
    """Everything the renderer can draw (the judge's training data): any background and style,
    each slot filled with probability 0.6 by any shape, colour (grey included) and texture."""
    background, style = _pick(rng, BACKGROUNDS), _pick(rng, STYLES)
    filled = rng.random(len(SLOTS)) < 0.6
    objects = []
    for slot, on in zip(SLOTS, filled):
        shape, colour, texture = _pick(rng, SHAPES), _pick(rng, ALL_COLOURS), _pick(rng, TEXTURES)
        if on:
            objects.append(ShapeObject(shape, colour, texture, slot))
    return Scene(background, style, tuple(objects))


@dataclass(frozen=True)
class Example:
    """One training example: ``image`` (64, 64, 3) uint8, its ``caption`` and ground-truth ``scene``."""

    image: np.ndarray
    caption: str
    scene: Scene


@dataclass(frozen=True)
class Distribution:
    """A training distribution: a scene sampler plus the caption flags its captions use."""

    name: str
    sample: Callable[[np.random.Generator], Scene]
    colour: bool = True
    position: bool = True
    texture: bool = True
    shape: bool = True

    def caption(self, scene: Scene) -> str:
        """Caption ``scene`` with this distribution's flags."""
        return caption(scene, colour=self.colour, position=self.position, texture=self.texture, shape=self.shape)

    def example(self, rng: np.random.Generator) -> Example:
        """Sample a scene, render it with the same ``rng`` and caption it."""
        _check_rng(rng)
        scene = self.sample(rng)
        return Example(render(scene, rng), self.caption(scene), scene)


DISTRIBUTIONS: dict[str, Distribution] = {
    d.name: d
    for d in (
        Distribution("general", sample_general),
        Distribution("expert", sample_expert, position=False),
        Distribution("cartoon", sample_cartoon),
        Distribution("toon", sample_toon),
        Distribution("layout", sample_layout, colour=False),
        Distribution("palette", sample_palette, position=False),
        Distribution("tint", sample_tint, shape=False),
        Distribution("striped", sample_one_texture("striped")),
        Distribution("dotted", sample_one_texture("dotted")),
        Distribution("any", sample_any),
    )
}
"""The zoo's training distributions by name (``"any"`` is the judge's)."""


def scene_slices(k: int) -> tuple[tuple[str, ...], ...]:
    """Split :data:`SCENES` into ``k`` disjoint, non-empty groups (round robin), 1 <= k <= 5."""
    if not isinstance(k, int) or not 1 <= k <= len(SCENES):
        raise ShapeWorldError(f"k={k!r} must be an int from 1 to {len(SCENES)} (one scene per slice at most)")
    return tuple(SCENES[i::k] for i in range(k))


def ensemble_slices(k: int) -> tuple[Distribution, ...]:
    """``k`` disjoint slices of the ``general`` data, split by scene, for a feature ensemble.

    Slice ``i`` is named ``"general-slice{i}of{k}"`` and samples only the scenes
    ``scene_slices(k)[i]``.
    """

    def sampler(backgrounds: tuple[str, ...]) -> Callable[[np.random.Generator], Scene]:
        return lambda rng: sample_general(rng, backgrounds)

    return tuple(Distribution(f"general-slice{i}of{k}", sampler(group)) for i, group in enumerate(scene_slices(k)))


def get_distribution(name: str) -> Distribution:
    """Look up a distribution of :data:`DISTRIBUTIONS` by name, with a "did you mean" error."""
    _check_word("distribution", name, tuple(DISTRIBUTIONS))
    return DISTRIBUTIONS[name]


@dataclass(frozen=True)
class Dataset:
    """``images`` (N, 64, 64, 3) uint8, with ``captions`` and ground-truth ``scenes`` (length N)."""

    images: np.ndarray
    captions: list[str]
    scenes: list[Scene]


def example_rng(name: str, seed: int, index: int) -> np.random.Generator:
    """The generator of example ``index`` of distribution ``name`` under ``seed``."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(index)])


def make_dataset(distribution: str | Distribution, n: int, seed: int, start: int = 0) -> Dataset:
    """Examples ``start .. start + n - 1`` of ``distribution`` under ``seed``.

    Example ``i`` depends only on ``(seed, distribution.name, i)``, so
    ``make_dataset(d, 10, s, start=5)`` equals the second half of ``make_dataset(d, 15, s)``.
    """
    dist = get_distribution(distribution) if isinstance(distribution, str) else distribution
    if not isinstance(n, int) or n < 0:
        raise ShapeWorldError(f"n={n!r} must be a non-negative int (the number of examples)")
    images = np.zeros((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions, scenes = [], []
    for j in range(n):
        ex = dist.example(example_rng(dist.name, seed, start + j))
        images[j] = ex.image
        captions.append(ex.caption)
        scenes.append(ex.scene)
    return Dataset(images, captions, scenes)
