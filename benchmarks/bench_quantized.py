"""Quantized zoo models against full precision, side by side in one run: the bytes held by the
denoiser (`loading.held_bytes`), the time of one denoiser call (CFG batch, medians of calls timed
in alternation), and how far int8 moves a `single` and an `average` run's final latents (largest
difference over the largest value). torchao int8 weight-only quantizes the linear layers only; the
zoo's UNets keep much of their weight in convolutions, so the saving here is smaller than on a
transformer (docs/quantization.md gives the published models' figures).

    python benchmarks/bench_quantized.py [--weights int8] [--batch 2] [--repeats 30]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians

import multifusion as mf
from multifusion.loading import held_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="int8", help="torchao format (int8, int8_dynamic, float8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    names = ["zoo:general", "zoo:expert"]
    spec = {"backend": "torchao", "weights": args.weights}
    full = mf.load_models(names)
    quant = mf.load_models(names, quantize=[spec, spec])
    f, q = full[0], quant[0]
    linear = sum(m.weight.numel() for m in f.unet.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in f.unet.parameters())
    print(f"zoo UNet: {total:,} parameters, {linear / total:.0%} of them in linear layers")
    unet_full, unet_quant = _unet_bytes(f), _unet_bytes(q)
    print(f"UNet bytes held: full {unet_full:,}, {args.weights} {unet_quant:,}: ratio {unet_quant / unet_full:.3f}")
    print(
        f"two models held: full {held_bytes(full):,}, {args.weights} {held_bytes(quant):,}: ratio {held_bytes(quant) / held_bytes(full):.3f}"
    )

    x = torch.randn(2 * args.batch, 4, 16, 16)
    t = torch.tensor(500)
    cond = f.encode_prompt(["a red circle in a snowy field"] * 2 * args.batch)
    medians = interleaved_medians(
        {"full": lambda: f.eps(x, t, cond), "quantized": lambda: q.eps(x, t, cond)}, repeats=args.repeats
    )
    print(f"denoiser call (batch {2 * args.batch}): quantized / full time {medians['quantized'] / medians['full']:.2f}")

    kw = dict(num_inference_steps=20, seed=0, num_images=4, progress=False)
    prompts = ["a red circle in a snowy field", "a red striped circle"]
    for method, models, extra in (("single", 1, {}), ("average", 2, {"weights": [0.6, 0.4]})):
        a = mf.fuse(method, full[:models], prompts[:models], **extra, **kw).latents
        b = mf.fuse(method, quant[:models], prompts[:models], **extra, **kw).latents
        print(f"{method}: largest latent difference / largest latent {((a - b).abs().max() / a.abs().max()).item():.4f}")


def _unet_bytes(h) -> int:
    from multifusion.handles import stored_tensors

    return sum(s.untyped_storage().nbytes() for p in [*h.unet.parameters(), *h.unet.buffers()] for s in stored_tensors(p))


if __name__ == "__main__":
    main()
