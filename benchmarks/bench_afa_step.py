"""Cost of AFA: one ensemble forward over the sum of the N plain UNet calls it stands for
(target <= 1.15), and the aggregators' parameters as a fraction of one UNet, side by side.

The ensemble runs the same N UNets layer by layer and adds one aggregator per aggregation
point; its calls are timed in alternation with the N plain calls on the same inputs (a CFG
batch of 2 x batch), medians compared, so machine load affects both alike. Larger latents show
how the Python overhead of walking the blocks shrinks next to the convolutions.

`--layers 1 2` times aggregators of one and of two transformer layers per point side by side
(`afa train --layers`), each against the same plain calls.

`--sd15` does the same at the scale users run: two UNets built from SD-1.5's published config
(random weights: the time does not depend on them; about 7 GB in float32) with aggregators of
the paper's width d = 128, at SD-1.5's 64 x 64 latent (512 px) unless `--latent` says otherwise.

`--free-attention` adds a row that is no method: the one-layer ensemble with the aggregators'
attention kernels replaced by a no-op (wrong outputs, timing only), the floor any faster or
coarser attention could reach.

    python benchmarks/bench_afa_step.py [--batch 4] [--latent 16 32] [--repeats 30] [--threads 1] [--layers 1]
    python benchmarks/bench_afa_step.py --sd15 --batch 1 --repeats 5 --free-attention
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians

from multifusion import load_models
from multifusion.features import afa
from multifusion.features.ensemble import model_hash, unet_config_of
from multifusion.features.unet import AFAEnsemble
from multifusion.features.walkers import fresh_aggregators, parameter_count
from multifusion.memory import SD15_UNET as SD15

LATENTS = [16, 32]


class _NoAttention:
    """torch.nn.functional as the aggregators see it, with attention returning its queries (the
    shape of its output; no work)."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, **kwargs):
        return q


def without_attention(call):
    def timed():
        afa.F = _NoAttention()  # the UNets' own attention is untouched: they call torch's module
        try:
            call()
        finally:
            afa.F = torch.nn.functional

    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="images; the UNets see 2 x batch (CFG)")
    ap.add_argument("--latent", type=int, nargs="+", default=LATENTS, help="latent sides to time (16 = the zoo's 64 px)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, nargs="+", default=[1], help="transformer layers per aggregator (one ensemble each)")
    ap.add_argument("--free-attention", action="store_true", help="also time the aggregators with attention as a no-op (a floor)")
    ap.add_argument("--sd15", action="store_true", help="two random-weight UNets of SD-1.5's config instead of the zoo slices")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.sd15:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unets = [UNet2DConditionModel.from_config(SD15).eval() for _ in range(2)]
        names, hashes, label = ["a", "b"], ["a", "b"], "two SD-1.5-config UNets (random weights)"
        args.latent = [64] if args.latent == LATENTS else args.latent
        ctx = [torch.randn(2 * args.batch, 77, 768)] * 2
    else:
        handles = load_models(["zoo:slice0", "zoo:slice1"], names=["slice0", "slice1"])
        unets = [h.unet for h in handles]
        names, hashes, label = [h.name for h in handles], [model_hash(h) for h in handles], "zoo slice0 + slice1"
        ctx = [h.encode_prompt(["a red circle on the left in a desert"] * 2 * args.batch).embeds for h in handles]

    ensembles = {}
    for layers in args.layers:
        agg = fresh_aggregators(unets, hashes, names, layers=layers)
        with torch.no_grad():  # timing does not depend on the values; non-zero logits all the same
            for p in agg.points:
                p.conv_out.weight.normal_(0.0, 0.1)
        ensembles[layers] = (AFAEnsemble(unets, agg).eval(), sum(p.numel() for p in agg.parameters()))
    n_unet = sum(p.numel() for p in unets[0].parameters())
    sd_agg, sd_unet = parameter_count(SD15, 2, 128)

    print(
        f"AFA over {label} ({len(agg.points)} aggregation points, width d = {agg.config.width}, "
        f"{' and '.join(map(str, args.layers))} transformer layer(s)), "
        f"batch {args.batch} x 2 (CFG), {args.threads} thread(s); medians of {args.repeats} calls"
    )
    print(
        f"{'latent':>8s} {'layers':>6s} {'sum of 2 UNets':>16s} {'ensemble':>10s} {'ratio':>7s}   {'aggregator params / one UNet':s}"
    )
    g = torch.Generator().manual_seed(0)
    for side in args.latent:
        x = torch.randn(2 * args.batch, 4, side, side, generator=g)
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
        if args.free_attention:
            fns["free"] = without_attention(ensemble(ensembles[args.layers[0]][0]))
        m = interleaved_medians(fns, repeats=args.repeats, warmup=3)
        if args.free_attention:
            print(
                f"{side:>6d}^2 {args.layers[0]:>6d} {m['plain'] * 1e3:13.1f} ms {m['free'] * 1e3:7.1f} ms "
                f"{m['free'] / m['plain']:7.3f}   attention a no-op (a floor, not a method)"
            )
        for layers, (_, n_agg) in ensembles.items():
            share = f"{'SD-1.5' if args.sd15 else 'zoo'}: {n_agg:,} / {n_unet:,} = {n_agg / n_unet:.1%}"
            if layers == 1 and not args.sd15:
                share += f";  SD-1.5 d=128 (config): {sd_agg:,} / {sd_unet:,} = {sd_agg / sd_unet:.1%}"
            print(
                f"{side:>6d}^2 {layers:>6d} {m['plain'] * 1e3:13.1f} ms {m[layers] * 1e3:7.1f} ms {m[layers] / m['plain']:7.3f}   {share}"
            )
    print("target: ratio <= 1.15")
    assert unet_config_of(unets[0]) == unet_config_of(unets[1])


if __name__ == "__main__":
    main()
