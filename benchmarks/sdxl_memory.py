"""Accelerator memory of fusing two and three SDXL models, computed from SDXL base's configs
(`multifusion.memory`: parameter counts on the meta device, activation peaks of one fake-tensor
forward), with offload on and off, for 12 GB and 24 GB cards. Prints the table of docs/sdxl.md.

    python benchmarks/sdxl_memory.py [--height 1024] [--width 1024] [--batch 1] [--dtype float16]
"""

from __future__ import annotations

import argparse

import torch

from multifusion.memory import GiB, SDXL_BASE, Footprint, activation_peaks, fits, parameter_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="images per batch (the UNet sees 2 x batch with CFG)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    params = parameter_counts(SDXL_BASE)
    acts = activation_peaks(SDXL_BASE, args.height, args.width, args.batch, dtype)
    fp = Footprint(params, acts)
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
    print(f"activation peaks at {args.height}x{args.width}, batch {args.batch} ({args.dtype}): "
          f"UNet call (CFG batch) {acts['unet'] / GiB:.2f} GiB, VAE decode {acts['vae_decode'] / GiB:.2f} GiB\n")
    print("| models | text encoders | offload | VAE on | GPU peak (GiB) | host RAM (GiB) | 12 GB card | 24 GB card |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (1, 2, 3):
        for shared in (True, False) if n > 1 else (True,):
            for offload in (False, True):
                for vae_on in (True, False):
                    peak = fp.device_bytes(n, offload=offload, shared_encoders=shared, vae_on_device=vae_on)
                    host = fp.host_bytes(n, shared_encoders=shared) if offload else 0
                    print(f"| {n} | {'shared' if shared else 'one set per model'} | {'on' if offload else 'off'} | "
                          f"{'GPU' if vae_on else 'CPU'} | {peak / GiB:.1f} | {f'{host / GiB:.1f}' if offload else '-'} | "
                          f"{'yes' if fits(peak, 12) else 'no'} | {'yes' if fits(peak, 24) else 'no'} |")


if __name__ == "__main__":
    main()
