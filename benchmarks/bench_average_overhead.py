"""Cost of fusing by weighted average: one full sampling step of `average` over two models,
divided by the sum of the plain UNet calls that step makes (target <= 1.05).

Everything the fusion adds (scale_model_input, the weighted sum, the scheduler step, the
handles' dtype moves) is in the numerator; only the denoiser evaluations are in the denominator.

    python benchmarks/bench_average_overhead.py [--size 32] [--batch 2] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch

from common import interleaved_medians, tiny_models
from multifusion.loading import load_models
from multifusion.loop import make_scheduler
from multifusion.noise import Average


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16, help="latent side (image side / 4)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    ha, hb = load_models(tiny_models([("a", 0), ("b", 1)], sample_size=args.size))
    ga = ha.guide("a red circle", batch_size=args.batch)
    gb = hb.guide("a blue square", batch_size=args.batch)
    fused = Average([ga, gb], [0.5, 0.5])
    scheduler = make_scheduler("dpm++", ha.scheduler_config)
    scheduler.set_timesteps(30)
    t = scheduler.timesteps[10]
    x = torch.randn(args.batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x2 = torch.cat([x, x])

    def fused_step():
        scheduler._step_index = 10  # hold the multistep scheduler at one step
        x_in = scheduler.scale_model_input(x, t)
        scheduler.step(fused(x_in, t), t, x, return_dict=False)

    def plain_calls():
        with torch.no_grad():
            for g in (ga, gb):
                g.handle.unet(x2, t, encoder_hidden_states=torch.cat([g.uncond_embeds, g.cond_embeds]), return_dict=False)

    m = interleaved_medians({"fused": fused_step, "plain": plain_calls}, repeats=args.repeats)
    print(f"latent {args.size}x{args.size}, batch {args.batch}, 2 models, CFG on, DPM-Solver++ step")
    print(f"fused step   {m['fused'] * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"plain calls  {m['plain'] * 1e3:8.2f} ms (2 UNet calls of batch {2 * args.batch})")
    print(f"ratio fused / plain = {m['fused'] / m['plain']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
