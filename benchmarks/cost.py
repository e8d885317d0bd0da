"""What each method costs at real scale, counted from published configs: FLOPs per image.

Every denoiser (and the VAE decoder) is built on the meta device from its published config
(`multifusion.memory`'s configs; no weights, no memory) and run once under
`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix products and convolutions
(attention included, as the batched products the meta device runs it as); elementwise work
(norms, activations, the fusion maths itself) is not counted. One image costs

    steps x (the denoiser calls of one step) + one VAE decode

with the guidance batch of the model (2 with classifier-free guidance, 1 for FLUX.1, which is
guidance-distilled) and the models' usual step counts. Per method, for N models of one
architecture:

- `single`: one call per step;
- `average` / `snb` of N: N calls per step (SNB's default window is the whole trajectory);
- `mod` on a canvas of 2x (1 x 2 tiles) and 4x (2 x 2 tiles) the native size, the default
  overlap (0): one native-size call per tile per step; beside it one call over the whole canvas
  (`single` at that size: attention grows with the square of the tokens);
- `amdm` of N: N calls per step in its default window (the first tenth of the steps, at least
  one), the specified model alone after it;
- `afa` of N: the ensemble's call (N denoisers and the aggregators at the default width),
  counted the same way; FLUX.1 has no AFA walker.

The zoo's own row is the same count on the zoo's configs; `--measure` times the same runs on
the zoo (interleaved whole runs, decoding included) so the counted ratios can be checked
against measured ones.

    python benchmarks/cost.py [--measure] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from multifusion.families import SDHandle
from multifusion.handles import ModelHandle
from multifusion.loading import zoo_root
from multifusion.memory import FLUX_DEV, PUBLISHED, SD15_UNET, SDXL_VAE, build

SD15_VAE = SDXL_VAE  # the same autoencoder shapes (only the scaling factor differs)
AMDM_WINDOW = 0.1  # latents/methods.py DEFAULT_WINDOW: the first tenth of the trajectory, at least one step


@dataclass(frozen=True)
class Model:
    family: type[ModelHandle]
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    guidance_batch: int  # denoiser inputs per image and call
    text_tokens: int
    side: int  # native image side, pixels
    steps: int  # the pipeline's usual number of steps


def published() -> dict[str, Model]:
    def of(name: str, side: int, steps: int) -> Model:
        p = PUBLISHED[name]
        return Model(p.family, p.denoiser, p.vae, p.guidance_batch, p.text_tokens, side, steps)

    flux = of("FLUX.1 dev", 1024, 28)
    return {
        "SD-1.5": Model(SDHandle, SD15_UNET, SD15_VAE, 2, 77, 512, 50),
        "SDXL": of("SDXL base", 1024, 50),
        "SD3.5 Medium": of("SD3.5 Medium", 1024, 28),
        "SD3.5 Large": of("SD3.5 Large", 1024, 28),
        "FLUX.1 dev": flux,
        # FLUX.1 schnell: dev's transformer without the guidance embedding, 4 steps
        "FLUX.1 schnell": replace(flux, denoiser={**FLUX_DEV, "guidance_embeds": False}, steps=4),
    }


def zoo() -> Model:
    folder = zoo_root() / "general"

    def read(part: str) -> dict[str, Any]:
        config = json.loads((folder / part / "config.json").read_text())
        return {k: v for k, v in config.items() if not k.startswith("_")}

    return Model(SDHandle, read("unet"), read("vae"), 2, 77, 64, 10)


def _latent(model: Model, height: int, width: int) -> tuple[int, int, int]:
    f = 2 ** (len(model.vae["block_out_channels"]) - 1)
    return model.vae.get("latent_channels", 4), height // f, width // f


def _count(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def call_flops(model: Model, height: int, width: int) -> int:
    """FLOPs of one denoiser call for one image (its guidance batch) at height x width pixels."""
    with torch.device("meta"):
        denoiser = model.family.build_denoiser(model.denoiser)
        kwargs = model.family.example_inputs(
            model.denoiser, model.guidance_batch, _latent(model, height, width), model.text_tokens
        )
    return _count(lambda: denoiser(**kwargs, return_dict=False))


def decode_flops(model: Model) -> int:
    with torch.device("meta"):
        vae = build("vae", model.vae)
        z = torch.randn(1, *_latent(model, model.side, model.side))
    return _count(lambda: vae.decode(z))


def afa_call_flops(model: Model, n: int) -> int:
    """FLOPs of one AFA ensemble call of n copies of the model's denoiser (aggregators at the
    default width) for one image at its native size."""
    from multifusion.features.walkers import build_ensemble, fresh_aggregators

    with torch.device("meta"):
        members = [model.family.build_denoiser(model.denoiser) for _ in range(n)]
        agg = fresh_aggregators(members, [f"m{i}" for i in range(n)], [f"m{i}" for i in range(n)])
        ensemble = build_ensemble(members, agg)
        kwargs = model.family.example_inputs(
            model.denoiser, model.guidance_batch, _latent(model, model.side, model.side), model.text_tokens
        )
    # each member's own conditioning side by side on the second axis (features/ensemble.py)
    for key in ("encoder_hidden_states", "pooled_projections"):
        if key in kwargs:
            kwargs[key] = torch.cat([kwargs[key]] * n, dim=1)
    if kwargs.get("added_cond_kwargs"):
        kwargs["added_cond_kwargs"] = {k: torch.cat([v] * n, dim=1) for k, v in kwargs["added_cond_kwargs"].items()}
    return _count(lambda: ensemble(**kwargs, return_dict=False))


def amdm_steps(steps: int, n: int) -> float:
    """Denoiser calls per image of `amdm` over n models: n per step in the window, 1 after."""
    window = max(1, math.ceil(AMDM_WINDOW * steps))
    return n * window + (steps - window)


COLUMNS = ["avg/snb 2", "avg/snb 3", "mod 2x", "(one call 2x)", "mod 4x", "(one call 4x)", "amdm 2", "amdm 3", "afa 2", "afa 3"]


def costs(model: Model) -> tuple[float, float, dict[str, float]]:
    """(TFLOPs of one call, TFLOPs per image of `single`, {column: cost / single})."""
    s, t = model.side, model.steps
    call, dec = call_flops(model, s, s), decode_flops(model)
    single = t * call + dec
    wide, big = call_flops(model, s, 2 * s), call_flops(model, 2 * s, 2 * s)
    dec_wide = 2 * dec  # the decode grows with the pixels (convolutions)
    rel = {
        "avg/snb 2": (2 * t * call + dec) / single,
        "avg/snb 3": (3 * t * call + dec) / single,
        "mod 2x": (2 * t * call + dec_wide) / single,
        "(one call 2x)": (t * wide + dec_wide) / single,
        "mod 4x": (4 * t * call + 2 * dec_wide) / single,
        "(one call 4x)": (t * big + 2 * dec_wide) / single,
        "amdm 2": (amdm_steps(t, 2) * call + dec) / single,
        "amdm 3": (amdm_steps(t, 3) * call + dec) / single,
    }
    walkable = model.family.__name__ != "FluxHandle"
    for n in (2, 3):
        rel[f"afa {n}"] = (t * afa_call_flops(model, n) + dec) / single if walkable else float("nan")
    return call / 1e12, single / 1e12, rel


def measure_zoo(steps: int, repeats: int) -> dict[str, float]:
    """Whole zoo runs (2 images, `steps` DDIM steps, 64 px tiles), each over `single`, medians of
    interleaved runs."""
    from common import interleaved_medians

    from multifusion.api import run
    from multifusion.loading import load_models

    names = ["general", "expert", "cartoon", "slice0", "slice1", "layout", "palette"]
    handles = dict(zip(names, load_models([f"zoo:{n}" for n in names], names=names)))
    prompt = "a red circle on the left in a forest"

    def recipe(method: str, models: list[str], params: dict | None = None) -> dict:
        return {
            "method": method,
            "models": [{"model": f"zoo:{m}", "prompt": prompt} for m in models],
            "params": params or {},
            "sampling": {"num_inference_steps": steps, "num_images": 2, "seed": 0},
        }

    def tiles(rows: int, cols: int) -> dict:
        return {"tiles": {"prompts": [[prompt] * cols] * rows, "tile_height": 64, "tile_width": 64}}

    runs = {
        "single": recipe("single", ["general"]),
        "avg/snb 2": recipe("average", ["general", "expert"]),
        "avg/snb 3": recipe("average", ["general", "expert", "cartoon"]),
        "mod 2x": recipe("mod", ["general"], tiles(1, 2)),
        "mod 4x": recipe("mod", ["general"], tiles(2, 2)),
        "amdm 2": recipe("amdm", ["layout", "palette"]),
        "afa 2": recipe("afa", ["slice0", "slice1"]),
    }

    def timed(r: dict):
        models = [handles[m["model"][4:]] for m in r["models"]]
        return lambda: run(r, models=models, progress=False)

    m = interleaved_medians({k: timed(r) for k, r in runs.items()}, repeats=repeats, warmup=1)
    return {k: v / m["single"] for k, v in m.items() if k != "single"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="also time the zoo's runs (a few minutes)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    print(
        "cost per image relative to `single` of one model (FLOPs of matrix products and convolutions, decode included); "
        "GF/call: one denoiser call for one image (its guidance batch)"
    )
    head = f"{'model':>15s} {'px':>5s} {'steps':>5s} {'GF/call':>8s} {'TF/image':>9s} " + " ".join(f"{c:>13s}" for c in COLUMNS)
    print(head)
    rows = {**published(), "zoo (general)": zoo()}
    zoo_rel = None
    for name, model in rows.items():
        call, single, rel = costs(model)
        if name.startswith("zoo"):
            zoo_rel = rel
        cells = " ".join(f"{rel[c]:13.2f}" if not math.isnan(rel[c]) else f"{'-':>13s}" for c in COLUMNS)
        print(f"{name:>15s} {model.side:5d} {model.steps:5d} {call * 1e3:8.4g} {single:9.4g} {cells}")
    if args.measure:
        measured = measure_zoo(rows["zoo (general)"].steps, args.repeats)
        print("\nzoo, counted against measured (whole runs, 2 images, interleaved medians):")
        print(f"{'method':>12s} {'counted':>8s} {'measured':>9s}")
        for k, v in measured.items():
            print(f"{k:>12s} {zoo_rel[k]:8.2f} {v:9.2f}")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    main()
