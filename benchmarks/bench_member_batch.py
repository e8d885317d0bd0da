"""Would batching the calls of several same-architecture models (different weights) make a
combiner's step faster? Three ways to get N models' noise predictions on one input, timed side
by side (interleaved medians):

- `sequential`: N plain calls, what `average`, SNB and AFA's members do today;
- `vmap`: one call over the N models' stacked weights (`torch.func.stack_module_state` +
  `functional_call` under `torch.vmap`; convolutions become grouped, products batched);
- `one model, N x batch`: one model on the N inputs stacked, the ceiling of any batching
  (same kernels, no weight stacking), which says whether the device has headroom at all.

Also prints the largest difference between the vmap and sequential outputs.

    python benchmarks/bench_member_batch.py [--models zoo:slice0 zoo:slice1] [--batch 4] [--latent 16 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from common import interleaved_medians
from torch.func import functional_call, stack_module_state

from multifusion import load_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["zoo:slice0", "zoo:slice1"], help="same-architecture models")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="images; each model sees 2 x batch (CFG)")
    ap.add_argument("--latent", type=int, nargs="+", default=[16, 32], help="latent sides (16 = the zoo's 64 px)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    handles = load_models(args.models, names=[f"m{i}" for i in range(len(args.models))])
    unets = [h.unet.eval() for h in handles]
    n = len(unets)
    params, buffers = stack_module_state(unets)
    skeleton = copy.deepcopy(unets[0]).to("meta")

    def one(p, b, x, t, e):
        return functional_call(skeleton, (p, b), (x, t), {"encoder_hidden_states": e, "return_dict": False})[0]

    stacked = torch.vmap(one, in_dims=(0, 0, None, None, None))
    cfg = unets[0].config
    print(f"{n} models ({', '.join(args.models)}), {args.threads} thread(s), medians of {args.repeats} interleaved calls")
    print(
        f"{'latent':>6s} {'batch':>5s} {'sequential':>11s} {'vmap':>9s} {'N x batch':>10s} {'vmap/seq':>9s} {'ceiling/seq':>12s} {'max |diff|':>11s}"
    )
    g = torch.Generator().manual_seed(0)
    for side in args.latent:
        for batch in args.batch:
            x = torch.randn(2 * batch, cfg.in_channels, side, side, generator=g)
            e = torch.randn(2 * batch, 77, cfg.cross_attention_dim, generator=g)
            t = torch.tensor(500)
            xn, en = torch.cat([x] * n), torch.cat([e] * n)
            with torch.no_grad(), warnings.catch_warnings():
                # torch has no vmap rule for the CPU flash-attention kernel and says so once per call.
                warnings.simplefilter("ignore", UserWarning)
                seq = [u(x, t, encoder_hidden_states=e).sample for u in unets]
                diff = (stacked(params, buffers, x, t, e) - torch.stack(seq)).abs().max().item()
                times = interleaved_medians(
                    {
                        "seq": lambda: [u(x, t, encoder_hidden_states=e).sample for u in unets],
                        "vmap": lambda: stacked(params, buffers, x, t, e),
                        "ceiling": lambda: unets[0](xn, t, encoder_hidden_states=en).sample,
                    },
                    repeats=args.repeats,
                )
            s, v, c = times["seq"], times["vmap"], times["ceiling"]
            print(
                f"{side:>6d} {batch:>5d} {s * 1e3:>9.1f}ms {v * 1e3:>7.1f}ms {c * 1e3:>8.1f}ms {v / s:>9.2f} {c / s:>12.2f} {diff:>11.1e}"
            )


if __name__ == "__main__":
    main()
