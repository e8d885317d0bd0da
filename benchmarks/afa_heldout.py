"""Held-out eps-MSE of the shipped aggregators (zoo:afa-slices) recomputed as their training run
computed it (docs/afa.md: 128 renders of `general`, examples 4,000-4,127 of seed 0, the same
latents, noise and timesteps for every row), once with `SABW.forward` and once with the diffusers
modules' own forwards, beside the figures the training run recorded (`training.json`).

    python benchmarks/afa_heldout.py
"""

from __future__ import annotations

import json

import torch

from multifusion.features import afa
from multifusion.features.afa import SABW, stack_models
from multifusion.features.train import encode_images, heldout_losses, load_trained
from multifusion.features.walkers import build_ensemble
from multifusion.loading import load_models, zoo_root
from multifusion.zoo import render
from multifusion.zoo.train import distribution


def modules_forward(point: SABW, features: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The aggregator through the diffusers modules' own forwards."""
    h = point.resnet(point.conv_in(stack_models(features)), temb)
    return point.conv_out(point.transformer(h, encoder_hidden_states=context, return_dict=False)[0])


def main() -> None:
    folder = zoo_root() / "afa-slices"
    recorded = json.loads((folder / "training.json").read_text())
    cfg = recorded["config"]
    handles = load_models(recorded["models"], names=recorded["models"])
    ensemble = build_ensemble([h.unet for h in handles], load_trained(folder, handles)).eval()
    held = render.make_dataset(
        distribution(recorded["data"].split(":", 1)[1]), cfg["heldout_size"], cfg["seed"], start=cfg["dataset_size"]
    )
    mean, std = encode_images(handles[0].vae, held.images)
    rows = {"SABW.forward": heldout_losses(handles, ensemble, mean, std, held.captions, cfg["seed"])}
    lean = SABW.forward
    afa.SABW.forward = modules_forward
    try:
        rows["diffusers modules"] = heldout_losses(handles, ensemble, mean, std, held.captions, cfg["seed"])
    finally:
        afa.SABW.forward = lean
    print(
        f"{'timesteps':>10s} {'SABW.forward':>13s} {'modules':>9s} {'recorded':>9s}   (afa rows; feature average, models alone, eps average equal by construction)"
    )
    for band, want in recorded["heldout"].items():
        a, b = rows["SABW.forward"][band], rows["diffusers modules"][band]
        print(f"{band:>10s} {a['afa']:13.5f} {b['afa']:9.5f} {want['afa']:9.5f}")
        assert a.keys() == want.keys()
    print("every row:", json.dumps(rows["SABW.forward"]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
