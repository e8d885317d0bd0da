"""Cost of fusing: one full sampling step of each noise combiner over two models, divided by
the sum of the plain UNet calls that step makes (target <= 1.05 for each).

Everything the fusion adds (scale_model_input, the blend or salience maths, the scheduler step,
the handles' dtype moves) is in the numerator; only the denoiser evaluations are in the
denominator. For SNB it also times a step before the fusion window opens, against one model's
calls: only the base model should run there.

    python benchmarks/bench_step_overhead.py [--size 16] [--batch 2] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians, tiny_models

from multifusion.loading import load_models
from multifusion.noise import SNB, Average
from multifusion.schedulers import make_scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16, help="latent side (image side / 4)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    ha, hb = load_models(tiny_models([("a", 0), ("b", 1)], sample_size=args.size))
    ga = ha.guide("a red circle", batch_size=args.batch)
    gb = hb.guide("a blue square", batch_size=args.batch)
    combiners = {
        "average": Average([ga, gb], [0.5, 0.5]),
        "snb": SNB([ga, gb], [1.0, 1.0]),
        "snb, before window": SNB([ga, gb], [1.0, 1.0], window=(0.9, 1.0)),
    }
    scheduler = make_scheduler("dpm++", ha.scheduler_config)
    scheduler.set_timesteps(30)
    t = scheduler.timesteps[10]
    x = torch.randn(args.batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x2 = torch.cat([x, x])

    def step(fn):
        def run():
            scheduler._step_index = 10  # hold the multistep scheduler at one step
            x_in = scheduler.scale_model_input(x, t)
            scheduler.step(fn(x_in, t), t, x, return_dict=False)

        return run

    def plain(guided):
        def run():
            with torch.no_grad():
                for g in guided:
                    g.handle.unet(
                        x2, t, encoder_hidden_states=torch.cat([g.negative.embeds, g.positive.embeds]), return_dict=False
                    )

        return run

    fns = {name: step(fn) for name, fn in combiners.items()}
    fns["plain: both models"] = plain([ga, gb])
    fns["plain: base model"] = plain([ga])
    m = interleaved_medians(fns, repeats=args.repeats)
    print(f"latent {args.size}x{args.size}, batch {args.batch}, 2 models, CFG on, DPM-Solver++ step; medians of {args.repeats}")
    for name, sec in m.items():
        print(f"  {name:20s} {sec * 1e3:8.2f} ms")
    both, base = m["plain: both models"], m["plain: base model"]
    print(f"average step / its model calls          = {m['average'] / both:.3f}  (target <= 1.05)")
    print(f"snb step / its model calls              = {m['snb'] / both:.3f}  (target <= 1.05)")
    print(f"snb step before the window / base calls = {m['snb, before window'] / base:.3f}  (only the base model runs)")


if __name__ == "__main__":
    main()
