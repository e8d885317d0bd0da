"""Real Stable Diffusion models: CLIP score, FID and Inception Score with torchmetrics.

The zoo apps judge images with the ShapeWorld judge; real checkpoints need the metrics the
papers report. Each metric takes an explicit *local* weights path and nothing is downloaded:

- CLIP score: a folder holding a ``CLIPModel`` and its ``CLIPProcessor`` (``save_pretrained`` of
  e.g. openai/clip-vit-large-patch14, or any CLIP of the same format);
- FID and IS: the Inception-v3 weights file of torch-fidelity
  (``pt_inception-2015-12-05-6726825d.pth``; needs ``pip install torch-fidelity``), or any
  ``torch.nn.Module`` passed as ``feature_extractor`` (uint8 images (N, 3, H, W) -> (N, D)
  features; for IS, D class logits), which is also how the tests run offline with a tiny one.

Install the metrics with ``pip install -e ".[bench]"`` (torchmetrics). torch-fidelity is left
out of that extra on purpose: it depends on torchvision, which must match the installed torch
build (on a CPU-only machine pip would otherwise fetch a CUDA torch).

    multifusion bench real --recipe fusion.yaml --prompt-file prompts.txt --out runs/real \\
        --clip-model ./clip-vit-large-patch14 --inception-weights ./pt_inception-2015-12-05-6726825d.pth \\
        --reference ./coco-val-5k

The recipe's models must all take a prompt (single, average, snb, ...): every prompt line is
given to every model. Images go to ``OUT/images/p0000-s0.png`` ... through
:func:`multifusion.api.generate_to_folder`, so an interrupted run resumes; the scores go to
``OUT/realworld.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multifusion.errors import RecipeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise RecipeError(
            'CLIP score, FID and IS need torchmetrics: pip install -e ".[bench]" (or pip install "torchmetrics>=1.4")'
        ) from None
    return torchmetrics


def _existing(option: str, path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise RecipeError(f"{option}: {str(path)!r} does not exist; give the local path of {what} (nothing is downloaded)")
    return p


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line; blank lines and lines starting with # are skipped."""
    p = _existing("prompt_file", path, "a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text().splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise RecipeError(f"--prompt-file: {str(path)!r} holds no prompt (one per line; # starts a comment)")
    return prompts


def load_image_folder(folder: str | Path) -> list:
    """Every PNG/JPEG/WebP image of ``folder`` (sorted by name), as RGB PIL images."""
    from PIL import Image

    p = _existing("reference_dir", folder, "a folder of reference images")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
    if len(files) < 2:
        raise RecipeError(
            f"reference_dir: {str(folder)!r} holds {len(files)} image(s); FID needs a folder of at least 2 PNG/JPEG images"
        )
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return images


def to_uint8(images: Sequence[Any], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images (or uint8 (H, W, 3) arrays) -> (N, 3, H, W) uint8, resized to ``size`` (h, w)
    with bicubic filtering when given (reference sets come in many sizes)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for im in images:
        im = im if hasattr(im, "convert") else Image.fromarray(np.asarray(im, dtype=np.uint8))
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arrays.append(np.asarray(im))
    if len({a.shape for a in arrays}) != 1:
        raise RecipeError(f"images have different sizes {sorted({a.shape for a in arrays})}; pass a size to bring them to one")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _batches(x: torch.Tensor, batch_size: int):
    return (x[i : i + batch_size] for i in range(0, len(x), batch_size))


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embedding
    tensor. Deviation from plain torchmetrics use: transformers 5 returns an output object
    (embedding in ``pooler_output``) where torchmetrics expects the tensor itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(images: Sequence[Any], prompts: Sequence[str], clip_model: str | Path, *, batch_size: int = 32) -> float:
    """Mean CLIP score ``100 * max(cos(image, text), 0)`` (torchmetrics CLIPScore) of each image
    with its prompt, with the CLIP model saved in the local folder ``clip_model``."""
    _torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = _existing("clip_model", clip_model, "a CLIP folder (CLIPModel and CLIPProcessor saved with save_pretrained)")
    if not (folder / "config.json").is_file():
        raise RecipeError(
            f"clip_model: {str(clip_model)!r} has no config.json; save a CLIPModel and its CLIPProcessor there with save_pretrained"
        )
    if len(images) != len(prompts):
        raise RecipeError(f"got {len(images)} images and {len(prompts)} prompts; pass one prompt per image")

    def load():
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        return _ProjectedFeatures(model), CLIPProcessor.from_pretrained(folder, local_files_only=True)

    try:
        metric = CLIPScore(model_name_or_path=load)
    except (TypeError, AttributeError, ValueError):  # torchmetrics before callables: it takes the path itself
        metric = CLIPScore(model_name_or_path=str(folder))
    x = to_uint8(images)
    for start in range(0, len(x), batch_size):
        metric.update(x[start : start + batch_size], list(prompts[start : start + batch_size]))
    return float(metric.compute())


def _inception(option: str, inception_weights, feature_extractor, features: str) -> Any:
    """The feature module: a custom one, or torch-fidelity's Inception-v3 from a local file."""
    if feature_extractor is not None:
        return feature_extractor
    if inception_weights is None:
        raise RecipeError(f"{option}: give inception_weights (the local {INCEPTION_FILE}) or a feature_extractor module")
    path = _existing("inception_weights", inception_weights, f"torch-fidelity's Inception-v3 weights ({INCEPTION_FILE})")
    _torchmetrics()
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise RecipeError(
            "FID and IS with the Inception network need torch-fidelity: pip install torch-fidelity "
            "(with the torchvision build that matches your torch), or pass a feature_extractor module"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[features], feature_extractor_weights_path=str(path))


def frechet_inception_distance(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    inception_weights: str | Path | None = None,
    feature_extractor: torch.nn.Module | None = None,
    batch_size: int = 32,
) -> float:
    """FID (torchmetrics) between two image sets (>= 2 images each); reference images are
    resized to the generated images' size."""
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(generated) < 2 or len(reference) < 2:
        raise RecipeError(f"FID needs at least 2 images per set, got {len(generated)} generated and {len(reference)} reference")
    module = _inception("FID", inception_weights, feature_extractor, "2048")
    metric = FrechetInceptionDistance(feature=module)
    fake = to_uint8(generated)
    real = to_uint8(reference, size=tuple(fake.shape[-2:]))
    with torch.no_grad():
        for batch in _batches(real, batch_size):
            metric.update(batch, real=True)
        for batch in _batches(fake, batch_size):
            metric.update(batch, real=False)
        return float(metric.compute())


def inception_score(
    images: Sequence[Any],
    *,
    inception_weights: str | Path | None = None,
    feature_extractor: torch.nn.Module | None = None,
    splits: int = 10,
    batch_size: int = 32,
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``; torchmetrics). Its split shuffle draws from a
    generator seeded 0, so a score is reproducible."""
    _torchmetrics()
    from torchmetrics.image.inception import InceptionScore

    module = _inception("IS", inception_weights, feature_extractor, "logits_unbiased")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=module, splits=min(splits, len(images)))
    with torch.no_grad():
        for batch in _batches(to_uint8(images), batch_size):
            metric.update(batch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = metric.compute()
    return float(mean), float(std)


def run_realworld(
    recipe: dict | str | Path,
    prompt_file: str | Path,
    out: str | Path,
    *,
    seeds: int = 1,
    clip_model: str | Path | None = None,
    inception_weights: str | Path | None = None,
    reference_dir: str | Path | None = None,
    feature_extractor: torch.nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Generate ``seeds`` images per prompt of ``prompt_file`` with ``recipe`` (every model gets
    the prompt) and score them: CLIP score when ``clip_model`` is given; IS when Inception
    weights or a feature extractor are; FID when, in addition, ``reference_dir`` is. Every path
    is checked before the first image. Writes ``OUT/realworld.json`` and returns it."""
    from multifusion.api import generate_to_folder, image_name
    from multifusion.io import write_text
    from multifusion.recipe import parse_recipe
    from multifusion.registry import get_method
    from multifusion.validate import validate_recipe

    if not isinstance(seeds, int) or seeds <= 0:
        raise RecipeError(f"seeds must be a positive integer, got {seeds!r}")
    prompts = read_prompt_file(prompt_file)
    if clip_model is None and inception_weights is None and feature_extractor is None:
        raise RecipeError(
            "nothing to measure: give clip_model (CLIP score) and/or inception_weights (IS, and FID with reference_dir)"
        )
    if reference_dir is not None and inception_weights is None and feature_extractor is None:
        raise RecipeError("reference_dir: is for FID, which also needs inception_weights (or a feature_extractor)")
    if clip_model is not None:
        _existing("clip_model", clip_model, "a CLIP folder (CLIPModel and CLIPProcessor saved with save_pretrained)")
    if inception_weights is not None:
        _existing("inception_weights", inception_weights, f"torch-fidelity's Inception-v3 weights ({INCEPTION_FILE})")
    reference = load_image_folder(reference_dir) if reference_dir is not None else None
    _torchmetrics()
    base = parse_recipe(recipe).model_dump(mode="json", exclude_none=True)
    if not get_method(base["method"]).model_prompts:
        raise RecipeError(
            f"method {base['method']!r} takes its prompts from its params; bench real needs a recipe whose models each take the prompt"
        )

    out = Path(out)
    images, image_prompts = [], []
    from PIL import Image

    for i, prompt in enumerate(prompts):
        data = json.loads(json.dumps(base))
        for m in data["models"]:
            m["prompt"] = prompt
        data.setdefault("sampling", {}).update(num_images=seeds)
        r = parse_recipe(data)
        validate_recipe(r)
        stem = f"p{i:04d}"
        generate_to_folder(r, out / "images", stem=stem, batch_size=batch_size, progress=progress)
        for seed in r.seeds():
            with Image.open(out / "images" / image_name(stem, seed)) as im:
                images.append(im.convert("RGB"))
            image_prompts.append(prompt)

    metrics: dict[str, Any] = {}
    if clip_model is not None:
        metrics["clip_score"] = clip_score(images, image_prompts, clip_model)
    if inception_weights is not None or feature_extractor is not None:
        mean, std = inception_score(images, inception_weights=inception_weights, feature_extractor=feature_extractor)
        metrics["inception_score"], metrics["inception_score_std"] = mean, std
        if reference is not None:
            metrics["fid"] = frechet_inception_distance(
                images, reference, inception_weights=inception_weights, feature_extractor=feature_extractor
            )
    result = {
        "metrics": metrics,
        "images": len(images),
        "prompts": prompts,
        "seeds_per_prompt": seeds,
        "recipe": base,
        "weights": {
            "clip_model": str(clip_model) if clip_model else None,
            "inception_weights": str(inception_weights) if inception_weights else None,
            "feature_extractor": type(feature_extractor).__name__ if feature_extractor is not None else None,
            "reference": str(reference_dir) if reference_dir else None,
            "reference_images": len(reference) if reference is not None else 0,
        },
    }
    write_text(out / "realworld.json", json.dumps(result, indent=2) + "\n")
    return result
