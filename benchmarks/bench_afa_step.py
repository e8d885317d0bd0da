"""Cost of AFA: one ensemble forward over the sum of the N plain UNet calls it stands for
(target <= 1.15), and the aggregators' parameters as a fraction of one UNet, side by side.

The ensemble runs the same N UNets layer by layer and adds one aggregator per aggregation
point; its calls are timed in alternation with the N plain calls on the same inputs (a CFG
batch of 2 x batch), medians compared, so machine load affects both alike. Larger latents show
how the Python overhead of walking the blocks shrinks next to the convolutions.

`--layers 1 2` times aggregators of one and of two transformer layers per point side by side
(`afa train --layers`), each against the same plain calls.

    python benchmarks/bench_afa_step.py [--batch 4] [--latent 16 32] [--repeats 30] [--threads 1] [--layers 1]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians

from multifusion import load_models
from multifusion.features.ensemble import model_hash, unet_config_of
from multifusion.features.unet import AFAEnsemble
from multifusion.features.walkers import fresh_aggregators, parameter_count
from multifusion.memory import SD15_UNET as SD15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="images; the UNets see 2 x batch (CFG)")
    ap.add_argument("--latent", type=int, nargs="+", default=[16, 32], help="latent sides to time (16 = the zoo's 64 px)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, nargs="+", default=[1], help="transformer layers per aggregator (one ensemble each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    handles = load_models(["zoo:slice0", "zoo:slice1"], names=["slice0", "slice1"])
    unets = [h.unet for h in handles]
    ensembles = {}
    for layers in args.layers:
        agg = fresh_aggregators(unets, [model_hash(h) for h in handles], [h.name for h in handles], layers=layers)
        with torch.no_grad():  # timing does not depend on the values; non-zero logits all the same
            for p in agg.points:
                p.conv_out.weight.normal_(0.0, 0.1)
        ensembles[layers] = (AFAEnsemble(unets, agg).eval(), sum(p.numel() for p in agg.parameters()))
    n_unet = sum(p.numel() for p in unets[0].parameters())
    sd_agg, sd_unet = parameter_count(SD15, 2, 128)

    print(
        f"AFA over zoo slice0 + slice1 ({len(agg.points)} aggregation points, width d = {agg.config.width}, "
        f"{' and '.join(map(str, args.layers))} transformer layer(s)), "
        f"batch {args.batch} x 2 (CFG), {args.threads} thread(s); medians of {args.repeats} calls"
    )
    print(
        f"{'latent':>8s} {'layers':>6s} {'sum of 2 UNets':>16s} {'ensemble':>10s} {'ratio':>7s}   {'aggregator params / one UNet':s}"
    )
    g = torch.Generator().manual_seed(0)
    for side in args.latent:
        x = torch.randn(2 * args.batch, 4, side, side, generator=g)
        ctx = [h.encode_prompt(["a red circle on the left in a desert"] * 2 * args.batch).embeds for h in handles]
        t = torch.tensor(500)

        @torch.no_grad()
        def plain():
            for u, c in zip(unets, ctx):
                u(x, t, encoder_hidden_states=c)

        def ensemble(ens):
            @torch.no_grad()
            def call():
                ens(x, t, torch.cat(ctx, dim=1))

            return call

        fns = {"plain": plain} | {layers: ensemble(ens) for layers, (ens, _) in ensembles.items()}
        m = interleaved_medians(fns, repeats=args.repeats, warmup=3)
        for layers, (_, n_agg) in ensembles.items():
            share = f"zoo: {n_agg:,} / {n_unet:,} = {n_agg / n_unet:.1%}"
            if layers == 1:
                share += f";  SD-1.5 d=128 (config): {sd_agg:,} / {sd_unet:,} = {sd_agg / sd_unet:.1%}"
            print(
                f"{side:>6d}^2 {layers:>6d} {m['plain'] * 1e3:13.1f} ms {m[layers] * 1e3:7.1f} ms {m[layers] / m['plain']:7.3f}   {share}"
            )
    print("target: ratio <= 1.15")
    assert unet_config_of(unets[0]) == unet_config_of(unets[1])


if __name__ == "__main__":
    main()
