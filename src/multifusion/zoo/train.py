"""Train the zoo's diffusion models from scratch, deterministically and resumably.

Stages, all under one run folder ``out_dir`` (keep it outside the repository):

1. ``base/``: the shared tokenizer, the shared text encoder (seeded, frozen at initialisation)
   and the shared VAE, trained once on a mix of every zoo distribution; its ``scaling_factor``
   is set to 1 / std of its latents on that data, as Stable Diffusion's 0.18215 was. Then its
   decoder alone trains on, encoder frozen (``decoder_steps``): the latent space every UNet
   learns stays the one the encoder made, so a better decoder never asks for a UNet retrain
   (Stable Diffusion's ft-EMA/ft-MSE VAEs were made the same way).
2. ``<model>/data.safetensors``: the model's training set, rendered once and encoded once (VAE
   posterior mean and std, token ids), so the training loop renders nothing.
3. ``<model>/checkpoint.safetensors``: UNet, EMA of the UNet, optimiser and step, written every
   ``checkpoint_every`` steps; ``<model>/loss.csv`` logs the loss (both by
   :class:`multifusion.training.TrainingRun`). A restarted run continues at the last checkpoint
   and ends with exactly the weights of an uninterrupted one, because the batch, noise and
   timesteps of step ``s`` depend only on ``(seed, model, s)``. A model that others fine-tune
   from (see :data:`INIT_FROM`) also writes ``<model>/ema-step<N>.safetensors``, its EMA weights
   at step ``TrainConfig.finetune_from_step``; the fine-tunes start from that file.
4. ``<model>/pipeline/``: a full StableDiffusionPipeline folder (fp32, EMA weights) after the
   last step. :func:`install` copies finished models into the package as fp16 pipelines.

Training follows Stable Diffusion's recipe at toy size: epsilon prediction, the scaled_linear
schedule of 1000 steps, uniform timesteps, MSE loss, ~10 % of captions dropped to "" so
classifier-free guidance works, AdamW with a short warm-up and a constant learning rate (so a
later run can simply continue with more steps), and an EMA of the weights that is what ships.

Command line (one command retrains everything; run it again to resume)::

    multifusion zoo train --out runs/zoo --install
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from filelock import FileLock, Timeout

from multifusion.errors import MultifusionError
from multifusion.io import atomic_path, write_text
from multifusion.training import (
    CHECKPOINT,
    LOSS_LOG,
    StepFn,
    TrainingRun,
    checkpoint_info,
    derived_seed,
    load_checkpoint,
    load_tensors,
    read_log,
    save_tensors,
)
from multifusion.zoo import render
from multifusion.zoo.models import (
    SIZES,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    fast_cpu_attention,
)

MODELS: tuple[str, ...] = ("general", "expert", "cartoon", "layout", "palette", "slice0", "slice1")
"""Every zoo model, in priority order (the order a short run trains them)."""

DEFAULT_STEPS: dict[str, int] = {
    "general": 4500,
    "expert": 3500,
    "cartoon": 1500,
    "layout": 2500,
    "palette": 1500,
    "slice0": 1200,
    "slice1": 1200,
    "toon": 1500,
    "tint": 1500,
}
"""Training steps per model at batch 32 when ``steps`` is not given.

These are the step counts of the shipped weights (their ``training.json``), so the default
command retrains that schedule; pass ``steps`` to train further. ``general`` must reach
``TrainConfig.finetune_from_step`` for its fine-tunes to start.
"""

INIT_FROM: dict[str, str] = {
    "cartoon": "general",
    "layout": "general",
    "palette": "general",
    "slice0": "general",
    "slice1": "general",
}
"""Models that start as fine-tunes of another: its EMA weights at ``TrainConfig.finetune_from_step``.

Fine-tunes of one base is how the papers' models relate (AFA fuses fine-tunes of one SD), and
it is what makes the zoo trainable on 2 CPU cores: a fine-tune learns a style, grey objects or
a scene slice in a fraction of the steps a model from scratch needs. ``expert`` starts from
scratch, so it has never seen a scene.
"""

FROM_SHIPPED: dict[str, str] = {"toon": "general", "tint": "general"}
"""Models fine-tuned from another model's *shipped* weights, not from a run-folder snapshot.

``toon`` (cartoons of textured objects, the cross-domain app's content model) was added after
the zoo shipped, so it starts from the package's ``general`` UNet: its fp16 files, upcast to
float32. Its run folder's shared parts (tokenizer, text encoder, VAE) are the shipped ones,
upcast the same way, so the installed model shares them byte for byte with the rest of the zoo.
``tint`` (coloured objects at their slots, captions without shape words: the
`aggregation-layout` app's colour model, which takes the layout as the ``layout`` model does)
was added the same way.
Such models are trained on their own (``--models toon``): never with models that train a base
from scratch. They are not in :data:`MODELS`, so the default command leaves them alone.
"""

VAE_MIX: tuple[str, ...] = ("general", "expert", "cartoon", "layout", "palette")
"""Distributions the shared VAE trains on (equal shares)."""

DECODER_MIX: tuple[str, ...] = (*VAE_MIX, "toon", "tint")
"""Distributions the decoder phase trains on (equal shares): every scene the zoo draws, the
models added later too (``toon``'s textured cartoons were what the first decoder lost most)."""


class ZooTrainError(MultifusionError):
    """A zoo training request that cannot run (unknown model, bad steps, corrupt run folder)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a zoo training run; stored in ``out_dir/config.json``."""

    size: str = "zoo"
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    dataset_size: int = 16000
    checkpoint_every: int = 250
    log_every: int = 25
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_dataset_size: int = 1500  # per distribution of VAE_MIX
    vae_kl_weight: float = 1e-6
    decoder_steps: int = 3000
    """Steps of the decoder phase (encoder frozen) after the VAE's ``vae_steps``; 0 skips it."""
    decoder_lr: float = 5e-4
    finetune_from_step: int = 3000
    """Step of the parent's EMA that every fine-tune of :data:`INIT_FROM` starts from.

    A fixed step, saved as a snapshot when the parent passes it, makes a fine-tune independent
    of how far the parent had got when the fine-tune started (which depends on how worker
    processes interleave) and of training the parent further later. 3000 is where the shipped
    fine-tunes started.
    """

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ZooTrainError(f"size={self.size!r} is not one of {sorted(SIZES)}")
        for key in (
            "batch_size",
            "dataset_size",
            "checkpoint_every",
            "log_every",
            "vae_batch_size",
            "vae_dataset_size",
            "finetune_from_step",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ZooTrainError(f"{key}={value!r} must be a positive int")
        if not isinstance(self.decoder_steps, int) or self.decoder_steps < 0:
            raise ZooTrainError(f"decoder_steps={self.decoder_steps!r} must be a non-negative int (0 skips the decoder phase)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ZooTrainError(f"caption_dropout={self.caption_dropout!r} must be in [0, 1)")


# ----------------------------------------------------------------------------- helpers


def distribution(name: str) -> render.Distribution:
    """The training distribution of zoo model ``name`` (``sliceI``: slice I of 2 of general)."""
    if name.startswith("slice") and name[5:].isdigit():
        slices = render.ensemble_slices(2)
        i = int(name[5:])
        if i < len(slices):
            return slices[i]
    if name in MODELS or name in FROM_SHIPPED or name in render.DISTRIBUTIONS:
        return render.get_distribution(name)
    import difflib

    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ZooTrainError(f"unknown zoo model {name!r}{hint}; known: {', '.join(MODELS)}")


def _accelerator() -> Accelerator:
    """The accelerator of zoo training: the CPU, one process.

    The zoo's determinism is defined on the CPU for a thread count. Its processes share the work
    one model each (file locks); ``accelerate launch`` would join them into one data-parallel
    run of a single model, which the locks would then split across models, so it is refused.
    """
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes > 1:
        raise ZooTrainError(
            "zoo training shares models between processes through file locks: start `multifusion zoo train` "
            "once per core (each with --threads 1) instead of under `accelerate launch`"
        )
    return accelerator


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


@contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive file lock, so two training processes never build the same thing twice
    (`filelock`: flock on POSIX, msvcrt on Windows). Yields True once held; with `blocking`
    False, yields False at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=None if blocking else 0)  # None: the lock's own timeout, wait forever
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- shared base


@dataclass
class Base:
    """The shared, frozen components every zoo model is trained against."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    info: dict[str, Any]


def _vae_data(config: TrainConfig, seed: int, mix: Sequence[str] = VAE_MIX) -> np.ndarray:
    parts = [render.make_dataset(name, config.vae_dataset_size, seed).images for name in mix]
    return np.concatenate(parts)


def _vae_loss(vae: Any, images: np.ndarray, config: TrainConfig, decoder_only: bool = False) -> StepFn:
    """The step function of VAE training: reconstruction MSE plus a small KL on a batch of
    ``images``; ``decoder_only``: the MSE of decoding a posterior sample of the frozen encoder."""

    def step(_: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(images), (config.vae_batch_size,), generator=g)
        x = _to_unit(images[idx.numpy()])
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
            # A sample, not the mean: a UNet's latents sit anywhere in the posterior, not at its centre.
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        mse = F.mse_loss(vae.decode(z).sample, x)
        if decoder_only:
            return {"loss": mse}
        kl = posterior.kl().mean()
        return {"loss": mse + config.vae_kl_weight * kl, "mse": mse, "kl": kl}

    return step


def _train_vae(base_dir: Path, config: TrainConfig, seed: int, progress: bool) -> Any:
    """Train the shared VAE (resumable like the UNets); return it in eval mode."""
    vae = build_vae(SIZES[config.size], derived_seed(seed, "vae"))
    fast_cpu_attention(vae)
    return _vae_run(base_dir, vae, list(vae.parameters()), config.vae_lr, config.vae_steps, config, seed, progress)


def train_decoder(folder: Path, vae: Any, config: TrainConfig, seed: int, progress: bool) -> Any:
    """Train ``vae``'s decoder (and post-quant conv) ``config.decoder_steps`` steps on
    :data:`DECODER_MIX`, its encoder frozen (resumable: ``folder/decoder_checkpoint.safetensors``);
    return it in eval mode. The encoder's latents, and so every UNet trained on them, stay valid."""
    if config.decoder_steps == 0:
        return vae.eval()
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    _vae_run(folder, vae, trained, config.decoder_lr, config.decoder_steps, config, seed, progress, decoder_only=True)
    return vae.requires_grad_(False)


def _vae_run(
    folder: Path,
    vae: Any,
    params: list,
    lr: float,
    steps: int,
    config: TrainConfig,
    seed: int,
    progress: bool,
    decoder_only: bool = False,
) -> Any:
    """Train ``params`` of ``vae`` to ``steps`` with AdamW (100 warm-up steps), resumable from
    ``folder/vae_checkpoint.safetensors`` (the whole VAE on :data:`VAE_MIX`) or, with
    ``decoder_only``, ``folder/decoder_checkpoint.safetensors`` (its decoder on
    :data:`DECODER_MIX`, the encoder's posterior sampled). Returns ``vae`` in eval mode."""
    tag = "decoder" if decoder_only else "vae"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    run = TrainingRun(
        folder,
        tag,
        vae,
        opt,
        seed=seed,
        metrics=("loss",) if decoder_only else ("loss", "mse", "kl"),
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        prefix=f"{tag}_",
        accelerator=_accelerator(),
    )
    run.resume()
    if run.step < steps:
        # (N, 64, 64, 3) uint8; re-rendered on resume (deterministic)
        images = _vae_data(config, seed, DECODER_MIX if decoder_only else VAE_MIX)
        run.train(
            _vae_loss(vae, images, config, decoder_only),
            steps,
            lr=lambda s: lr * _lr_factor(s, 100),
            max_grad_norm=1.0,
            progress=progress,
        )
    return vae.eval()


def vae_psnr(vae: Any, images: np.ndarray) -> float:
    """PSNR in dB of ``images`` (N, 64, 64, 3) uint8 through ``vae`` (posterior mean, decoded)."""
    mean, _ = _encode(vae, images)
    with torch.no_grad():
        recon = vae.decode(mean).sample.clamp(-1, 1)
    mse = F.mse_loss(recon, _to_unit(images)).item() / 4.0  # in [0, 1] units
    return float(-10 * math.log10(mse))


@torch.no_grad()
def _encode(vae: Any, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``images`` (N, 64, 64, 3) uint8: two (N, 4, 16, 16) fp32 tensors."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(_to_unit(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def prepare_base(out_dir: str | Path, config: TrainConfig, seed: int = 0, progress: bool = True) -> Base:
    """Build (once) and load the shared tokenizer, text encoder and VAE under ``out_dir/base``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    base_dir = Path(out_dir) / "base"
    with _locked(Path(out_dir) / "base.lock"):
        info_path = base_dir / "base.json"
        if not info_path.exists():
            base_dir.mkdir(parents=True, exist_ok=True)
            sizes = SIZES[config.size]
            tokenizer = build_tokenizer(base_dir / "tokenizer")
            text_encoder = build_text_encoder(tokenizer, sizes, derived_seed(seed, "text_encoder"))
            text_encoder.save_pretrained(base_dir / "text_encoder", safe_serialization=True)
            t0 = time.time()
            vae = _train_vae(base_dir, config, seed, progress)
            # scaling_factor: 1 / std of the latents on the training mix (SD's 0.18215 came the same way).
            held = _vae_data(replace(config, vae_dataset_size=min(200, config.vae_dataset_size)), seed + 1)
            mean, std = _encode(vae, held)
            scaling = float(1.0 / mean.std())
            vae.register_to_config(scaling_factor=scaling)
            vae = train_decoder(base_dir, vae, config, seed, progress)
            vae.save_pretrained(base_dir / "vae", safe_serialization=True)
            info = {
                "scaling_factor": scaling,
                "vae_psnr_db": round(vae_psnr(vae, held), 2),
                "vae_steps": config.vae_steps,
                "decoder_steps": config.decoder_steps,
                "vae_minutes_this_run": round((time.time() - t0) / 60, 1),
                "max_tokens": tokenizer.model_max_length,
            }
            write_text(info_path, json.dumps(info, indent=2))  # last, and atomically: it marks the base as complete
    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "tokenizer")
    # use_safetensors: a run folder may hold files nobody vetted; only safetensors are read.
    text_encoder = CLIPTextModel.from_pretrained(base_dir / "text_encoder", use_safetensors=True).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base_dir / "vae", use_safetensors=True).eval().requires_grad_(False)
    return Base(tokenizer, text_encoder, vae, json.loads(info_path.read_text()))


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (N, max_tokens), padded as StableDiffusionPipeline pads; errors on truncation."""
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=False, return_tensors="pt"
    ).input_ids
    if ids.shape[1] != tokenizer.model_max_length:
        raise ZooTrainError(f"a caption needs {ids.shape[1]} tokens, more than model_max_length={tokenizer.model_max_length}")
    return ids


# ----------------------------------------------------------------------------- per-model data and training


def prepare_data(out_dir: str | Path, name: str, base: Base, config: TrainConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Render and encode ``name``'s training set once (cached in ``out_dir/name/data.safetensors``)."""
    path = Path(out_dir) / name / "data.safetensors"
    if not path.exists():
        images, captions = render_data(out_dir, name, config, seed)
        mean, std = _encode(base.vae, images)
        save_tensors(path, {"mean": mean.half(), "std": std.half(), "ids": tokenize(base.tokenizer, captions)}, {"model": name})
    return load_tensors(path)[0]


def render_data(out_dir: str | Path, name: str, config: TrainConfig, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``name``'s training renders (N, 64, 64, 3) uint8 and captions, cached in ``out_dir/name``.

    Needs no VAE, so it can run on a spare core while the VAE trains.
    """
    run = Path(out_dir) / name
    images_path, captions_path = run / "images.npy", run / "captions.json"
    if not captions_path.exists():  # written last: it marks the images as complete
        data = render.make_dataset(distribution(name), config.dataset_size, seed)
        with atomic_path(images_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, data.images)
        write_text(captions_path, json.dumps(data.captions))
    return np.load(images_path), json.loads(captions_path.read_text())


def _unet_for(base: Base, config: TrainConfig, name: str, seed: int):
    return build_unet(SIZES[config.size], derived_seed(seed, f"unet/{name}"), base.text_encoder.config.hidden_size)


def snapshot_path(out_dir: str | Path, parent: str, step: int) -> Path:
    """Where ``parent``'s EMA weights at ``step`` are kept for its fine-tunes to start from."""
    return Path(out_dir) / parent / f"ema-step{step}.safetensors"


def _missing_snapshot(out_dir: str | Path, name: str, parent: str, config: TrainConfig) -> ZooTrainError:
    """The error for fine-tune ``name`` whose parent has no snapshot, with the fix for each cause."""
    step = config.finetune_from_step
    ckpt = Path(out_dir) / parent / CHECKPOINT
    reached = checkpoint_info(ckpt)["step"] if ckpt.exists() else 0
    msg = (
        f"{name!r} is a fine-tune of {parent!r} from its EMA at step {step} (finetune_from_step), "
        f"but {snapshot_path(out_dir, parent, step)} does not exist"
    )
    if reached >= step:
        # The snapshot is written before the checkpoint of the same step, so this run folder was
        # trained by an older version or with another finetune_from_step: no resume can recover it.
        return ZooTrainError(
            f"{msg}, although {parent!r} is at step {reached}: delete {ckpt} and "
            f"{ckpt.parent / LOSS_LOG} and train {parent!r} again from scratch"
        )
    target = max(step, DEFAULT_STEPS[parent])
    return ZooTrainError(
        f"{msg}: {parent!r} is at step {reached}; train {parent!r} to at least {step} steps first, "
        f"e.g. `multifusion zoo train --out {out_dir} --models {parent} --steps {target}`"
    )


def _finetune_start(out_dir: str | Path, name: str, config: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights fine-tune ``name`` starts from, and its ``init_from`` record.

    Always the parent's snapshot at ``config.finetune_from_step``, never its latest checkpoint.
    """
    parent, step = INIT_FROM[name], config.finetune_from_step
    path = snapshot_path(out_dir, parent, step)
    if not path.exists():
        with _locked(Path(out_dir) / f"{parent}.lock"):  # waits while another process trains it
            if not path.exists():
                raise _missing_snapshot(out_dir, name, parent, config)
    ema, info = load_tensors(path)
    if info.get("step") != step:
        raise ZooTrainError(
            f"{path} holds step {info.get('step')!r}, not {step}: delete it and train {parent!r} again from scratch"
        )
    return ema, {"model": parent, "step": step}


def shipped_steps(name: str) -> int:
    """The training steps behind zoo model ``name``'s shipped weights: a continued model's total
    (``total_steps``), else its ``steps`` (records written before continuations had no total)."""
    from multifusion.loading import zoo_root

    info = json.loads((zoo_root() / name / "training.json").read_text())
    return info.get("total_steps", info["steps"])


def _shipped_start(parent: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a model that starts from zoo model ``parent``'s shipped UNet (a model of
    :data:`FROM_SHIPPED`, or a shipped model continued): fp16 in the package, upcast to
    float32; and its ``init_from`` record."""
    from safetensors.torch import load_file

    from multifusion.loading import zoo_root

    weights = {k: v.float() for k, v in load_file(zoo_root() / parent / "unet" / "diffusion_pytorch_model.safetensors").items()}
    return weights, {"model": parent, "step": shipped_steps(parent), "weights": "shipped fp16, upcast to float32"}


def base_from_shipped(out_dir: str | Path, parent: str) -> None:
    """Write ``out_dir/base`` (once) from zoo model ``parent``'s shipped tokenizer, text encoder
    and VAE, upcast to float32, so :func:`prepare_base` loads them instead of training a VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from multifusion.loading import zoo_root

    src, base_dir = zoo_root() / parent, Path(out_dir) / "base"
    with _locked(Path(out_dir) / "base.lock"):
        if (base_dir / "base.json").exists():
            info = json.loads((base_dir / "base.json").read_text())
            if info.get("from_shipped") != parent:
                raise ZooTrainError(
                    f"{base_dir} was not made from the shipped {parent!r}; train {sorted(FROM_SHIPPED)} "
                    "in a run folder of their own"
                )
            return
        CLIPTokenizer.from_pretrained(src / "tokenizer").save_pretrained(base_dir / "tokenizer")
        CLIPTextModel.from_pretrained(src / "text_encoder", use_safetensors=True).float().save_pretrained(
            base_dir / "text_encoder", safe_serialization=True
        )
        AutoencoderKL.from_pretrained(src / "vae", use_safetensors=True).float().save_pretrained(
            base_dir / "vae", safe_serialization=True
        )
        info = {**json.loads((src / "training.json").read_text())["base"], "from_shipped": parent}
        write_text(base_dir / "base.json", json.dumps(info, indent=2))  # last: it marks the base as complete


def train_shipped_decoder(
    out_dir: str | Path, config: TrainConfig | None = None, seed: int = 0, progress: bool = True, threads: int = 1
) -> dict[str, Any]:
    """Train the shipped VAE's decoder further, encoder frozen (:func:`train_decoder`, resumable),
    into ``out_dir/decoder/vae`` (fp32), for ``config.decoder_steps`` (default 3000) steps.
    Returns its record: steps, minutes, PSNR on the held-out renders :func:`prepare_base` measures
    and, before and after, on 64 held-out renders of each distribution of :data:`DECODER_MIX`
    (fewer when ``config.vae_dataset_size`` is smaller).
    :func:`install_vae` puts it into every zoo model."""
    from diffusers import AutoencoderKL

    config = config or TrainConfig()
    if config.decoder_steps < 1:
        raise ZooTrainError(f"decoder_steps={config.decoder_steps!r}: a decoder run needs at least one step")
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    base_from_shipped(out_dir, "general")
    vae = AutoencoderKL.from_pretrained(out_dir / "base" / "vae", use_safetensors=True).eval()
    # The held-out set `prepare_base` measures a VAE on (comparable with the record's first PSNR),
    # and each distribution of the decoder's mix on its own.
    held = _vae_data(replace(config, vae_dataset_size=min(200, config.vae_dataset_size)), seed + 1)
    per = {d: _vae_data(replace(config, vae_dataset_size=min(64, config.vae_dataset_size)), seed + 1, (d,)) for d in DECODER_MIX}
    before = {d: vae_psnr(vae, im) for d, im in per.items()}
    folder = out_dir / "decoder"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    vae = train_decoder(folder, vae, config, seed, progress)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    info = {
        "decoder_steps": config.decoder_steps,
        "decoder_minutes_this_run": round((time.time() - t0) / 60, 1),
        "vae_psnr_db": round(vae_psnr(vae, held), 2),
        "psnr_db_before_after": {d: [round(before[d], 2), round(vae_psnr(vae, im), 2)] for d, im in per.items()},
    }
    write_text(folder / "decoder.json", json.dumps(info, indent=2))
    return info


def install_vae(out_dir: str | Path, dest: str | Path | None = None) -> list[str]:
    """Write ``out_dir/decoder/vae`` (of :func:`train_shipped_decoder`) into every zoo model under
    ``dest`` (default: the package's weights) as fp16, and its record into each model's
    ``training.json`` (``base``); the zoo's VAE stays one file shared byte for byte. Returns the
    models changed."""
    from diffusers import AutoencoderKL

    from multifusion.loading import zoo_root

    folder = Path(out_dir) / "decoder"
    if not (folder / "decoder.json").exists():
        raise ZooTrainError(f"{folder} holds no trained decoder: run `multifusion zoo decoder --out {out_dir}` first")
    info = json.loads((folder / "decoder.json").read_text())
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).to(torch.float16)
    dest = Path(dest) if dest is not None else zoo_root()
    names = sorted(p.parent.name for p in dest.glob("*/model_index.json"))
    for name in names:
        target = dest / name / "vae"
        shutil.rmtree(target)
        vae.save_pretrained(target, safe_serialization=True)
        _drop_local_paths(target)
        record = json.loads((dest / name / "training.json").read_text())
        record["base"].update({k: info[k] for k in ("decoder_steps", "vae_psnr_db")})
        write_text(dest / name / "training.json", json.dumps(record, indent=2))
    return names


def _denoising_loss(unet: Any, base: Base, data: Mapping[str, torch.Tensor], config: TrainConfig) -> StepFn:
    """The step function of UNet training: eps-prediction MSE at uniform timesteps, ~10 % of captions dropped."""
    scheduler = build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.float()  # (1000,)
    scaling = base.vae.config.scaling_factor
    empty_ids = tokenize(base.tokenizer, [""])
    n_data = data["mean"].shape[0]

    def step(_: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n_data, (config.batch_size,), generator=g)
        mean, std = data["mean"][idx].float(), data["std"][idx].float()
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * scaling  # (B, 4, 16, 16) scaled latents
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=g)
        drop = torch.rand(config.batch_size, generator=g) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, data["ids"][idx])
        with torch.no_grad():
            context = base.text_encoder(ids)[0]  # (B, tokens, hidden)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return {"loss": F.mse_loss(unet(x_t, t, encoder_hidden_states=context).sample, noise)}

    return step


def _ema_update(
    out_dir: str | Path, name: str, unet: Any, ema: Any, config: TrainConfig, snapshot: bool = True
) -> Callable[[int], None]:
    """After each step: move the EMA towards the UNet; write the fine-tunes' snapshot at its step."""
    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    # Checked at every step, not only at checkpoints, so any checkpoint_every works; a run resumed
    # from a checkpoint before the step writes it on the way, one resumed past it wrote it before.
    # A continued shipped model writes none: its step N is not the parent's step N.
    snapshot_at = config.finetune_from_step if snapshot and name in INIT_FROM.values() else None

    def after_step(step: int) -> None:
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in unet_params], 1 - decay)
        if step + 1 == snapshot_at:  # before the checkpoint of this step, so a checkpoint past it implies the file
            save_tensors(snapshot_path(out_dir, name, step + 1), ema.state_dict(), {"model": name, "step": step + 1})

    return after_step


def unet_run(
    folder: Path, tag: str, unet: Any, ema: Any, opt: torch.optim.Optimizer, config: TrainConfig, seed: int
) -> TrainingRun:
    """The training run of a zoo UNet (or its adapters) and its EMA in ``folder``, random stream ``tag``."""
    return TrainingRun(
        folder,
        tag,
        unet,
        opt,
        seed=seed,
        modules={"ema": ema},
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        accelerator=_accelerator(),
    )


def train_model(
    out_dir: str | Path,
    name: str,
    base: Base,
    config: TrainConfig,
    steps: int,
    seed: int = 0,
    progress: bool = True,
    from_shipped: bool = False,
    rebase: bool = False,
) -> dict[str, Any]:
    """Train (or continue training) the UNet of zoo model ``name`` up to ``steps`` steps.

    Returns a summary (steps, minutes, final loss). Checkpoints every ``config.checkpoint_every``
    steps; the last one holds the final weights. ``from_shipped``: a new run starts from ``name``'s
    own shipped weights (a continuation; ``steps`` counts the steps beyond them, with a fresh
    optimizer and warm-up). ``rebase``: a new run of a fine-tune starts from its parent's shipped
    weights instead of the parent's run-folder snapshot.
    """
    unet = _unet_for(base, config, name, seed)
    fast_cpu_attention(unet)
    ema = _unet_for(base, config, name, seed).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    run = unet_run(Path(out_dir) / name, f"unet/{name}", unet, ema, opt, config, seed)
    saved = run.resume()
    init_from = saved.get("init_from") if saved is not None else None
    # A continuation starts from the model itself, even one that first started from another's shipped weights.
    shipped_parent = (name if from_shipped else None) or FROM_SHIPPED.get(name) or (INIT_FROM.get(name) if rebase else None)
    if saved is None and shipped_parent is not None and steps > 0:
        start_weights, init_from = _shipped_start(shipped_parent)
        unet.load_state_dict(start_weights)
        ema.load_state_dict(start_weights)
    elif saved is None and name in INIT_FROM and steps > 0:
        start_weights, init_from = _finetune_start(out_dir, name, config)
        unet.load_state_dict(start_weights)
        ema.load_state_dict(start_weights)
    data = prepare_data(out_dir, name, base, config, seed)  # after the fine-tune check: fail before rendering
    start = run.step
    run.train(
        _denoising_loss(run.model, base, data, config),
        steps,
        lr=lambda s: config.lr * _lr_factor(s, config.warmup),
        max_grad_norm=1.0,
        after_step=_ema_update(out_dir, name, unet, ema, config, snapshot=init_from is None or init_from.get("weights") is None),
        meta={"init_from": init_from},
        progress=progress,
        desc=name,
    )
    summary = _summary(out_dir, name)
    if start < steps or not (Path(out_dir) / name / "pipeline" / "model_index.json").exists():
        export(out_dir, name, base=base, config=config, seed=seed)
    return summary


def _summary(out_dir: str | Path, name: str) -> dict[str, Any]:
    """Steps, minutes and final loss (mean of the last 200 steps' log rows) of ``name``'s checkpoint."""
    folder = Path(out_dir) / name
    info = checkpoint_info(folder / CHECKPOINT)
    tail = read_log(folder / LOSS_LOG, info["step"])[-8:]
    final = float(np.mean([float(r["loss"]) for r in tail])) if tail else float("nan")
    init_from = info["meta"].get("init_from")
    # A continued model's own steps add to those it started from; a fine-tune's do not (another model's).
    total = info["step"] + (init_from["step"] if init_from and init_from["model"] == name else 0)
    return {
        "model": name,
        "steps": info["step"],
        "total_steps": total,
        "minutes": round(info["elapsed"] / 60, 1),
        "final_loss": round(final, 4),
        "init_from": init_from,
    }


def build_pipeline(base: Base, unet: Any):
    """A StableDiffusionPipeline of the shared components and ``unet``."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export(
    out_dir: str | Path, name: str, *, base: Base | None = None, config: TrainConfig | None = None, seed: int | None = None
) -> Path:
    """Write ``out_dir/name/pipeline`` from the last checkpoint: EMA UNet + shared parts, fp32.

    Works on an unfinished run too (what a time-limited run ships).
    """
    out_dir = Path(out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    seed = saved["seed"] if seed is None else seed
    config = config or TrainConfig(**{f.name: saved[f.name] for f in dataclass_fields(TrainConfig) if f.name in saved})
    base = base or prepare_base(out_dir, config, seed, progress=False)
    unet = _unet_for(base, config, name, seed)
    unet.load_state_dict(load_checkpoint(out_dir / name / CHECKPOINT).modules["ema"])
    folder = out_dir / name / "pipeline"
    build_pipeline(base, unet.eval()).save_pretrained(folder, safe_serialization=True)
    info = {**_summary(out_dir, name), "data": distribution(name).name, "seed": seed, "config": asdict(config), "base": base.info}
    (folder / "training.json").write_text(json.dumps(info, indent=2))
    return folder


def install(out_dir: str | Path, models: Sequence[str] | None = None, dest: str | Path | None = None) -> list[str]:
    """Copy the models of ``out_dir`` into the package weights folder as fp16 pipelines.

    Each model is exported from its last checkpoint first when its pipeline folder is older, so
    an interrupted run installs what it has. Returns the names installed. ``dest`` defaults to
    ``multifusion/zoo/weights``.
    """
    from diffusers import StableDiffusionPipeline

    from multifusion.loading import zoo_root

    dest = Path(dest) if dest is not None else zoo_root()
    pipes = {}
    for name in models or MODELS:
        run = Path(out_dir) / name
        if not (run / CHECKPOINT).exists():
            continue
        info = run / "pipeline" / "training.json"
        if not info.exists() or json.loads(info.read_text())["steps"] != _summary(out_dir, name)["steps"]:
            export(out_dir, name)
        pipes[name] = StableDiffusionPipeline.from_pretrained(
            run / "pipeline", safety_checker=None, feature_extractor=None, requires_safety_checker=False, use_safetensors=True
        ).to(torch.float16)
    if pipes:
        _check_one_vae(next(iter(pipes.values())).vae, dest, set(pipes), out_dir)
    for name, pipe in pipes.items():
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        pipe.save_pretrained(target, safe_serialization=True)
        shutil.copy(Path(out_dir) / name / "pipeline" / "training.json", target / "training.json")
        _drop_local_paths(target)
    return list(pipes)


def _check_one_vae(vae: Any, dest: Path, installing: set[str], out_dir: str | Path) -> None:
    """Refuse, before anything is written, a run whose VAE is not the one the zoo models under
    ``dest`` that stay installed share: the zoo decodes every model with one VAE (the apps fuse
    latents, and the judge's reconstructed rows assume it), and a run folder made before a new
    decoder (`zoo decoder --install`) still holds the old one."""
    from diffusers import AutoencoderKL

    from multifusion.loading import same_module

    differ = [
        folder.parent.name
        for folder in sorted(dest.glob("*/vae"))
        if folder.parent.name not in installing
        and not same_module(vae, AutoencoderKL.from_pretrained(folder, use_safetensors=True, torch_dtype=vae.dtype))
    ]
    if differ:
        raise ZooTrainError(
            f"the VAE of the models in {out_dir} differs from the one {differ} under {dest} use (the zoo "
            f"shares one VAE): install {differ} from this run as well, or train these models in a new run "
            "folder with `zoo train --from-shipped` or `--rebase` (such a run copies the installed VAE)"
        )


def _drop_local_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` (the run folder on the training machine) from shipped configs."""
    for cfg in folder.rglob("*.json"):
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _resolve_steps(models: Sequence[str], steps: int | Mapping[str, int] | None) -> dict[str, int]:
    out = {}
    for m in models:
        n = DEFAULT_STEPS[m] if steps is None else (steps[m] if isinstance(steps, Mapping) else steps)
        if not isinstance(n, int) or n < 0:
            raise ZooTrainError(f"steps={n!r} for {m!r} must be a non-negative int")
        out[m] = n
    return out


def _check_parents_reach_snapshot(out_dir: Path, per_model: Mapping[str, int], config: TrainConfig) -> None:
    """Refuse, before any training, a request whose fine-tunes could not start.

    Only when the parent is trained in the same request: a parent left out may be trained by
    another process right now, so that case is left to the wait in :func:`_finetune_start`.
    """
    for name, n in per_model.items():
        parent = INIT_FROM.get(name)
        if parent not in per_model or n == 0 or (out_dir / name / CHECKPOINT).exists():
            continue
        if (
            per_model[parent] < config.finetune_from_step
            and not snapshot_path(out_dir, parent, config.finetune_from_step).exists()
        ):
            raise ZooTrainError(
                f"{name!r} starts from {parent!r} at step {config.finetune_from_step} (finetune_from_step), "
                f"but {parent!r} would only be trained to {per_model[parent]} steps: give {parent!r} at least "
                f"{config.finetune_from_step} steps (its default is {DEFAULT_STEPS[parent]}) or leave {name!r} out"
            )


def train_zoo(
    out_dir: str | Path,
    models: Sequence[str] | None = None,
    steps: int | Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int = 1,
    config: TrainConfig | None = None,
    from_shipped: bool = False,
    rebase: bool = False,
) -> list[dict[str, Any]]:
    """Train the zoo models ``models`` (default: all, in priority order) in ``out_dir``.

    ``steps`` (an int for every model, or per model) defaults to :data:`DEFAULT_STEPS`; running
    again with more steps continues from the last checkpoint. Fine-tunes start from their
    parent's EMA at ``config.finetune_from_step``, however far the parent has got. Deterministic
    for a given ``seed`` and ``threads`` (other thread counts reorder float sums). Returns one
    summary per model.

    ``from_shipped`` continues the shipped models instead: each starts from its own shipped
    weights and trains ``steps`` more, on the shipped tokenizer, text encoder and VAE (shared by
    every zoo model, so any run folder of shipped starts can hold them all).

    ``rebase`` starts the fine-tunes (:data:`INIT_FROM`) from their parent's shipped weights, on
    the same shipped parts: how the fine-tunes follow a continued ``general`` once it is installed.
    """
    models = list(MODELS if models is None else models)
    for m in models:
        distribution(m)  # validates the name
    per_model = _resolve_steps(models, steps)
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    fine_tunes = [*INIT_FROM, *FROM_SHIPPED]
    if rebase and (from_shipped or any(m not in fine_tunes for m in models)):
        not_fine_tunes = [m for m in models if m not in fine_tunes]
        raise ZooTrainError(
            f"rebase starts fine-tunes from their parent's shipped weights: {not_fine_tunes or 'from_shipped'} "
            f"cannot be rebased; give only fine-tunes (--models {','.join(fine_tunes)}) and not from_shipped"
        )
    if not (from_shipped or rebase):
        _check_parents_reach_snapshot(out_dir, per_model, config)
    shipped = {FROM_SHIPPED[m] for m in models if m in FROM_SHIPPED}
    if from_shipped or rebase:
        shipped = {"general"}  # the shared parts are byte-identical across the zoo (a test checks it)
    elif shipped and (len(shipped) > 1 or any(m not in FROM_SHIPPED for m in models)):
        raise ZooTrainError(
            f"{sorted(m for m in models if m in FROM_SHIPPED)} start from shipped weights and share their base: "
            f"train them alone, one parent per run folder (--models {','.join(m for m in models if m in FROM_SHIPPED)})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({**asdict(config), "seed": seed}, indent=2))
    torch.set_num_threads(threads)
    if shipped:
        base_from_shipped(out_dir, next(iter(shipped)))
    base = prepare_base(out_dir, config, seed, progress)
    return shared_work(
        out_dir, models, lambda m: train_model(out_dir, m, base, config, per_model[m], seed, progress, from_shipped, rebase)
    )


def shared_work(
    out_dir: Path, names: Sequence[str], train: Callable[[str], dict[str, Any]], prefix: str = ""
) -> list[dict[str, Any]]:
    """``train(name)`` for each of ``names``, shared with other processes on ``out_dir``: each
    process takes the first name no other is training (a file lock ``PREFIXname.lock``), then
    waits for the rest (e.g. two processes with threads=1 on 2 cores). Returns the summaries in order."""
    summaries: dict[str, dict[str, Any]] = {}
    for blocking in (False, True):
        for m in names:
            if m in summaries:
                continue
            with _locked(out_dir / f"{prefix}{m}.lock", blocking) as got:
                if got:
                    summaries[m] = train(m)
    return [summaries[m] for m in names]
