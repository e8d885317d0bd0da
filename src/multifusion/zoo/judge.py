"""The ShapeWorld judge: a small CNN that reads a 64x64 image back into a scene.

From one image it predicts the background (a scene or the plain backdrop), the style, and for
each slot (left / centre / right) the shape or "empty", the colour and the texture. Its
penultimate features (:meth:`Judge.features`) give a FID-style distance between image sets
(:func:`multifusion.zoo.metrics.judge_fid`).

A *reading* is the judge's answer for one image, a plain dict::

    {"background": "desert", "style": "photo",
     "slots": {"left": {"shape": "circle", "colour": "red", "texture": "striped"},
               "centre": None, "right": {...}},
     "p_style": {"photo": 0.98, "cartoon": 0.02}}

:func:`reading_from_scene` gives the reading a perfect judge would make of a render, so metrics
can be tested without the network. The shipped weights (fp16 safetensors, < 1 MB) live in
``weights/judge.safetensors`` beside ``weights/judge.json``; ``multifusion.zoo.train_judge``
retrains them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from multifusion.errors import MultifusionError
from multifusion.zoo.render import ALL_COLOURS, BACKGROUNDS, SHAPES, SIZE, SLOTS, STYLES, TEXTURES, Scene, ShapeObject

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "judge.safetensors"
EMPTY = "empty"

VOCABULARY: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "style": STYLES,
    "shape": (EMPTY, *SHAPES),
    "colour": ALL_COLOURS,
    "texture": TEXTURES,
}
"""Class names of each head, in logit order (``shape`` class 0 is an empty slot)."""

Reading = dict[str, Any]
ImageBatch = np.ndarray | torch.Tensor | Sequence[Any]


class JudgeError(MultifusionError):
    """Bad input to the judge: images of the wrong shape, range or type, or unusable weights."""


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]


class Judge(nn.Module):
    """CNN reader of ShapeWorld images (~245k parameters with the default widths).

    Three stages, each a stride-2 and a stride-1 3x3 convolution (64 -> 32 -> 16 -> 8 pixels),
    GroupNorm so a reading never depends on the rest of the batch, then an average pool to a
    2x3 grid (rows: sky/ground, columns: the three slots), a linear layer to ``feature_dim``
    features, and one linear head for all attributes.
    """

    def __init__(self, widths: Sequence[int] = (24, 48, 96), feature_dim: int = 128) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.feature_dim = int(feature_dim)
        layers: list[nn.Module] = []
        c_in = 3
        for width in self.widths:
            layers += _block(c_in, width, 2) + _block(width, width, 1)
            c_in = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((2, len(SLOTS)))
        self.embed = nn.Linear(c_in * 2 * len(SLOTS), self.feature_dim)
        n_slot = len(VOCABULARY["shape"]) + len(VOCABULARY["colour"]) + len(VOCABULARY["texture"])
        self.head = nn.Linear(self.feature_dim, len(BACKGROUNDS) + len(STYLES) + len(SLOTS) * n_slot)

    def config(self) -> dict[str, Any]:
        """Constructor arguments and vocabulary, as saved in ``judge.json``."""
        vocabulary = {k: list(v) for k, v in VOCABULARY.items()}
        return {"widths": list(self.widths), "feature_dim": self.feature_dim, "vocabulary": vocabulary}

    def embed_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) images in [0, 1] -> (N, feature_dim) penultimate features."""
        h = self.body(x * 2 - 1)  # (N, C, 8, 8)
        h = self.pool(h).flatten(1)  # (N, C * 2 * 3)
        return F.silu(self.embed(h))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, 64, 64) images in [0, 1] -> logits: ``background`` (N, 6), ``style`` (N, 2),
        ``shape`` (N, 3, 5), ``colour`` (N, 3, 7), ``texture`` (N, 3, 4)."""
        logits = self.head(self.embed_features(x))
        sizes = [len(BACKGROUNDS), len(STYLES), len(SLOTS) * (len(VOCABULARY["shape"]) + len(ALL_COLOURS) + len(TEXTURES))]
        background, style, slots = logits.split(sizes, dim=1)
        slots = slots.reshape(len(x), len(SLOTS), -1)  # (N, 3, 5 + 7 + 4)
        shape, colour, texture = slots.split([len(VOCABULARY["shape"]), len(ALL_COLOURS), len(TEXTURES)], dim=2)
        return {"background": background, "style": style, "shape": shape, "colour": colour, "texture": texture}

    @torch.no_grad()
    def features(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features of ``images`` (see :func:`to_tensor`): (N, feature_dim) float32."""
        x = to_tensor(images)
        was_training = self.training
        self.eval()
        try:
            if not len(x):
                return x.new_zeros(0, self.feature_dim)
            return torch.cat([self.embed_features(chunk) for chunk in x.split(batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def probabilities(self, images: ImageBatch, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax of every head for ``images``: shapes as in :meth:`forward`."""
        x = to_tensor(images)
        was_training = self.training
        self.eval()
        try:
            parts = [self(chunk) for chunk in x.split(batch_size)]
        finally:
            self.train(was_training)
        if not parts:
            raise JudgeError("images is empty; pass at least one image")
        return {k: torch.cat([p[k] for p in parts]).softmax(dim=-1) for k in parts[0]}

    def read(self, images: ImageBatch, batch_size: int = 256) -> list[Reading]:
        """Read each image into a reading dict (see the module docstring); one per image."""
        probs = self.probabilities(images, batch_size)
        idx = {k: v.argmax(dim=-1).tolist() for k, v in probs.items()}
        readings = []
        for n in range(len(idx["background"])):
            slots: dict[str, dict[str, str] | None] = {}
            for s, slot in enumerate(SLOTS):
                shape = VOCABULARY["shape"][idx["shape"][n][s]]
                slots[slot] = (
                    None
                    if shape == EMPTY
                    else {
                        "shape": shape,
                        "colour": ALL_COLOURS[idx["colour"][n][s]],
                        "texture": TEXTURES[idx["texture"][n][s]],
                    }
                )
            readings.append(
                {
                    "background": BACKGROUNDS[idx["background"][n]],
                    "style": STYLES[idx["style"][n]],
                    "slots": slots,
                    "p_style": {name: float(probs["style"][n, i]) for i, name in enumerate(STYLES)},
                }
            )
        return readings


def to_tensor(images: ImageBatch) -> torch.Tensor:
    """Bring images to a (N, 3, 64, 64) float32 tensor in [0, 1].

    Accepts a uint8 numpy array (N, H, W, 3) or (H, W, 3) (as :func:`render` returns); a float
    torch tensor (N, 3, H, W) in [0, 1] (as a diffusers pipeline with ``output_type="pt"``
    returns); or a sequence of PIL images / uint8 arrays. Other sizes are resized to 64x64 with
    antialiasing.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise JudgeError(
                f"images is a numpy array of dtype {images.dtype}; pass uint8 RGB (0..255), e.g. np.asarray(pil_image)"
            )
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise JudgeError(f"images has shape {images.shape}; pass (N, H, W, 3) or (H, W, 3) RGB")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
    elif isinstance(images, torch.Tensor):
        x = images.detach().to("cpu", torch.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise JudgeError(f"images has shape {tuple(images.shape)}; pass a (N, 3, H, W) tensor")
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise JudgeError(
                f"images tensor spans [{x.min():.3f}, {x.max():.3f}]; pass values in [0, 1] (for [-1, 1] use (x + 1) / 2)"
            )
        x = x.clamp(0, 1)
    elif isinstance(images, Sequence):
        if len(images) == 0:
            return torch.zeros(0, 3, SIZE, SIZE)
        arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        if len({a.shape for a in arrays}) != 1:
            raise JudgeError(f"images have different shapes {sorted({a.shape for a in arrays})}; pass images of one size")
        return to_tensor(np.stack(arrays))
    else:
        raise JudgeError(
            f"images of type {type(images).__name__} is not supported; pass a uint8 numpy array, a tensor or PIL images"
        )
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


def save_judge(judge: Judge, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``judge`` as fp16 safetensors at ``path`` and its config (plus ``extra``) beside
    it, with the suffix ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in judge.state_dict().items()}, str(path))
    config = judge.config() | (extra or {})
    path.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")


def load_judge(path: str | Path | None = None) -> Judge:
    """Load the judge from ``path`` (default: the shipped weights) on CPU, in eval mode, float32."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    config_path = path.with_suffix(".json")
    if not path.is_file() or not config_path.is_file():
        raise JudgeError(
            f"judge weights {path} (and its {config_path.name}) not found; retrain them with "
            f"`multifusion zoo judge --out runs/judge --install`"
        )
    config = json.loads(config_path.read_text())
    saved = {k: tuple(v) for k, v in config.get("vocabulary", {}).items()}
    if saved != VOCABULARY:
        raise JudgeError(
            f"judge weights {path} were trained for another vocabulary ({saved}); the renderer now has "
            f"{VOCABULARY}; retrain with `multifusion zoo judge --out runs/judge --install`"
        )
    judge = Judge(widths=config["widths"], feature_dim=config["feature_dim"])
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval()


def reading_from_scene(scene: Scene) -> Reading:
    """The reading a perfect judge makes of a render of ``scene`` (for tests and ground truth)."""
    slots: dict[str, dict[str, str] | None] = {slot: None for slot in SLOTS}
    for obj in scene.objects:
        slots[obj.slot] = {"shape": obj.shape, "colour": obj.colour, "texture": obj.texture}
    p_style = {name: float(name == scene.style) for name in STYLES}
    return {"background": scene.background, "style": scene.style, "slots": slots, "p_style": p_style}


def reading_to_scene(reading: Reading) -> Scene:
    """The :class:`Scene` a reading describes (objects ordered left to right)."""
    objects = tuple(
        ShapeObject(obj["shape"], obj["colour"], obj["texture"], slot)
        for slot, obj in reading["slots"].items()
        if obj is not None
    )
    return Scene(reading["background"], reading["style"], tuple(sorted(objects, key=lambda o: SLOTS.index(o.slot))))
