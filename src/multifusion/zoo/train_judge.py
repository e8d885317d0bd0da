"""Train and evaluate the ShapeWorld judge, deterministically and resumably.

One command retrains the shipped judge and prints its held-out accuracy::

    multifusion zoo judge --out runs/judge --install

``--install`` copies the weights to ``src/multifusion/zoo/weights/`` (fp16 safetensors + JSON
config with the measured accuracies). ``--evaluate`` only measures the shipped weights (and
records the result in their JSON config). The shipped weights were trained with
``--threads 1``; the thread count changes floating-point sums, so pass it to reproduce them
bit for bit.

Training data is a fixed pool of renders of the ``"any"`` distribution (every background,
style, shape, colour, texture and slot), re-augmented at every step with colour jitter,
Gaussian blur and Gaussian noise so that the judge also reads the slightly soft, noisy images a
small diffusion model draws. Batch ``step`` depends only on ``(seed, step)``, so a run resumed
from ``out_dir/checkpoint.safetensors`` ends with the same weights as an uninterrupted one (the
loop is :class:`multifusion.training.TrainingRun`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.nn import functional as F
from tqdm.auto import tqdm

from multifusion.errors import MultifusionError
from multifusion.training import StepFn, TrainingRun
from multifusion.zoo.judge import DEFAULT_WEIGHTS, EMPTY, VOCABULARY, Judge, load_judge, save_judge, to_tensor
from multifusion.zoo.render import DISTRIBUTIONS, SIZE, SLOTS, Scene, example_rng, make_dataset

EVAL_SEED = 20_240_917
"""Seed of the held-out evaluation renders (the training pool uses the run's own seed)."""
NOISE_STD = 10 / 255
"""Gaussian noise of the "noisy" evaluation set, on the [0, 1] scale."""
BLUR_SIGMA = 1.0
"""Gaussian blur of the "blurred" evaluation set, in pixels."""
IGNORE = -100  # label of the colour and texture of an empty slot


class TrainJudgeError(MultifusionError):
    """Bad arguments to judge training, or a checkpoint from a different run."""


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices of each head for ``scenes``: ``background``, ``style`` (N,); ``shape``,
    ``colour``, ``texture`` (N, 3), colour and texture IGNORE where the slot is empty."""
    n = len(scenes)
    labels = {
        "background": torch.zeros(n, dtype=torch.long),
        "style": torch.zeros(n, dtype=torch.long),
        "shape": torch.zeros(n, len(SLOTS), dtype=torch.long),  # 0 = empty
        "colour": torch.full((n, len(SLOTS)), IGNORE, dtype=torch.long),
        "texture": torch.full((n, len(SLOTS)), IGNORE, dtype=torch.long),
    }
    for i, scene in enumerate(scenes):
        labels["background"][i] = VOCABULARY["background"].index(scene.background)
        labels["style"][i] = VOCABULARY["style"].index(scene.style)
        for obj in scene.objects:
            s = SLOTS.index(obj.slot)
            labels["shape"][i, s] = VOCABULARY["shape"].index(obj.shape)
            labels["colour"][i, s] = VOCABULARY["colour"].index(obj.colour)
            labels["texture"][i, s] = VOCABULARY["texture"].index(obj.texture)
    return labels


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Blur each image of ``x`` (N, C, H, W) with its own ``sigma`` (N,) pixels (0 = unchanged)."""
    n, c, h, w = x.shape
    d = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (d[None] / s) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)  # along width
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)  # along height
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomly degrade (N, 3, 64, 64) images in [0, 1]: colour jitter always, blur
    (sigma 0.3-1.3 px) and noise (std up to 0.06) each on half the images."""
    n = len(x)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    gain = (0.9 + 0.2 * u(n, 1, 1, 1)) * (0.95 + 0.1 * u(n, 3, 1, 1))
    contrast = 0.9 + 0.2 * u(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * gain
    sigma = (0.3 + 1.0 * u(n)) * (u(n) < 0.5)
    x = gaussian_blur(x, sigma)
    std = 0.06 * u(n, 1, 1, 1) * (u(n, 1, 1, 1) < 0.5)
    x = x + std * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def judge_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy (slot heads averaged over slots)."""
    loss = F.cross_entropy(logits["background"], labels["background"]) + F.cross_entropy(logits["style"], labels["style"])
    for key in ("shape", "colour", "texture"):
        loss = loss + F.cross_entropy(logits[key].flatten(0, 1), labels[key].flatten(), ignore_index=IGNORE)
    return loss


def _lr_factor(step: int, steps: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def _pool(out: Path, size: int, seed: int, progress: bool) -> tuple[np.ndarray, list[Scene]]:
    """The training renders (N, 64, 64, 3) uint8 and their scenes, cached in ``out``.

    The cache only saves time: without it the same pool is rendered again.
    """
    # A scene is the first thing an example draws from its generator, so resampling it is
    # cheap and needs no render.
    sample = DISTRIBUTIONS["any"].sample
    scenes = [sample(example_rng("any", seed, i)) for i in range(size)]
    cache = out / f"pool-seed{seed}-n{size}.npy"
    if cache.exists():
        images = np.load(cache)
        if images.shape == (size, SIZE, SIZE, 3):
            return images, scenes
    chunk = 1000
    images = np.concatenate(
        [
            make_dataset("any", min(chunk, size - start), seed, start=start).images
            for start in tqdm(range(0, size, chunk), desc="rendering judge data", disable=not progress)
        ]
    )
    np.save(cache, images)
    return images, scenes


def _judge_loss(
    judge: torch.nn.Module, images: np.ndarray, labels: dict[str, torch.Tensor], seed: int, batch_size: int
) -> StepFn:
    """The step function of judge training: the heads' cross-entropy on an augmented batch of ``images``."""

    def step(index: int, _: torch.Generator) -> dict[str, torch.Tensor]:
        # Deviation: draws from (seed, step) with its own generators rather than the run's step
        # generator, as the shipped judge was trained; another stream would change its weights.
        idx = np.random.default_rng([seed, index]).integers(0, len(images), batch_size)
        x = augment(to_tensor(images[idx]), torch.Generator().manual_seed(seed * 1_000_003 + index))
        return {"loss": judge_loss(judge(x), {k: v[torch.from_numpy(idx)] for k, v in labels.items()})}

    return step


def train_judge(
    out_dir: str | Path,
    steps: int = 2000,
    seed: int = 0,
    progress: bool = True,
    *,
    pool_size: int = 36_000,
    batch_size: int = 128,
    lr: float = 2e-3,
    checkpoint_every: int = 250,
    log_every: int = 25,
    until: int | None = None,
) -> Judge:
    """Train a judge from scratch into ``out_dir``, resuming from ``out_dir/checkpoint.safetensors``.

    Writes ``out_dir/judge.safetensors`` + ``judge.json`` and a loss log ``loss.csv``; returns
    the trained judge (eval mode). ``until`` stops this invocation after that many steps (with a
    checkpoint), so a long run can be spread over several invocations. Deterministic for a given
    ``(steps, seed, pool_size, batch_size, lr)`` and thread count.
    """
    if not isinstance(steps, int) or steps < 1:
        raise TrainJudgeError(f"steps={steps!r} must be a positive int")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = {"steps": steps, "seed": seed, "pool_size": pool_size, "batch_size": batch_size, "lr": lr}
    # Floating-point sums depend on the thread count: record it (resuming may change it).
    threads = torch.get_num_threads()
    images, scenes = _pool(out, pool_size, seed, progress)

    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.01)
    # On the CPU: the determinism of the shipped weights is defined there.
    run = TrainingRun(
        out,
        "judge",
        judge,
        opt,
        seed=seed,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        accelerator=Accelerator(cpu=True),
    )
    saved = run.resume()
    if saved is not None and saved.get("run") != args:
        raise TrainJudgeError(
            f"{run.checkpoint_path} was made by the run {saved.get('run')}, not {args}; "
            "pass the same arguments to resume, or use a new out_dir"
        )
    t0 = time.time()
    run.train(
        _judge_loss(run.model, images, scene_labels(scenes), seed, batch_size),
        steps,
        lr=lambda s: lr * _lr_factor(s, steps),
        stop=until,
        meta={"run": args},
        progress=progress,
        desc="training judge",
    )
    judge.eval()
    if run.step == steps:
        timing = {"threads": threads, "seconds_last_run": round(time.time() - t0, 1)}
        save_judge(judge, out / "judge.safetensors", extra={"training": args | timing})
    return judge


CORRUPTIONS: dict[str, str] = {
    "clean": "the renders as drawn",
    "noisy": f"Gaussian noise, std {NOISE_STD * 255:.0f}/255 (within the training augmentation)",
    "blurred": f"Gaussian blur, sigma {BLUR_SIGMA} px (within the training augmentation)",
    "noisy-strong": "Gaussian noise, std 25/255 (beyond the training augmentation)",
    "blurred-strong": "Gaussian blur, sigma 1.6 px (beyond the training augmentation)",
    "latent-grid": "area-downsampled to 16x16 and bilinearly upsampled: only what a 16x16 grid holds",
}
"""The held-out corruptions of :func:`corrupt`, with what each does."""


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> torch.Tensor:
    """Apply a held-out corruption of :data:`CORRUPTIONS` to (N, 64, 64, 3) uint8 images.

    Returns (N, 3, 64, 64) floats in [0, 1]; the noise is seeded by ``seed``.
    """
    x = to_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    if kind == "clean":
        return x
    if kind in ("noisy", "noisy-strong"):
        std = NOISE_STD if kind == "noisy" else 25 / 255
        return (x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    if kind in ("blurred", "blurred-strong"):
        return gaussian_blur(x, torch.full((len(x),), BLUR_SIGMA if kind == "blurred" else 1.6))
    if kind == "latent-grid":
        small = F.interpolate(x, size=(SIZE // 4, SIZE // 4), mode="area")
        return F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    raise TrainJudgeError(f"kind={kind!r} is not one of {tuple(CORRUPTIONS)}")


def accuracy(judge: Judge, x: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy of ``judge`` on images ``x`` (N, 3, 64, 64) with truth ``scenes``.

    ``background`` and ``style`` per image; ``shape`` per slot (empty counts as a class);
    ``colour`` and ``texture`` per filled slot; ``slot`` a slot read entirely right;
    ``image`` an image read entirely right.
    """
    probs = judge.probabilities(x)
    labels = scene_labels(scenes)
    pred = {k: v.argmax(dim=-1) for k, v in probs.items()}
    filled = labels["shape"] != VOCABULARY["shape"].index(EMPTY)
    right = {k: pred[k] == labels[k] for k in pred}
    slot_ok = right["shape"] & (~filled | (right["colour"] & right["texture"]))
    image_ok = right["background"] & right["style"] & slot_ok.all(dim=1)
    result = {
        "background": right["background"].float().mean(),
        "style": right["style"].float().mean(),
        "shape": right["shape"].float().mean(),
        "colour": right["colour"][filled].float().mean(),
        "texture": right["texture"][filled].float().mean(),
        "slot": slot_ok.float().mean(),
        "image": image_ok.float().mean(),
    }
    return {k: round(float(v), 4) for k, v in result.items()}


def evaluate_judge(judge: Judge, n: int = 2000, seed: int = EVAL_SEED, progress: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy on ``n`` fresh renders of everything, under each of :data:`CORRUPTIONS`, and on
    ``n // 4`` clean renders of each zoo training distribution."""
    results = {}
    data = make_dataset("any", n, seed)
    for kind in tqdm(CORRUPTIONS, desc="evaluating judge", disable=not progress):
        results[f"any/{kind}"] = accuracy(judge, corrupt(data.images, kind, seed), data.scenes)
    for name in DISTRIBUTIONS:
        if name != "any":
            sub = make_dataset(name, n // 4, seed)
            results[f"{name}/clean"] = accuracy(judge, corrupt(sub.images, "clean"), sub.scenes)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of :func:`evaluate_judge` results, in percent."""
    keys = list(next(iter(results.values())))
    lines = ["| renders | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, acc in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def record_accuracy(weights: Path, eval_n: int = 2000, progress: bool = True) -> dict[str, dict[str, float]]:
    """Measure the judge saved at ``weights`` on held-out renders (clean, noisy, blurred) and
    record the numbers in its ``.json``. The fp16 weights as saved are measured, not the fp32
    ones of training: those are what ships."""
    results = evaluate_judge(load_judge(weights), n=eval_n, progress=progress)
    config_path = weights.with_suffix(".json")
    config = json.loads(config_path.read_text())
    config["accuracy"] = {"n": eval_n, "seed": EVAL_SEED, "corruptions": CORRUPTIONS, "results": results}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return results


def install_judge(weights: Path) -> Path:
    """Copy a trained judge (weights and its ``.json``) into the package; returns the target."""
    DEFAULT_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, DEFAULT_WEIGHTS)
    shutil.copyfile(weights.with_suffix(".json"), DEFAULT_WEIGHTS.with_suffix(".json"))
    return DEFAULT_WEIGHTS
