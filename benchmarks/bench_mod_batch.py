"""Mixture of Diffusers: a run with `tile_batch_size` unset (chosen from the memory budget)
against every explicit tile batch, side by side, and the images of each against one tile per
call.

Zoo `general` tiles of 64 x 64 pixels with 16 pixels of overlap, on canvases of 2 x 2 and
2 x 4 tiles (`--grids`), batch 2 images, CFG on, 10 DDIM steps. The runs are timed in alternation
(medians of `--repeats` whole runs, decoding included), so machine load affects them alike; the
ratio column is each run over the fastest explicit batch. The default's one-off cost (a
fake-tensor forward of the model's config, once per process and window size) is printed apart.

    python benchmarks/bench_mod_batch.py [--repeats 5] [--steps 10] [--grids 2x2 2x4]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import interleaved_medians

from multifusion.api import run
from multifusion.loading import load_models
from multifusion.memory import activations_per_input

TILE, OVERLAP = 64, 16


def recipe(rows: int, cols: int, steps: int, tile_batch_size: int | None) -> dict:
    prompts = [[f"a red circle on the left in a {s}" for s in ("forest", "desert", "sea", "night sky")[:cols]]] * rows
    tiles = {
        "prompts": prompts,
        "tile_height": TILE,
        "tile_width": TILE,
        "tile_row_overlap": OVERLAP,
        "tile_col_overlap": OVERLAP,
    }
    params = {"tiles": tiles} | ({} if tile_batch_size is None else {"tile_batch_size": tile_batch_size})
    return {
        "method": "mod",
        "models": [{"model": "zoo:general"}],
        "params": params,
        "sampling": {"num_inference_steps": steps, "num_images": 2, "seed": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grids", nargs="+", default=["2x2", "2x4"])
    args = ap.parse_args()
    models = load_models(["zoo:general"])
    [h] = models
    start = time.perf_counter()
    activations_per_input(type(h), h.unet.config, (4, TILE // 8, TILE // 8), 77, torch.float32)
    once = time.perf_counter() - start  # the rule's fake-tensor forward, once per process (the runs below reuse it)
    print(
        f"zoo general, tiles {TILE} px, overlap {OVERLAP} px, 2 images, {args.steps} DDIM steps, 1 thread; medians of {args.repeats}"
    )
    for grid in args.grids:
        rows, cols = (int(v) for v in grid.split("x"))
        n = rows * cols
        sizes = sorted({1, 2, 4, n} - {s for s in (4,) if s > n})
        runs = {"default": None} | {f"tile_batch_size {s}": s for s in sizes}
        images = {}

        def timed(size, key):
            def f():
                images[key] = run(recipe(rows, cols, args.steps, size), models=models, progress=False).latents

            return f

        m = interleaved_medians({k: timed(s, k) for k, s in runs.items()}, repeats=args.repeats, warmup=1)
        best = min(v for k, v in m.items() if k != "default")
        one = images["tile_batch_size 1"]
        print(f"\n{rows} x {cols} tiles ({n} regions, one model)")
        print(f"{'run':>20s} {'s / run':>8s} {'/ best explicit':>16s} {'max |latent - 1 per call|':>26s}")
        for k in runs:
            print(f"{k:>20s} {m[k]:8.3f} {m[k] / best:16.3f} {(images[k] - one).abs().max().item():26.2e}")
    print(f"\nthe default's first run in a process also estimates one tile's activations once: {once:.2f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
