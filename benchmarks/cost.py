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

A second table, the same way:

- `average` / `snb` over LoRA models on one base (`multifusion.lora`): the base model and 1 or 2
  models base + a rank-r LoRA on the attention projections (`memory.LORA_TARGETS`), N = 2 or 3
  calls a step; a LoRA model's call is counted with peft's adapter injected into the meta-device
  denoiser and active (its low-rank products run beside each adapted layer), the base model's with
  no adapter active (peft then runs the base layer alone);
- `region-attention` with 2 and 4 regions (vertical strips covering the canvas) and a base
  prompt at ratio 0.2 (the default window: every step): the denoiser's call with the real
  processors of `features/regional.py` installed on the meta-device model, over the joined text
  of (regions + 1) prompts: a UNet's cross-attention layers attend the base prompt with every
  token and each region's prompt with its tokens (`fused_cross`); SD3's and FLUX.1's joint
  attention runs once for the base prompt over every image token and once per region over the
  region's image tokens and its prompt, and the text stream of the blocks carries (regions + 1)
  prompts' tokens. `r-a 2, no base`: the two regions without a base prompt (they cover the
  canvas).

The zoo's own row is the same count on the zoo's configs; `--measure` times the same runs on
the zoo (interleaved whole runs, decoding included) so the counted ratios can be checked
against measured ones.

    python benchmarks/cost.py [--measure] [--repeats 3] [--rank 16]
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
from multifusion.memory import FLUX_DEV, PUBLISHED, SD15_UNET, SDXL_VAE, build, inject_lora

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


def lora_call_flops(model: Model, rank: int) -> int:
    """`call_flops` at the native size with a rank-`rank` LoRA active on the attention projections
    (`memory.inject_lora`: peft's layers on the meta-device denoiser)."""
    with torch.device("meta"):
        denoiser = model.family.build_denoiser(model.denoiser)
        inject_lora(denoiser, rank)
        kwargs = model.family.example_inputs(
            model.denoiser, model.guidance_batch, _latent(model, model.side, model.side), model.text_tokens
        )
    return _count(lambda: denoiser(**kwargs, return_dict=False))


REGION_BASE_RATIO = 0.2  # as bench_region_attention.py


def strip_boxes(n: int, latent_hw: tuple[int, int], grid: int) -> list[tuple[int, int, int, int]]:
    """n vertical strips of (about) equal width covering the latent, (r0, r1, c0, c1), edges on
    multiples of `grid` latent pixels (the patch size of a transformer)."""
    h, w = latent_hw
    edges = [round(w * k / n / grid) * grid for k in range(n + 1)]
    return [(0, h, edges[k], edges[k + 1]) for k in range(n)]


def region_call_flops(model: Model, n_regions: int, side: int | None = None, base: bool = True) -> int:
    """FLOPs of one region-attention denoiser call for one image at side x side pixels (default:
    native): `n_regions` strips and (`base`) a base prompt, each prompt `model.text_tokens` long,
    the processors of `features/regional.py` installed on the meta-device denoiser."""
    from multifusion.features.regional import Layout, Regions, installed, text_attention

    side = side or model.side
    latent = _latent(model, side, side)
    layout = Layout((model.text_tokens,) * (n_regions + base), has_base=base)
    grid = 2 if model.family.__name__ in ("SD3Handle", "FluxHandle") else 1  # 2x2 patches
    regions = Regions(strip_boxes(n_regions, latent[1:], grid), latent[1:], REGION_BASE_RATIO if base else None, layout)
    with torch.device("meta"):
        denoiser = model.family.build_denoiser(model.denoiser)
        kwargs = model.family.example_inputs(model.denoiser, model.guidance_batch, latent, layout.total)
    layers = text_attention(denoiser)

    def run():
        with installed(layers, regions):
            denoiser(**kwargs, return_dict=False)

    return _count(run)


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


EXTRA_COLUMNS = ["LoRA call", "LoRA: base+1", "LoRA: base+2", "region-attn 2", "region-attn 4", "r-a 2, no base"]


def extra_costs(model: Model, rank: int) -> dict[str, float]:
    """{column of `EXTRA_COLUMNS`: cost / single} (module docstring: the second table); "LoRA
    call": one call of a LoRA model over one of the base."""
    t = model.steps
    call, dec = call_flops(model, model.side, model.side), decode_flops(model)
    single = t * call + dec
    lora = lora_call_flops(model, rank)
    return {
        "LoRA call": lora / call,
        "LoRA: base+1": (t * (call + lora) + dec) / single,
        "LoRA: base+2": (t * (call + 2 * lora) + dec) / single,
        **{f"region-attn {r}": (t * region_call_flops(model, r) + dec) / single for r in (2, 4)},
        "r-a 2, no base": (t * region_call_flops(model, 2, base=False) + dec) / single,
    }


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
    ap.add_argument("--rank", type=int, default=16, help="the LoRAs' rank (second table)")
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
    print(
        f"\nLoRA models on one base (rank {args.rank}, attention projections) and region-attention "
        f"(strips + a base prompt at {REGION_BASE_RATIO}), cost per image relative to `single`"
    )
    print(f"{'model':>15s} " + " ".join(f"{c:>13s}" for c in EXTRA_COLUMNS))
    for name, model in rows.items():
        extra = extra_costs(model, args.rank)
        print(f"{name:>15s} " + " ".join(f"{extra[c]:13.3f}" for c in EXTRA_COLUMNS))
    zoo_model = rows["zoo (general)"]
    zoo_call = call_flops(zoo_model, zoo_model.side, zoo_model.side)
    print("\nzoo (general), one denoiser call relative to `single`'s (counted; the setups of the zoo benchmarks):")
    lora8 = lora_call_flops(zoo_model, 8)
    print(f"  snb step over (base, base + rank-8 LoRA) / over two full models: {(zoo_call + lora8) / (2 * zoo_call):.3f}")
    for side in (64, 160):
        ratios = " ".join(
            f"{r}: {region_call_flops(zoo_model, r, side) / call_flops(zoo_model, side, side):.3f}" for r in (1, 2, 3)
        )
        print(f"  region-attention call at {side} px by regions, {ratios}")
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
