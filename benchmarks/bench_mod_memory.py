"""Mixture of Diffusers at growing canvas sizes: peak memory and time per step.

Canvases of 1x, 2x, 4x and 8x one tile's area (tiles of 32x32 latents, side by side, no
overlap) are sampled (a) as regions, one tile per UNet call, (b) as regions batched 4 tiles per
call, and (c) by one UNet call over the whole canvas, for contrast. Each configuration runs in a
fresh process; its peak resident memory during the sampling loop is measured above the memory
it held before sampling (Linux: /proc/self/clear_refs resets the high-water mark), and again
after the (tiled, for large canvases) VAE decode. Time per step excludes the first step.
Expected: (a) stays flat beyond the canvas-sized latent buffers; (c) grows with the canvas;
time grows with the number of tiles.

    python benchmarks/bench_mod_memory.py [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TILE = 32  # latent pixels per tile side
GRIDS = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4)}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(model: str, area: int, mode: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from multifusion.api import run
    from multifusion.loading import load_models

    [h] = load_models([model])
    f = h.vae_scale_factor
    rows, cols = GRIDS[area]
    tile_px = TILE * f
    if mode == "whole":
        recipe = {
            "method": "single",
            "models": [{"model": model, "prompt": "a red circle"}],
            "sampling": {"num_inference_steps": steps, "height": rows * tile_px, "width": cols * tile_px},
        }
    else:
        tiles = {"prompts": [["a red circle"] * cols] * rows, "tile_height": tile_px, "tile_width": tile_px}
        recipe = {
            "method": "mod",
            "models": [{"model": model}],
            "params": {"tiles": tiles, "tile_batch_size": 1 if mode == "tiles" else 4},
            "sampling": {"num_inference_steps": steps},
        }
    # Warm up kernels on a small run so one-off allocations do not count.
    run(
        {"method": "single", "models": [{"model": model, "prompt": "x"}], "sampling": {"num_inference_steps": 1}},
        models=[h],
        progress=False,
    )
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    from multifusion.api import iter_run

    marks = {}

    def at_step(info):
        if info.step == 0:
            marks["start"] = time.perf_counter()
        if info.step == info.num_steps - 1:  # the sampling loop's high-water mark, before decoding
            marks["end"] = time.perf_counter()
            marks["loop_hwm"] = _rss_kb("VmHWM")

    for _ in iter_run(recipe, models=[h], progress=False, callback=at_step):
        pass
    return {
        "peak_extra_mb": (marks["loop_hwm"] - before) / 1024,
        "decode_peak_extra_mb": (_rss_kb("VmHWM") - before) / 1024,
        "s_per_step": (marks["end"] - marks["start"]) / (steps - 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "AREA", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.steps)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from common import tiny_models

    [model] = tiny_models([("m", 0)], sample_size=TILE)
    results = {}
    for area in GRIDS:
        for mode in ("tiles", "batched", "whole"):
            out = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--child", model, str(area), mode],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[(area, mode)] = json.loads(out.strip().splitlines()[-1])
    print(
        f"tile = {TILE}x{TILE} latents, batch 1, CFG on; MB = peak memory of the sampling loop above the "
        "pre-sampling level (after decoding in brackets)"
    )
    print(
        f"{'canvas':>7} | {'tiles: MB':>16} {'s/step':>7} | {'batched 4: MB':>16} {'s/step':>7} | {'whole canvas: MB':>16} {'s/step':>7} | batched/tiles time"
    )
    for area in GRIDS:
        t, b, w = (results[(area, m)] for m in ("tiles", "batched", "whole"))
        cell = lambda r: f"{r['peak_extra_mb']:6.1f} ({r['decode_peak_extra_mb']:6.1f})"  # noqa: E731
        print(
            f"{area:>6}x | {cell(t):>16} {t['s_per_step']:7.3f} | {cell(b):>16} {b['s_per_step']:7.3f} | "
            f"{cell(w):>16} {w['s_per_step']:7.3f} | {b['s_per_step'] / t['s_per_step']:.3f}"
        )


if __name__ == "__main__":
    main()
