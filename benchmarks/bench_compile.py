"""`runtime.compile` against eager on the zoo: whole batches of one `single` run and one `mod`
run (2 x 2 tiles, one size), each Run built once and sampled repeatedly, timed in alternation
(medians), the images compared; the first compiled batch (which compiles) is timed apart.

    python benchmarks/bench_compile.py [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import interleaved_medians

from multifusion.api import Run
from multifusion.loading import load_models

PROMPT = "a red circle on the left in a forest"


def recipe(method: str, steps: int, compile: bool) -> dict:
    params = {}
    if method == "mod":
        params = {
            "tiles": {
                "prompts": [[PROMPT] * 2] * 2,
                "tile_height": 64,
                "tile_width": 64,
                "tile_row_overlap": 16,
                "tile_col_overlap": 16,
            }
        }
    return {
        "method": method,
        "models": [{"model": "zoo:general", "prompt": PROMPT}],
        "params": params,
        "sampling": {"num_inference_steps": steps, "num_images": 2, "seed": 0},
        "runtime": {"compile": True} if compile else {},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    models = load_models(["zoo:general"])
    print(f"zoo general, 2 images, {args.steps} DDIM steps, 1 thread, CPU (inductor); medians of {args.repeats} batches")
    print(
        f"{'run':>8s} {'eager s':>8s} {'compiled s':>11s} {'compiled / eager':>17s} {'first compiled batch s':>23s} {'max |diff|':>11s}"
    )
    for method in ("single", "mod"):
        eager, comp = Run(recipe(method, args.steps, False), models=models), Run(recipe(method, args.steps, True), models=models)
        start = time.perf_counter()
        first = comp.batch([0, 1], progress=False).latents
        compile_s = time.perf_counter() - start
        out = {}

        def timed(r, key):
            def f():
                out[key] = r.batch([0, 1], progress=False).latents

            return f

        m = interleaved_medians(
            {"eager": timed(eager, "eager"), "compiled": timed(comp, "compiled")}, repeats=args.repeats, warmup=1
        )
        diff = max((out["compiled"] - out["eager"]).abs().max().item(), (first - out["eager"]).abs().max().item())
        print(
            f"{method:>8s} {m['eager']:8.3f} {m['compiled']:11.3f} {m['compiled'] / m['eager']:17.3f} {compile_s:23.1f} {diff:11.2e}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
