"""Judge-based check of each zoo model: does it draw what its own captions say, and not the rest?

:func:`evaluate_model` samples one image per caption of a distribution (held-out seeds: the
captions of ``make_dataset(dist, n, EVAL_SEED + seed)``, never a training example) with the zoo
sampler (:func:`multifusion.single`, DDIM, 30 steps) and scores them with the judge
(:mod:`.judge`) and the metrics (:mod:`.metrics`). :func:`evaluate_renders` scores the
distribution's own renders the same way: the judge's ceiling, to tell a model's error from the
judge's.

:func:`evaluate_zoo` scores every installed model this way and :func:`draw_training_figures`
draws the loss curves and VAE reconstructions; together they make the tables and figures of
docs/zoo-training.md::

    multifusion zoo evaluate --run runs/zoo --out docs/img --n 32
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.io import atomic_path
from multifusion.zoo import metrics, render
from multifusion.zoo.judge import load_judge

EVAL_SEED = 777_000
"""Caption seeds of evaluation (training data uses the run seed, 0 by default)."""

CROSS = {
    "general": ["expert"],
    "expert": ["general"],
    "layout": ["palette"],
    "palette": ["layout"],
    "cartoon": ["general"],
    "tint": ["layout"],
    "slice0": ["slice1"],
    "slice1": ["slice0"],
}
"""Other models' prompts each model is also scored on, to show what it cannot do."""


def _distribution(name: str) -> render.Distribution:
    from multifusion.zoo.train import distribution

    return distribution(name)


def eval_captions(dist: str, n: int = 32, seed: int = 0) -> list[str]:
    """The ``n`` held-out captions of distribution ``dist`` (a zoo model name) under ``seed``."""
    return render.make_dataset(_distribution(dist), n, EVAL_SEED + seed).captions


def _handle(model: Any):
    if isinstance(model, str):
        from multifusion.loading import load_models

        ref = model if ":" in model or "/" in model else f"zoo:{model}"
        return load_models([ref])[0]
    return model


def _name(model: Any) -> str:
    text = model if isinstance(model, str) else str(getattr(model, "name", "model"))
    return Path(text.split(":")[-1]).name


def sample_images(
    model: Any,
    captions: Sequence[str],
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    seed: int = 0,
    batch_size: int = 16,
) -> list:
    """One image per caption (PIL), caption ``i`` with seed ``seed + i``, DDIM, sampled through
    the shared loop as the method ``single`` with one prompt per image, ``batch_size`` images at
    a time (what equals diffusers' StableDiffusionPipeline for the same seeds)."""
    from multifusion.api import Run

    handle = _handle(model)
    recipe = {
        "method": "single",
        "models": [{"model": handle.source, "name": handle.name, "prompt": list(captions)}],
        "sampling": {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "scheduler": "ddim",
            "seed": seed,
            "num_images": len(captions),
        },
    }
    return [im for part in Run(recipe, models=[handle]).batches(batch_size=batch_size, progress=False) for im in part.images]


def evaluate_model(
    model: Any,
    n: int = 32,
    seed: int = 0,
    *,
    prompts: str | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    judge: Any = None,
    return_images: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (a handle, ``"zoo:NAME"`` or ``"NAME"``) on ``n`` held-out captions.

    ``prompts`` names the distribution the captions come from (default: the model's own). The
    result holds ``model``, ``prompts``, ``n`` and :func:`metrics.summary` of the judge's readings
    (``scene``, ``isr``, ``image_success``, ``attr/...``); ``images`` and ``captions`` too when
    ``return_images``.
    """
    name = _name(model)
    prompts = prompts or name
    captions = eval_captions(prompts, n, seed)
    images = sample_images(model, captions, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    judge = judge or load_judge()
    readings = judge.read(images)
    out: dict[str, Any] = {
        "model": name,
        "prompts": prompts,
        "n": n,
        "guidance_scale": guidance_scale,
        **metrics.summary(readings, captions),
    }
    if return_images:
        out["images"], out["captions"] = images, captions
    return out


def evaluate_renders(dist: str, n: int = 32, seed: int = 0, judge: Any = None, vae: Any = None) -> dict[str, Any]:
    """The same scores for the renders of the held-out captions: the judge's ceiling. With `vae`,
    for those renders encoded and decoded by it (`reconstruct`): the ceiling a model drawing
    through that VAE can reach, row "reconstructed"."""
    data = render.make_dataset(_distribution(dist), n, EVAL_SEED + seed)
    images = data.images if vae is None else reconstruct(vae, data.images)
    readings = (judge or load_judge()).read(images)
    name = "renders" if vae is None else "reconstructed"
    return {"model": name, "prompts": dist, "n": n, **metrics.summary(readings, data.captions)}


def reconstruct(vae: Any, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images through `vae` (its posterior mean, decoded), as uint8."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(vae.dtype)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    return ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- report figures


def image_grid(images: Sequence[Any], cols: int = 8, scale: int = 2, pad: int = 2):
    """Tile PIL images (all one size) into one PIL image, upscaled ``scale`` x (nearest)."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(
            im.convert("RGB").resize((w * scale, h * scale), Image.NEAREST),
            (pad + c * (w * scale + pad), pad + r * (h * scale + pad)),
        )
    return grid


def loss_plot(
    curves: dict[str, list[tuple[int, float]]], path: str | Path, size: tuple[int, int] = (720, 400), smooth: int = 8
) -> None:
    """Loss curves (step, loss) per model as a PNG, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    palette = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (80, 80, 80),
    ]
    W, H = size
    left, right, top, bottom = 60, 150, 20, 40
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    pts = {k: v for k, v in curves.items() if v}
    max_step = max(s for v in pts.values() for s, _ in v)
    smoothed = {}
    for k, v in pts.items():
        losses = np.array([loss for _, loss in v])
        kernel = np.ones(min(smooth, len(losses))) / min(smooth, len(losses))
        smoothed[k] = list(
            zip(
                [s for s, _ in v],
                np.convolve(losses, kernel, mode="valid").tolist()
                + [losses[-1]] * (len(losses) - len(np.convolve(losses, kernel, mode="valid"))),
            )
        )
    lo = min(loss for v in smoothed.values() for _, loss in v[len(v) // 10 :]) * 0.95
    hi = max(loss for v in smoothed.values() for _, loss in v[len(v) // 20 :]) * 1.05

    def xy(s: float, loss: float) -> tuple[float, float]:
        loss = min(max(loss, lo), hi)
        return left + (W - left - right) * s / max_step, top + (H - top - bottom) * (1 - (loss - lo) / (hi - lo))

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for i in range(5):
        loss = lo + (hi - lo) * i / 4
        y = xy(0, loss)[1]
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.text((5, y - 6), f"{loss:.3f}", fill=(0, 0, 0))
        s = max_step * i / 4
        x = xy(s, lo)[0]
        d.line([x, H - bottom, x, H - bottom + 4], fill=(0, 0, 0))
        d.text((x - 12, H - bottom + 8), f"{int(s)}", fill=(0, 0, 0))
    d.text((left + (W - left - right) // 2 - 40, H - 16), "training step", fill=(0, 0, 0))
    for j, (k, v) in enumerate(smoothed.items()):
        colour = palette[j % len(palette)]
        d.line([xy(s, loss) for s, loss in v], fill=colour, width=2)
        d.line([W - right + 10, top + 10 + 18 * j, W - right + 30, top + 10 + 18 * j], fill=colour, width=3)
        d.text((W - right + 36, top + 4 + 18 * j), k, fill=(0, 0, 0))
    d.text((left + 4, top + 4), f"eps MSE (moving average of {smooth} log rows)", fill=(0, 0, 0))
    with atomic_path(path) as tmp:  # never through a link planted at `path`
        im.save(tmp, format="PNG")


def reconstruction_grid(vae: Any, per_distribution: int = 4, seed: int = 0):
    """Renders (top row) and their VAE reconstructions (bottom row), held-out seeds, PIL image."""
    from PIL import Image

    from multifusion.zoo.train import DECODER_MIX

    images = np.concatenate([render.make_dataset(d, per_distribution, EVAL_SEED + seed).images for d in DECODER_MIX])
    recon = reconstruct(vae, images)
    mse = float(np.mean((recon.astype(np.float64) - images) ** 2))
    psnr = 10 * np.log10(255.0**2 / mse)
    tiles = [Image.fromarray(a) for a in images] + [Image.fromarray(a) for a in recon]
    return image_grid(tiles, cols=len(images), scale=2), psnr


def read_loss(run: str | Path, name: str) -> list[tuple[int, float]]:
    path = Path(run) / name / "loss.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


TABLE_COLUMNS = (
    ("scene", "scene"),
    ("style", "style"),
    ("attr/shape", "shape"),
    ("attr/colour", "colour"),
    ("attr/texture", "texture"),
    ("attr/position", "position"),
    ("attr/count", "count"),
    ("isr", "ISR"),
    ("image_success", "image"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of result rows, in percent; "-" where the prompts state nothing to score."""
    head = "| model | prompts | n | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(TABLE_COLUMNS))]
    for r in rows:
        cells = [f"{100 * r[k]:.0f}" if k in r else "-" for k, _ in TABLE_COLUMNS]
        lines.append(f"| {r['model']} | {r['prompts']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_zoo(
    models: Sequence[str] | None = None,
    n: int = 32,
    seed: int = 0,
    *,
    guidance_scale: float = 7.5,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The rows of docs/zoo-training.md's judge table: each model (default: every installed zoo
    model) on its own prompts and on :data:`CROSS`'s, then the renders of its prompts as drawn
    and through the model's VAE.

    With ``out``, also writes there ``zoo-eval.json`` (the rows), ``zoo-eval.md`` (their table)
    and ``zoo-samples-MODEL-on-PROMPTS.png`` (the first 16 images of each row).
    """
    from tqdm.auto import tqdm

    from multifusion.loading import zoo_models
    from multifusion.zoo.train import MODELS

    models = list(models) if models else [m for m in MODELS if m in zoo_models()]
    folder = Path(out) if out is not None else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    judge = load_judge()
    rows: list[dict[str, Any]] = []
    for m in tqdm(models, desc="evaluating zoo models", disable=not progress):
        handle = _handle(m)
        for prompts in [m, *CROSS.get(m, [])]:
            r = evaluate_model(handle, n, seed, prompts=prompts, guidance_scale=guidance_scale, judge=judge, return_images=True)
            images = r.pop("images")
            r.pop("captions")
            rows.append(r)
            if folder:
                image_grid(images[:16], cols=8).save(folder / f"zoo-samples-{m}-on-{prompts}.png")
        rows.append(evaluate_renders(m, n, seed, judge=judge))
        rows.append(evaluate_renders(m, n, seed, judge=judge, vae=handle.vae))
    if folder:
        (folder / "zoo-eval.json").write_text(json.dumps(rows, indent=2))
        (folder / "zoo-eval.md").write_text(format_table(rows) + "\n")
    return rows


def draw_training_figures(out: str | Path, run: str | Path | None = None, vae_of: str = "general") -> float:
    """Write ``zoo-vae.png`` (held-out renders over their reconstructions by zoo model ``vae_of``'s
    VAE) and, given a training ``run`` folder, ``zoo-loss.png`` (its loss curves) into ``out``.

    Returns the reconstructions' PSNR in dB.
    """
    from multifusion.zoo.train import MODELS

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if run is not None:
        loss_plot({m: read_loss(run, m) for m in MODELS}, folder / "zoo-loss.png")
    grid, psnr = reconstruction_grid(_handle(vae_of).vae)
    grid.save(folder / "zoo-vae.png")
    return psnr
