"""Cost of AMDM: a whole `amdm` run (the specified model's 30 steps plus the other model's steps
inside the window, the meetings, both text encodings) over the specified model alone, on the
zoo's layout and palette models (target <= 1.15 for a window of 3 of 30 steps).

The ideal ratio is (30 + 3) / 30 = 1.10: the other model runs only inside the window. Runs are
timed in alternation and the medians compared, so machine load affects both alike.

    python benchmarks/bench_amdm.py [--steps 30] [--window 3] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse

from common import interleaved_medians

from multifusion import load_models
from multifusion.api import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--window", type=int, default=3, help="meeting steps 0 .. window-1")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    layout, palette = load_models(["zoo:layout", "zoo:palette"], names=["layout", "palette"])
    prompts = {
        "layout": "a circle on the left and a square on the right in a desert",
        "palette": "a red circle and a blue square in a desert",
    }
    sampling = {"num_inference_steps": args.steps, "seed": 0, "num_images": args.batch}
    models = [
        {"model": "zoo:layout", "name": "layout", "prompt": prompts["layout"]},
        {"model": "zoo:palette", "name": "palette", "prompt": prompts["palette"]},
    ]
    runs = {
        "single (layout)": Run({"method": "single", "models": models[:1], "sampling": sampling}, models=[layout]),
        f"amdm (window {args.window} of {args.steps})": Run(
            {"method": "amdm", "models": models, "sampling": sampling, "params": {"steps": [0, args.window - 1]}},
            models=[layout, palette],
        ),
        f"amdm, other model all {args.steps} steps": Run(
            {
                "method": "amdm",
                "models": models,
                "sampling": sampling,
                "params": {"w": 1.0, "correction": 0.0, "window": [0.99, 1.0]},
            },
            models=[layout, palette],
        ),
    }
    seeds = list(range(args.batch))
    fns = {name: (lambda r=r: r.batch(seeds, progress=False)) for name, r in runs.items()}
    m = interleaved_medians(fns, repeats=args.repeats, warmup=1)
    print(
        f"zoo layout + palette, 64x64 (16x16 latents), batch {args.batch}, {args.steps} DDIM steps, CFG 7.5; "
        f"medians of {args.repeats} whole runs (decode included)"
    )
    for name, sec in m.items():
        print(f"  {name:36s} {sec:8.3f} s")
    base = m["single (layout)"]
    names = list(m)
    print(
        f"amdm / single                          = {m[names[1]] / base:.3f}  (target <= 1.15; ideal {(args.steps + args.window) / args.steps:.3f})"
    )
    print(
        f"two full trajectories / single         = {m[names[2]] / base:.3f}  (what running the other model past the window would cost)"
    )


if __name__ == "__main__":
    main()
