"""Per-step cost of region-attention next to `single` and `mod` (Mixture of Diffusers) for the same
regions, side by side (target: region-attention <= 1.15x single).

For each canvas and region count, the three methods' noise functions (built by `api.Run` from
recipes, as a run builds them) are called in alternation on the same latents and timestep
(CFG: the model sees 2 x batch); medians are compared, so machine load affects all alike. The
regions are vertical strips of equal width covering the canvas, each with its prompt, plus a
base prompt over the whole canvas (region-attention: base_ratio 0.2; mod: a background at its
default weight). `mod` runs each region as a window of its own (batched: tile_batch_size =
regions), so its cost grows with the regions' area; region-attention adds attention calls only.
The column `uncached` is region-attention projecting the prompts' keys and values at every call
(no `TextProjections`), beside the run's own, which projects them once; `no base` is
region-attention without the base prompt (the strips cover the canvas): each token then attends
its region's prompt only, one attention per token as in `single`, where the base prompt adds a
second.

    python benchmarks/bench_region_attention.py [--model zoo:general] [--sizes 64 160]
        [--regions 1 2 3] [--batch 2] [--repeats 20]

Families: `--model` takes any model the package loads (a tiny SD3 or FLUX folder from
`multifusion.testing` too); strips snap to the model's patch grid.
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians

from multifusion import load_models
from multifusion.api import Run
from multifusion.method import Batch

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple heart"]
BASE = "three shapes in a snowy field"


def strips(n: int, width: int, height: int, grid: int) -> list[dict]:
    """n vertical strips of (about) equal width covering the canvas, edges on `grid`."""
    edges = [round(width * k / n / grid) * grid for k in range(n + 1)]
    return [
        {"row_init": 0, "row_end": height, "col_init": edges[k], "col_end": edges[k + 1], "prompt": PROMPTS[k % len(PROMPTS)]}
        for k in range(n)
    ]


def noise_fn(recipe: dict, handle, batch: int) -> callable:
    """The noise function a run of `recipe` samples `batch` images with."""
    run = Run(recipe, models=[handle])
    c, h, w = run.latent_shape
    plan = run.method.plan(run.prepared, Batch(list(range(batch)), list(range(batch)), torch.zeros(batch, c, h, w)))
    return plan.trajectories[0].denoise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:general")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 160], help="square canvas sides in pixels")
    ap.add_argument("--regions", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch", type=int, default=2, help="images; the denoiser sees 2 x batch (CFG)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    [handle] = load_models([args.model])
    grid = handle.patch_px
    print(
        f"{args.model} ({handle.family_name or type(handle).__name__}); batch {args.batch} x 2 (CFG); medians of "
        f"{args.repeats} interleaved calls; ratios against single on the same canvas"
    )
    print(
        f"{'canvas':>8s} {'regions':>7s} {'single ms':>10s} {'region-attention':>17s} {'ratio':>6s} {'uncached':>10s} "
        f"{'ratio':>6s} {'no base':>10s} {'ratio':>6s} {'mod':>10s} {'ratio':>6s}"
    )
    for side in args.sizes:
        sampling = {"height": side, "width": side, "num_images": args.batch}
        base = {"models": [{"model": args.model, "prompt": BASE}], "sampling": sampling}
        fns = {"single": noise_fn({**base, "method": "single"}, handle, args.batch)}
        for n in args.regions:
            regions = strips(n, side, side, grid)
            fns[f"ra{n}"] = noise_fn(
                {**base, "method": "region-attention", "params": {"regions": regions, "base_prompt": BASE, "base_ratio": 0.2}},
                handle,
                args.batch,
            )
            uncached = noise_fn(
                {**base, "method": "region-attention", "params": {"regions": regions, "base_prompt": BASE, "base_ratio": 0.2}},
                handle,
                args.batch,
            )
            uncached.projections = None
            fns[f"raw{n}"] = uncached
            fns[f"nb{n}"] = noise_fn({**base, "method": "region-attention", "params": {"regions": regions}}, handle, args.batch)
            fns[f"mod{n}"] = noise_fn(
                {
                    **base,
                    "method": "mod",
                    "params": {"regions": regions, "background": {"prompt": BASE}, "tile_batch_size": n + 1},
                },
                handle,
                args.batch,
            )
        c, h, w = handle.latent_channels, side // handle.vae_scale_factor, side // handle.vae_scale_factor
        x = torch.randn(args.batch, c, h, w, generator=torch.Generator().manual_seed(0))
        t = torch.tensor(500.0) if handle.prediction_space == "velocity" else torch.tensor(500)
        timed = {k: (lambda f=f: f(x, t)) for k, f in fns.items()}
        with torch.no_grad():
            m = interleaved_medians(timed, repeats=args.repeats, warmup=2)
        s = m["single"]
        for n in args.regions:
            ra, raw, nb, md = m[f"ra{n}"], m[f"raw{n}"], m[f"nb{n}"], m[f"mod{n}"]
            print(
                f"{side:>6d}px {n:>7d} {s * 1e3:10.1f} {ra * 1e3:14.1f} ms {ra / s:6.2f} {raw * 1e3:7.1f} ms {raw / s:6.2f} "
                f"{nb * 1e3:7.1f} ms {nb / s:6.2f} {md * 1e3:7.1f} ms {md / s:6.2f}"
            )
    print("target: region-attention <= 1.15x single")


if __name__ == "__main__":
    main()
