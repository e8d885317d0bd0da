"""Training steps per second of one zoo UNet on this machine: the step of `multifusion zoo train`
(batch 32 of 16x16x4 latents, frozen text encoder on 32 tokens, eps MSE, AdamW, gradient clip
1.0, the plain attention processor the trainer sets), one thread, median of timed steps after a
warm-up. It plans retraining: a fine-tune of N steps takes about N / (steps/s) seconds.

    python benchmarks/bench_train_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch
    import torch.nn.functional as F

    from multifusion.zoo.models import SIZES, build_unet, fast_cpu_attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)

    sizes = SIZES["zoo"]
    unet = build_unet(sizes, 0, sizes.text_hidden)
    fast_cpu_attention(unet)
    unet.train()
    text = torch.nn.Sequential(torch.nn.Embedding(512, sizes.text_hidden))  # stands in for the frozen encoder's output
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.steps + 3):
        start = time.perf_counter()
        x = torch.randn(args.batch, 4, 16, 16, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        with torch.no_grad():
            context = text(torch.randint(0, 512, (args.batch, 32), generator=g))
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=context).sample, torch.randn(x.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(
        f"zoo UNet training step, batch {args.batch}, 1 thread: median {med:.3f} s = {1 / med:.2f} steps/s over {args.steps} steps"
    )


if __name__ == "__main__":
    main()
