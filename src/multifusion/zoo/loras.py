"""The zoo's LoRAs: low-rank adapters of the shipped ``general``, trained through the one loop.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685: a frozen
weight W is used as W + (alpha / r) B A with A (r x in) and B (out x r) trained, B starting at
zero, so training starts from the base model exactly. Convolutions take A as an r-channel
convolution of the layer's kernel and B as a 1x1 convolution (peft's Conv2d LoRA, what kohya's
"LoCon" files and diffusers' loader hold).

Each zoo LoRA is trained on the shipped ``general`` (fp16 weights upcast to float32, frozen) with
the zoo's recipe (:mod:`multifusion.zoo.train`: eps MSE at uniform timesteps, 10 % of captions
dropped, AdamW with warm-up, an EMA of the trained weights, which is what ships) on one
ShapeWorld distribution, through :class:`multifusion.training.TrainingRun` (resumable, exact),
and written as a LoRA file in peft's key layout under ``unet.`` (what ``extract-lora`` writes),
so ``load_lora_weights`` reads it as it reads a LoRA from the Hub. The adapters cover every
layer a full fine-tune changes where a LoRA can: the attention projections, feed-forward and
projection layers of the transformer blocks and the ResNet convolutions (the zoo's textures
have a period of two latent pixels, which only the 16x16 layers can draw, and the zoo's UNet
has attention at 8x8 and coarser only). Installed as ``weights/loras/NAME.safetensors`` with
``NAME.json`` (its training record); a recipe names one as ``loras: [{path: "zoo:NAME"}]``.

Command line::

    multifusion zoo train-lora --out runs/loras --loras texture,cartoon --install
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from multifusion.training import CHECKPOINT, load_checkpoint
from multifusion.zoo.train import (
    TrainConfig,
    ZooTrainError,
    _denoising_loss,
    _ema_update,
    _lr_factor,
    _shipped_start,
    _summary,
    _unet_for,
    base_from_shipped,
    prepare_base,
    prepare_data,
    shared_work,
    unet_run,
)

TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
)
"""Module names (suffixes) the zoo's LoRAs adapt: every Linear of the transformer blocks and
every ResNet convolution. Not the time embedding, the in/out convolutions or the resamplers."""


@dataclass(frozen=True)
class LoraPlan:
    """One zoo LoRA: the distribution it learns, the shipped model it adapts, rank and steps."""

    data: str
    parent: str = "general"
    rank: int = 8
    steps: int = 1000
    lr: float = 1e-3


LORAS: dict[str, LoraPlan] = {
    "texture": LoraPlan("expert"),
    "striped": LoraPlan("striped"),
    "dotted": LoraPlan("dotted"),
    "cartoon": LoraPlan("cartoon"),
}
"""The zoo's LoRAs. ``texture`` learns the expert's data (one textured object on the plain
backdrop) and stands in for the expert; ``cartoon`` learns the cartoon model's data; ``striped``
and ``dotted`` learn photos of scenes with one object of that texture, so that each LoRA of the
``multi-lora`` apps adds one element (a texture, a style) that the others cannot draw, in the
scenes the app asks for. (Trained first on the expert's plain-backdrop data, one texture each,
they drew no texture at all when the prompt named a scene: 0 of 304 images.)"""


def _check(names: list[str]) -> None:
    for n in names:
        if n not in LORAS:
            from multifusion.errors import did_you_mean

            raise ZooTrainError(f"unknown zoo LoRA {n!r} (zoo LoRAs: {', '.join(LORAS)}){did_you_mean(n, LORAS)}")


def adapt(unet: Any, plan: LoraPlan, seed: int) -> Any:
    """Inject a fresh LoRA of ``plan``'s rank (alpha = rank, so its scale is 1) into ``unet``;
    freeze everything else. A is drawn from ``seed`` (peft's default init), B is zero."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=plan.rank, lora_alpha=plan.rank, target_modules=list(TARGETS), init_lora_weights=True))
    return unet


def lora_tensors(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter of a peft-injected ``unet`` as a LoRA file holds it: peft's key layout
    (``lora_A`` / ``lora_B``) under ``unet.``, which diffusers' loader reads as it is."""
    from peft.utils import get_peft_model_state_dict

    return {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}


def run_folder(name: str) -> str:
    """The folder of LoRA ``name`` in a run folder (beside the data caches, named by distribution)."""
    return f"lora-{name}"


def train_lora(
    out_dir: str | Path,
    name: str,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train (or continue) zoo LoRA ``name`` in ``out_dir/lora-name`` to ``steps`` steps (default:
    its plan's); export its EMA there (:func:`export_lora`). Returns its summary. ``config``: the
    zoo's training settings (batch, data set size, warm-up, EMA, checkpoints); the learning rate
    is the plan's."""
    _check([name])
    plan = LORAS[name]
    steps = plan.steps if steps is None else steps
    config = replace(config or TrainConfig(), lr=plan.lr)
    out_dir = Path(out_dir)
    base_from_shipped(out_dir, plan.parent)
    base = prepare_base(out_dir, config, seed, progress=False)
    weights, init_from = _shipped_start(plan.parent)
    unet = _unet_for(base, config, plan.parent, seed)
    unet.load_state_dict(weights)
    ema = _unet_for(base, config, plan.parent, seed)
    ema.load_state_dict(weights)
    adapt(unet, plan, seed)
    adapt(ema, plan, seed)
    ema.load_state_dict(unet.state_dict())
    trained = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=plan.lr, weight_decay=0.0)
    run = unet_run(out_dir / run_folder(name), f"lora/{name}", unet, ema, opt, config, seed)
    run.resume()
    data = prepare_data(out_dir, plan.data, base, config, seed)
    # The EMA of the frozen base weights is the base itself; only the adapters move.
    run.train(
        _denoising_loss(run.model, base, data, config),
        steps,
        lr=lambda s: plan.lr * _lr_factor(s, config.warmup),
        max_grad_norm=1.0,
        after_step=_ema_update(out_dir, run_folder(name), unet, ema, config, snapshot=False),
        meta={"init_from": init_from, "lora": asdict(plan)},
        progress=progress,
        desc=f"lora {name}",
    )
    return export_lora(out_dir, name, config)


def export_lora(out_dir: str | Path, name: str, config: TrainConfig | None = None) -> dict[str, Any]:
    """Write ``out_dir/lora-name/name.safetensors`` (the EMA's adapter, float32, diffusers' layout) and
    ``name.json`` (its training record) from the last checkpoint."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    plan = LORAS[name]
    config = config or TrainConfig()
    base = prepare_base(out_dir, config, 0, progress=False)
    ema = adapt(_unet_for(base, config, plan.parent, 0), plan, 0)
    folder = out_dir / run_folder(name)
    ema.load_state_dict(load_checkpoint(folder / CHECKPOINT).modules["ema"])
    tensors = {k: v.contiguous() for k, v in lora_tensors(ema).items()}
    save_file(tensors, folder / f"{name}.safetensors", metadata={"format": "pt"})
    info = {
        **_summary(out_dir, run_folder(name)),
        "model": name,
        "lora": asdict(plan),
        "config": asdict(config),
        "targets": list(TARGETS),
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    (folder / f"{name}.json").write_text(json.dumps(info, indent=2))
    return info


def install_loras(out_dir: str | Path, names: list[str] | None = None, dest: str | Path | None = None) -> list[str]:
    """Copy the trained LoRAs of ``out_dir`` into the package as fp16 files (with their records)."""
    from safetensors.torch import load_file, save_file

    from multifusion.lora import zoo_lora_root

    dest = Path(dest) if dest is not None else zoo_lora_root()
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names or list(LORAS):
        src = Path(out_dir) / run_folder(name) / f"{name}.safetensors"
        if not src.exists():
            continue
        save_file({k: v.half() for k, v in load_file(src).items()}, dest / f"{name}.safetensors", metadata={"format": "pt"})
        shutil.copy(src.with_suffix(".json"), dest / f"{name}.json")
        done.append(name)
    return done


def train_loras(
    out_dir: str | Path,
    names: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Train the zoo LoRAs ``names`` (default: all). Two processes on one folder share the work
    (file locks, as :func:`multifusion.zoo.train.train_zoo`)."""
    names = list(LORAS if names is None else names)
    _check(names)
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ZooTrainError(f"steps={steps!r} must be a non-negative int")
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return shared_work(out_dir, names, lambda n: train_lora(out_dir, n, steps, seed, progress), prefix="lora-")


STANDS_IN: dict[str, str] = {"texture": "expert", "cartoon": "cartoon"}
"""The full fine-tune each LoRA stands in for in the benchmark apps (trained on the same data)."""


def evaluate_loras(names: list[str] | None = None, n: int = 32, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Each installed zoo LoRA on ``n`` held-out captions of its own data, through
    :func:`multifusion.zoo.evaluate.evaluate_model`, and beside it the full fine-tune it stands in
    for (:data:`STANDS_IN`) on the same captions: rows of ``model``, ``prompts`` and the judge's
    scores (``attr/...``, ``image_success``)."""
    from tqdm.auto import tqdm

    from multifusion.loading import load_models
    from multifusion.lora import zoo_loras
    from multifusion.zoo.evaluate import evaluate_model
    from multifusion.zoo.judge import load_judge

    names = [m for m in (names or list(LORAS)) if m in zoo_loras()]
    judge = load_judge()
    rows = []
    for name in tqdm(names, desc="evaluating zoo LoRAs", disable=not progress):
        plan = LORAS[name]
        (handle,) = load_models([f"zoo:{plan.parent}"], names=[f"{plan.parent}+{name}"], loras=[[{"path": f"zoo:{name}"}]])
        rows.append(evaluate_model(handle, n, seed, prompts=plan.data, judge=judge))
        if name in STANDS_IN:
            rows.append(evaluate_model(STANDS_IN[name], n, seed, prompts=plan.data, judge=judge))
    return rows
