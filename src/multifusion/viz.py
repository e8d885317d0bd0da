"""Pictures of what happened during sampling: who painted which pixel, what a meeting changed.

`MaskRecorder` is a step callback that keeps the masks and maps that combiners put in the step
record (e.g. SNB's `snb/mask`, `snb/maps`); `save` writes, per image, a PNG strip (one column
per step: the mask coloured by model, then each model's salience map) and an animated GIF.
`AggregationRecorder` does the same for AMDM's meetings: the clean image each latent implies,
before and after, decoded with the VAE. `AFAMapRecorder` keeps AFA's per-step aggregation maps
(`afa/maps`) and draws which model dominates where, per aggregation point and step.
`RegionWeightRecorder` draws Mixture of Diffusers' region weights (`mod/weights`): each
region's normalised share of the canvas, in the region colours the UI's canvas uses.

Each method names the recorders of its pictures in its registry entry (`Method.recorders`), which
is what `--export-masks` and the UI attach to a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from multifusion.io import atomic_path
from multifusion.loop import Step

# Distinct colours for up to eight models (model i -> PALETTE[i % 8]).
PALETTE = np.array(
    [
        [230, 80, 60],
        [60, 130, 230],
        [250, 200, 40],
        [70, 180, 90],
        [170, 90, 200],
        [240, 140, 40],
        [90, 200, 210],
        [200, 200, 200],
    ],
    dtype=np.uint8,
)


def colour_mask(mask: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) mask over N models -> (H, W, 3) uint8, each pixel the mask-weighted mix of
    the models' colours (a hard mask shows pure colours)."""
    m = mask[:, 0].float().cpu().numpy()  # (N, H, W)
    cols = PALETTE[np.arange(m.shape[0]) % len(PALETTE)].astype(np.float32)  # (N, 3)
    return np.einsum("nhw,nc->hwc", m, cols).clip(0, 255).astype(np.uint8)


def grey_map(x: torch.Tensor) -> np.ndarray:
    """(1, H, W) map -> (H, W, 3) uint8, min-max normalised."""
    a = x[0].float().cpu().numpy()
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    return np.repeat((a * 255).astype(np.uint8)[..., None], 3, axis=2)


def _legend(draw: ImageDraw.ImageDraw, names: list[str], y: int = 3) -> None:
    """Coloured squares and names along the top of a picture (model or region i: PALETTE[i])."""
    x = 2
    for i, name in enumerate(names):
        draw.rectangle((x, y, x + 8, y + 8), fill=tuple(int(c) for c in PALETTE[i % len(PALETTE)]))
        draw.text((x + 11, y - 2), name, fill="white")
        x += 16 + 7 * len(name)


def legend_width(names: list[str]) -> int:
    """Pixels `_legend` takes across: a picture at least this wide shows every name whole."""
    return 2 + sum(16 + 7 * len(n) for n in names)


@dataclass
class MaskRecorder:
    """Step callback collecting `{prefix}/mask` and `{prefix}/maps` (N, B, 1, H, W) per step."""

    prefix: str = "snb"
    steps: list[int] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, info: Step) -> None:
        mask = info.record.get(f"{self.prefix}/mask")
        if mask is None:
            return
        self.steps.append(info.step)
        self.masks.append(mask.detach().cpu())
        maps = info.record.get(f"{self.prefix}/maps")
        self.maps.append(maps.detach().cpu() if maps is not None else None)

    def frames(self, image: int = 0, scale: int = 8) -> list[Image.Image]:
        """One picture per recorded step for batch index `image`: the coloured mask above each
        model's map, enlarged `scale` times."""
        out = []
        for step, mask, maps in zip(self.steps, self.masks, self.maps):
            tiles = [colour_mask(mask[:, image])]
            if maps is not None:
                tiles += [grey_map(maps[i, image]) for i in range(maps.shape[0])]
            column = np.concatenate(tiles, axis=0)
            im = Image.fromarray(column).resize((column.shape[1] * scale, column.shape[0] * scale), Image.NEAREST)
            ImageDraw.Draw(im).text((2, 2), f"step {step}", fill="white")
            out.append(im)
        return out

    def save(self, stem: str | Path, image: int = 0, model_names: list[str] | None = None) -> list[Path]:
        """Write `{stem}-masks.png` (steps left to right) and `{stem}-masks.gif`; returns the
        paths, or [] when nothing was recorded (no step inside a fusion window)."""
        frames = self.frames(image)
        if not frames:
            return []
        w, h = frames[0].size
        legend = 14 if model_names else 0
        strip = Image.new("RGB", (max(w * len(frames), legend_width(model_names or [])), h + legend), "black")
        for j, f in enumerate(frames):
            strip.paste(f, (j * w, legend))
        if model_names:
            _legend(ImageDraw.Draw(strip), model_names)
        stem = Path(stem)
        png, gif = stem.with_name(stem.name + "-masks.png"), stem.with_name(stem.name + "-masks.gif")
        with atomic_path(png) as tmp:
            strip.save(tmp, format="PNG")
        with atomic_path(gif) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
        return [png, gif]


@dataclass
class AggregationRecorder:
    """Step callback keeping what AMDM's meetings record (`amdm/x0`, `amdm/x0_corrected` (N, B,
    C, h, w), `amdm/x0_aggregate` (B, C, h, w)); `save` decodes them with `vae` into one PNG
    strip per image: a column per meeting step, rows the aggregate's clean image, then each
    model's clean image before and after the correction."""

    vae: torch.nn.Module
    steps: list[int] = field(default_factory=list)
    records: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __call__(self, info: Step) -> None:
        if "amdm/x0" not in info.record:
            return
        self.steps.append(info.step)
        self.records.append({k: info.record[k].detach().cpu() for k in ("amdm/x0", "amdm/x0_corrected", "amdm/x0_aggregate")})

    def save(self, stem: str | Path, image: int = 0, model_names: list[str] | None = None, scale: int = 2) -> list[Path]:
        """Write `{stem}-amdm.png`; returns [] when no step met."""
        from multifusion.vae import decode, to_pil

        if not self.records:
            return []
        n = self.records[0]["amdm/x0"].shape[0]
        names = model_names or [f"model {k}" for k in range(n)]
        labels = ["aggregate"] + [f"{names[k]} {when}" for k in range(n) for when in ("before", "after")]
        columns = []
        for rec in self.records:
            latents = [rec["amdm/x0_aggregate"][image]]
            for k in range(n):
                latents += [rec["amdm/x0"][k, image], rec["amdm/x0_corrected"][k, image]]
            columns.append(to_pil(decode(self.vae, torch.stack(latents))))
        w, h = columns[0][0].width * scale, columns[0][0].height * scale
        label_w, top = 8 * max(len(s) for s in labels) + 4, 14
        strip = Image.new("RGB", (label_w + w * len(columns), top + h * len(labels)), "black")
        draw = ImageDraw.Draw(strip)
        for j, (step, col) in enumerate(zip(self.steps, columns)):
            draw.text((label_w + j * w + 2, 1), f"step {step}", fill="white")
            for i, im in enumerate(col):
                strip.paste(im.resize((w, h), Image.NEAREST), (label_w + j * w, top + i * h))
        for i, label in enumerate(labels):
            draw.text((2, top + i * h + h // 2 - 6), label, fill="white")
        path = Path(stem).with_name(Path(stem).name + "-amdm.png")
        with atomic_path(path) as tmp:
            strip.save(tmp, format="PNG")
        return [path]


@dataclass
class AFAMapRecorder:
    """Step callback keeping AFA's per-step aggregation maps (`afa/maps`: one (N, B, 1, h, w)
    tensor of per-pixel model weights per aggregation point); `save` writes, per image, a PNG
    grid: a column per step, a row per aggregation point (conv_in at the top, the output at
    the bottom), each map coloured by model as `colour_mask` does (which model dominates where)."""

    every: int = 1
    steps: list[int] = field(default_factory=list)
    maps: list[list[torch.Tensor]] = field(default_factory=list)

    def __call__(self, info: Step) -> None:
        maps = info.record.get("afa/maps")
        if maps is None or info.step % self.every:
            return
        self.steps.append(info.step)
        self.maps.append([m.detach().cpu() for m in maps])

    def grid(self, image: int = 0, cell: int = 32) -> np.ndarray:
        """(points * cell, steps * cell, 3) uint8: every map resized to cell x cell."""
        rows = []
        for p in range(len(self.maps[0])):
            tiles = [
                np.asarray(Image.fromarray(colour_mask(maps[p][:, image])).resize((cell, cell), Image.NEAREST))
                for maps in self.maps
            ]
            rows.append(np.concatenate(tiles, axis=1))
        return np.concatenate(rows, axis=0)

    def save(self, stem: str | Path, image: int = 0, model_names: list[str] | None = None, cell: int = 32) -> list[Path]:
        """Write `{stem}-afa.png`; returns [] when nothing was recorded."""
        if not self.maps:
            return []
        body = Image.fromarray(self.grid(image, cell))
        top, left = 28 if model_names else 14, 34
        im = Image.new("RGB", (max(left + body.width, legend_width(model_names or [])), top + body.height), "black")
        im.paste(body, (left, top))
        draw = ImageDraw.Draw(im)
        for j, step in enumerate(self.steps):
            draw.text((left + j * cell + 2, top - 13), f"{step}", fill="white")
        for p in range(len(self.maps[0])):
            draw.text((2, top + p * cell + cell // 2 - 6), f"#{p}", fill="white")
        _legend(draw, model_names or [])
        path = Path(stem).with_name(Path(stem).name + "-afa.png")
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG")
        return [path]


def region_weight_panels(shares: torch.Tensor) -> list[np.ndarray]:
    """(N, H, W) region shares of the canvas -> N + 1 (H, W, 3) uint8 pictures: all regions
    mixed (each pixel the share-weighted mix of the region colours), then each region's share
    alone, in its colour over black."""
    cols = PALETTE[np.arange(shares.shape[0]) % len(PALETTE)].astype(np.float32)  # (N, 3)
    s = shares.float().cpu().numpy()  # (N, H, W)
    alone = [(s[k][..., None] * cols[k]).clip(0, 255).astype(np.uint8) for k in range(len(s))]
    return [colour_mask(shares[:, None])] + alone


@dataclass
class RegionWeightRecorder:
    """Step callback keeping Mixture of Diffusers' region shares (`mod/weights` (N, H, W), the
    same at every step, and `mod/names`); `save` writes `{stem}-regions.png`: the regions mixed,
    then each region's normalised weight map, over the latent canvas."""

    shares: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)

    def __call__(self, info: Step) -> None:
        if self.shares is None and "mod/weights" in info.record:
            self.shares = info.record["mod/weights"].detach().cpu()
            self.names = list(info.record.get("mod/names") or [f"region {k}" for k in range(len(self.shares))])

    def save(self, stem: str | Path, image: int = 0, model_names: list[str] | None = None, size: int = 160) -> list[Path]:
        """Write `{stem}-regions.png` (the same for every image of a run); [] when no canvas ran."""
        if self.shares is None:
            return []
        panels = region_weight_panels(self.shares)
        h, w = panels[0].shape[:2]
        k = max(1, size // max(h, w))
        gap, top, legend = 4, 14, 16
        pw, ph = w * k, h * k
        im = Image.new(
            "RGB", (max(len(panels) * (pw + gap), 20 + 7 * sum(len(n) + 3 for n in self.names)), legend + top + ph), "black"
        )
        draw = ImageDraw.Draw(im)
        _legend(draw, self.names)
        for j, (panel, label) in enumerate(zip(panels, ["all regions"] + self.names)):
            x = j * (pw + gap)
            im.paste(Image.fromarray(panel).resize((pw, ph), Image.NEAREST), (x, legend + top))
            draw.rectangle((x, legend + top, x + pw - 1, legend + top + ph - 1), outline=(90, 90, 90))  # the canvas' edge
            draw.text((x + 2, legend), label[: max(4, pw // 7)], fill="white")
        path = Path(stem).with_name(Path(stem).name + "-regions.png")
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG")
        return [path]


def x0_previews(info: Step, vae: torch.nn.Module, names: list[str] | None = None) -> list[tuple[Image.Image, str]]:
    """What each running trajectory would give if sampling stopped now: its predicted clean
    latent (`Step.x0`) decoded by `vae`, per image of the batch, captioned with the image's
    name (`names`, default "image i") and, for several, the trajectory. The VAE rather than a fixed latent-to-RGB
    matrix: it is right for any model's latent space, and costs one decoder pass per image (a
    caller previews every few steps)."""
    from multifusion.vae import decode, to_pil

    running = [k for k, eps in enumerate(info.eps) if eps is not None]
    out = []
    for k in running:
        which = f", trajectory {k}" if len(info.eps) > 1 else ""
        for i, im in enumerate(to_pil(decode(vae, info.x0(k)))):
            out.append((im, f"{names[i] if names else f'image {i}'}{which}"))
    return out
