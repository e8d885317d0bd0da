"""Train AFA's aggregators over N frozen models (paper Sec. 3.3; Tenvence/afa `train.py`).

UNets, text encoders and VAE are frozen; only the aggregators learn. Each step: a batch of
images encoded by the first model's VAE (posterior sample, scaled), uniform timesteps, eps (or v,
for v-prediction models) MSE of the ensemble's prediction; each model embeds the captions with
its own text encoder; captions dropped to "" with probability `prompt_dropout` so CFG works.
AdamW (lr 1e-4, weight decay 0.01), linear warm-up over 100 steps, then constant.

Runs on `multifusion.training.TrainingRun`: checkpoints every `checkpoint_every` steps and
exact resume (step s draws only from its own generator), a progress bar, `loss.csv`, and at the
end `loss.png`, `afa.json` (the run's settings and, under `heldout`, the held-out eps-MSE per
timestep band for the ensemble, the untrained ensemble (feature averaging), each model alone and
their eps average) and
`aggregator/` (the aggregators with the models' content hashes; what `afa` loads).

Data: `shapeworld:NAME` renders a zoo distribution (`multifusion.zoo.train.distribution`: a
render distribution or a zoo model's own data, e.g. `slice0`); a JSONL file of
`{"file_name": ..., "text": ...}` rows (paths relative to the file), or a folder holding such a
`metadata.jsonl` (the Hugging Face imagefolder layout).

Deviations from the authors: a fixed number of steps on one CPU process (they train for epochs
on 8 GPUs); batches drawn with replacement from a fixed rendered set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from multifusion.errors import MultifusionError, clip
from multifusion.features.ensemble import (
    check_aggregators_fit,
    ensemble_kwargs,
    join_conditionings,
    model_hash,
    split_conditioning,
)
from multifusion.features.walkers import build_ensemble, fresh_aggregators
from multifusion.handles import Conditioning, ModelHandle
from multifusion.io import atomic_dir, write_text
from multifusion.training import CHECKPOINT, LOSS_LOG, TrainingRun, read_log, save_tensors

BANDS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))
"""Timestep bands of the held-out loss (training timesteps, [lo, hi))."""


class AFATrainError(MultifusionError):
    """An AFA training request that cannot run (bad data, a run folder of other models)."""


@dataclass(frozen=True)
class AFATrainConfig:
    """Every setting of an aggregator training run (stored in each checkpoint and `afa.json`)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100
    prompt_dropout: float = 0.1
    width: int | None = None  # None: `ensemble.default_width` (~6 % of one UNet)
    layers: int = 1  # transformer layers per aggregator (the authors' released code builds 2 for SD-1.5)
    dataset_size: int = 4000  # shapeworld renders
    heldout_size: int = 128
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "dataset_size", "heldout_size", "checkpoint_every", "log_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < (0 if key == "steps" else 1):
                raise AFATrainError(f"{key}={v!r} must be a positive int")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise AFATrainError(f"prompt_dropout={self.prompt_dropout!r} must lie in [0, 1)")
        for key in ("lr", "weight_decay"):
            v = getattr(self, key)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (key == "lr" and v == 0)
            ):
                what = "a finite number > 0 (e.g. 1e-4)" if key == "lr" else "a finite number >= 0"
                raise AFATrainError(f"{key}={v!r} (--{key.replace('_', '-')}) must be {what}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1):
            raise AFATrainError(f"width={self.width!r} (--width) must be a positive int (or leave it out for the default)")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise AFATrainError(
                f"layers={self.layers!r} (--layers) must be a positive int: the transformer layers per aggregator (1 or 2)"
            )
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise AFATrainError(f"warmup={self.warmup!r} must be a positive int")


# --------------------------------------------------------------------------- data


def read_data(spec: str, size: int, n: int, seed: int, heldout: int) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """(train images (n, H, W, 3) uint8, captions, held-out images, captions) of `spec`, at
    `size` x `size` pixels (the models' canvas). A JSONL data set holds out its last rows:
    `heldout` of them, at most a tenth."""
    if spec.startswith("shapeworld:"):
        from multifusion.zoo import render
        from multifusion.zoo.train import distribution

        dist = distribution(spec.split(":", 1)[1])
        train, held = render.make_dataset(dist, n, seed), render.make_dataset(dist, heldout, seed, start=n)
        if train.images.shape[1] != size:
            raise AFATrainError(f"--data {spec}: renders are {train.images.shape[1]} px, the models draw {size} px")
        return train.images, train.captions, held.images, held.captions
    from PIL import Image

    rows = data_rows(spec)
    heldout = min(heldout, max(1, len(rows) // 10))  # at most a tenth of a small data set
    images, captions = [], []
    for file, text in rows:
        with Image.open(file) as im:
            images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)))
        captions.append(text)
    arr = np.stack(images)
    return arr[:-heldout], captions[:-heldout], arr[-heldout:], captions[-heldout:]


def data_rows(spec: str) -> list[tuple[Path, str]]:
    """(image file, caption) of every row of a JSONL data set (`read_data`), each checked: the
    file UTF-8, each line a JSON object with `file_name` and `text`, each file inside the data
    folder (a path out of it is refused, never opened) and a whole image. AFATrainError naming
    --data, the file and the line; run before any model loads."""
    from multifusion.io import image_is_whole

    path = Path(spec)
    jsonl = path / "metadata.jsonl" if path.is_dir() else path
    if not jsonl.is_file():
        raise AFATrainError(f"--data {spec}: no such JSONL file or folder with metadata.jsonl (or use shapeworld:NAME)")
    try:
        text = jsonl.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AFATrainError(
            f"--data {spec}: {str(jsonl)!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    root = jsonl.parent.resolve()
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        where = f"--data {spec}: {str(jsonl)!r} line {i + 1}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise AFATrainError(
                f"{where} is not JSON ({type(err).__name__}: {clip(str(err))}); each line is one object "
                '{"file_name": ..., "text": ...}'
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or "text" not in row:
            raise AFATrainError(f"{where}: each line needs an object with 'file_name' (a string) and 'text', got {clip(line)}")
        file = (root / row["file_name"]).resolve()
        if not file.is_relative_to(root):
            raise AFATrainError(
                f"{where}: file_name {clip(row['file_name'])!r} lies outside the data folder {str(root)!r}; "
                "give paths inside it (relative to the JSONL file)"
            )
        if not file.is_file():
            raise AFATrainError(
                f"{where}: file_name {clip(row['file_name'])!r} does not exist (paths are relative to the JSONL file)"
            )
        if not image_is_whole(file):
            raise AFATrainError(
                f"{where}: file_name {clip(row['file_name'])!r} is not an image PIL can read (or it is damaged); "
                "give PNG or JPEG files"
            )
        rows.append((file, str(row["text"])))
    if len(rows) < 2:
        raise AFATrainError(f"--data {spec}: {len(rows)} example(s); need at least 2 (one is held out)")
    return rows


DATA_CACHE = "data.safetensors"
"""The run folder's cache of the encoded data set (its own `data` field says which)."""


def check_run(data: str, out: str | Path, config: AFATrainConfig) -> None:
    """Everything about a training request checkable without the models, run before they load:
    the data (`shapeworld:NAME` known, or every JSONL row and image), and a run folder's
    checkpoint, data cache and loss log readable and of this data and settings. AFATrainError
    (or CheckpointError) naming the option or file."""
    from multifusion.training import checkpoint_info

    if data.startswith("shapeworld:"):
        from multifusion.zoo.train import distribution

        try:
            distribution(data.split(":", 1)[1])
        except (KeyError, ValueError) as err:
            raise AFATrainError(f"--data {data}: {clip(str(err))}") from None
    else:
        data_rows(data)
    out = Path(out)
    settings = {k: v for k, v in asdict(config).items() if k != "steps"}
    if (out / CHECKPOINT).is_file():
        saved = checkpoint_info(out / CHECKPOINT)["meta"]
        if not isinstance(saved, dict) or saved.get("data") != data or saved_settings(saved) != settings:
            raise AFATrainError(
                f"--out: {out / CHECKPOINT} is a run of other data or settings; give another --out or delete that folder"
            )
    if (out / DATA_CACHE).is_file():
        _check_cache(out / DATA_CACHE, data, load=False)
    read_log(out / LOSS_LOG, 2**62)  # a damaged log is named now, not after the models load


LATER_SETTINGS = {"layers": 1}
"""Settings added after runs were first saved, with the value those runs used."""


def saved_settings(meta: dict) -> Any:
    """A saved run's settings, the later settings filled in with what runs before them used."""
    saved = meta.get("config")
    return {**LATER_SETTINGS, **saved} if isinstance(saved, dict) else saved


def _check_cache(path: Path, data: str, *, load: bool = True):
    """The cache's tensors and info when it holds `data` (AFATrainError otherwise)."""
    from multifusion.training import CheckpointError, file_info, load_tensors

    try:
        tensors, info = load_tensors(path) if load else ({}, file_info(path))
    except CheckpointError as err:
        raise AFATrainError(f"--out: the data cache is unreadable ({err})") from None
    if (
        not isinstance(info, dict)
        or info.get("data") != data
        or not isinstance(info.get("captions"), list)
        or not isinstance(info.get("held_captions"), list)
    ):
        have = info.get("data") if isinstance(info, dict) else None
        raise AFATrainError(
            f"--out: {str(path)!r} caches the data {clip(repr(have))}, not --data {data!r}; give another --out, "
            "or delete that file to encode this data"
        )
    return tensors, info


@torch.no_grad()
def encode_images(vae: Any, images: np.ndarray, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of uint8 images (N, H, W, 3): two (N, C, h, w) float32."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        dist = vae.encode(x.to(vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class _Texts:
    """Each model's own conditioning of captions, shared encoders run once, joined as the
    ensemble takes it (`join_conditionings`: embeds (B, N*L, D), extras side by side). A dropped
    caption is the model's unconditional input at sampling time: "" encoded, or zeros where the
    family zeroes empty prompts (SDXL's `force_zeros_for_empty_prompt`)."""

    def __init__(self, handles: Sequence[ModelHandle], captions: Sequence[str]):
        self.handles = list(handles)
        self.captions = list(captions)

    @torch.no_grad()
    def embed(self, idx: torch.Tensor, drop: torch.Tensor | None = None) -> Conditioning:
        prompts = ["" if drop is not None and bool(drop[j]) else self.captions[i] for j, i in enumerate(idx.tolist())]
        done: dict[tuple, Conditioning] = {}
        parts = []
        for h in self.handles:
            key = (type(h), id(h.tokenizer), tuple(id(m) for k, m in h.modules().items() if k.startswith("text_encoder")))
            if key not in done:
                cond = h.encode_prompt(prompts)
                if drop is not None and bool(drop.any()):
                    uncond = h.encode_negative([""] * len(prompts), cond)

                    def pick(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                        return torch.where(drop.to(c.device).view(-1, *[1] * (c.ndim - 1)), u, c)

                    cond = Conditioning(
                        pick(uncond.embeds, cond.embeds), {k: pick(uncond.extra[k], v) for k, v in cond.extra.items()}
                    )
                done[key] = Conditioning(cond.embeds.float(), {k: v.float() for k, v in cond.extra.items()})
            parts.append(done[key])
        return join_conditionings(parts, [h.name for h in self.handles])


def _added(handles: Sequence[ModelHandle], x_t: torch.Tensor, cond: Conditioning) -> dict[str, Any]:
    """The ensemble's added conditioning (SDXL: pooled text and time ids) in the models' dtype."""
    kwargs = ensemble_kwargs(handles, x_t, cond, x_t.device)
    return {k: {n: v.to(handles[0].dtype) for n, v in d.items()} for k, d in kwargs.items()}


def predict(
    handles: Sequence[ModelHandle], denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The raw prediction (B, C, h, w) of `denoiser` (an ensemble of `handles`' denoisers, or one
    of them with its own `cond`) at x_t, integer timesteps t (B,), called as the models' family
    calls it (`raw_prediction`; SDXL's added conditioning through `denoiser_kwargs`)."""
    return handles[0].raw_prediction(denoiser, x_t, t, cond, _added(handles, x_t, cond))


# --------------------------------------------------------------------------- training


def train_afa(
    handles: Sequence[ModelHandle],
    data: str,
    out: str | Path,
    config: AFATrainConfig = AFATrainConfig(),
    *,
    progress: bool = True,
    stop: int | None = None,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Train (or resume training) aggregators over `handles` (in this order) on `data`; writes
    the run into `out` (module docstring). `stop` ends this call early (checkpointed there), as
    a killed process would. Returns the summary also written to `out/afa.json`."""
    out = Path(out)
    unets = [h.unet for h in handles]
    labels = [h.name for h in handles]
    hashes = [model_hash(h) for h in handles]
    for h in handles:
        for module in h.modules().values():
            module.eval().requires_grad_(False)
    if len({h.prediction_type for h in handles}) != 1:
        raise AFATrainError(
            f"the models predict different things ({', '.join(f'{h.name}: {h.prediction_type}' for h in handles)})"
        )
    torch.manual_seed(config.seed)  # the aggregators' initialisation (conv_out aside: zero)
    aggregators = fresh_aggregators(unets, hashes, labels, config.width, config.layers)
    ensemble = build_ensemble(unets, aggregators, labels)
    opt = torch.optim.AdamW(aggregators.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    run = TrainingRun(
        out,
        "afa",
        aggregators,
        opt,
        seed=config.seed,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        accelerator=accelerator,
    )
    settings = {k: v for k, v in asdict(config).items() if k != "steps"}  # more steps may continue a run
    meta = {"models": hashes, "labels": labels, "data": data, "config": settings}
    saved = run.resume()
    if saved is not None and (saved.get("models") != hashes or saved.get("data") != data or saved_settings(saved) != settings):
        raise AFATrainError(
            f"{out / CHECKPOINT} is a run of other models, data or settings ({saved.get('labels')}, {saved.get('data')}); "
            "give another --out or delete that folder"
        )

    first = handles[0]
    size = int(first.unet.config.sample_size) * first.vae_scale_factor
    cache = out / DATA_CACHE
    if cache.exists():
        tensors, info = _check_cache(cache, data)  # the cache of another --data is never trained on
        captions, held_captions = info["captions"], info["held_captions"]
    else:
        images, captions, held, held_captions = read_data(data, size, config.dataset_size, config.seed, config.heldout_size)
        mean, std = encode_images(first.vae, images)
        hmean, hstd = encode_images(first.vae, held)
        tensors = {"mean": mean, "std": std, "held_mean": hmean, "held_std": hstd}
        save_tensors(cache, tensors, {"captions": captions, "held_captions": held_captions, "data": data})
    texts = _Texts(handles, captions)
    alphas = first.alphas_cumprod.float()
    n_data = tensors["mean"].shape[0]

    def step(_: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        b = config.batch_size
        idx = torch.randint(0, n_data, (b,), generator=g)
        mean, std = tensors["mean"][idx], tensors["std"][idx]
        x0 = _scaled(first, mean + std * torch.randn(mean.shape, generator=g))  # (B, C, h, w)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (b,), generator=g)
        drop = torch.rand(b, generator=g) < config.prompt_dropout
        cond = texts.embed(idx, drop)  # embeds (B, N*L, D)
        x_t, target = first.noised(x0, noise, t)
        return {"loss": F.mse_loss(predict(handles, ensemble, x_t, t, cond).float(), target)}

    run.train(
        step,
        config.steps,
        lr=lambda s: config.lr * min(1.0, (s + 1) / config.warmup),
        meta=meta,
        stop=stop,
        progress=progress,
        desc="afa",
    )
    summary: dict[str, Any] = {
        "models": labels,
        "hashes": hashes,
        "data": data,
        "steps": run.step,
        "config": asdict(config),
        "minutes": round(run.elapsed / 60, 1),
        "aggregator_parameters": sum(p.numel() for p in aggregators.parameters()),
        "unet_parameters": sum(p.numel() for p in unets[0].parameters()),
    }
    if run.step < config.steps:
        return summary
    rows = read_log(out / LOSS_LOG, run.step)
    tail = rows[-max(1, len(rows) // 10) :]
    summary["final_loss"] = round(float(np.mean([float(r["loss"]) for r in tail])), 5)
    with atomic_dir(out / "aggregator") as tmp:  # a link planted at aggregator/ is replaced, not followed
        aggregators.save_pretrained(tmp, safe_serialization=True)
    ensemble.eval()
    summary["heldout"] = heldout_losses(handles, ensemble, tensors["held_mean"], tensors["held_std"], held_captions, config.seed)
    from multifusion.zoo.evaluate import loss_plot

    loss_plot({"afa": [(int(r["step"]), float(r["loss"])) for r in rows]}, out / "loss.png", smooth=4)
    write_text(out / "afa.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _scaled(handle: ModelHandle, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the denoiser sees them: (z - shift) * scaling (shift 0 but for SD3/FLUX)."""
    return (latents - handle.shift_factor) * handle.scaling_factor


@torch.no_grad()
def heldout_losses(
    handles: Sequence[ModelHandle],
    ensemble: torch.nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    captions: Sequence[str],
    seed: int,
    batch: int = 64,
) -> dict[str, dict[str, float]]:
    """Held-out eps-MSE per timestep band (`BANDS`): the trained ensemble (`afa`), the untrained
    one (`feature average`), each model alone and the mean of their predictions (`eps average`),
    on the same latents, noise and timesteps (drawn from `seed`), captions kept."""
    first = handles[0]
    g = torch.Generator().manual_seed(seed + 12345)
    texts = _Texts(handles, captions)
    denoisers = ensemble.denoisers
    plain = build_ensemble(
        denoisers,
        fresh_aggregators(
            denoisers,
            ensemble.aggregators.config.models,
            ensemble.aggregators.config.labels,
            ensemble.aggregators.config.width,
            ensemble.aggregators.config.layers,
        ),
    )
    n_models, names = len(handles), [h.name for h in handles]
    sums: dict[str, dict[str, float]] = {}
    for lo, hi in BANDS:
        band = f"{lo}-{hi}"
        totals = {k: 0.0 for k in ["afa", "feature average", *names, "eps average"]}
        for i in range(0, len(mean), batch):
            m, s = mean[i : i + batch], std[i : i + batch]
            x0 = _scaled(first, m + s * torch.randn(m.shape, generator=g))
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(lo, hi, (len(m),), generator=g)
            x_t, target = first.noised(x0, noise, t)
            cond = texts.embed(torch.arange(i, i + len(m)))
            preds = {"afa": predict(handles, ensemble, x_t, t, cond), "feature average": predict(handles, plain, x_t, t, cond)}
            singles = [predict([h], h.unet, x_t, t, c) for h, c in zip(handles, split_conditioning(cond, n_models))]
            preds.update(zip(names, singles))
            preds["eps average"] = torch.stack(singles).mean(0)
            for k, p in preds.items():
                totals[k] += F.mse_loss(p.float(), target, reduction="sum").item()
        count = mean[0].numel() * len(mean)
        sums[band] = {k: round(v / count, 5) for k, v in totals.items()}
    return sums


def load_trained(path: str | Path, handles: Sequence[ModelHandle], dtype: torch.dtype = torch.float32):
    """The aggregators in `path` (an `aggregator/` folder or a run folder holding one), checked
    against `handles` (their content hashes and order, the UNet configuration)."""
    from multifusion.features.afa import AFAAggregators

    path = Path(path)
    if (path / "aggregator" / "config.json").exists():
        path = path / "aggregator"
    if not (path / "config.json").exists():
        raise AFATrainError(f"{path}: no trained aggregators here (expected config.json and diffusion_pytorch_model.safetensors)")
    aggregators = AFAAggregators.from_pretrained(path, use_safetensors=True, torch_dtype=dtype).eval().requires_grad_(False)
    check_aggregators_fit(
        aggregators,
        [h.unet for h in handles],
        [model_hash(h) for h in handles],
        [h.name for h in handles],
        where=f"the aggregators in {path}",
    )
    return aggregators
