"""Accelerator memory of fusing SDXL models (1, 2, 3 on 12 and 24 GB cards) and SD3.5 / FLUX.1
models (2 on 24 and 80 GB cards), with offload on and off, and of two SD3.5 / FLUX.1 models
with quantized weights (int8, Q8_0, NF4, Q4_0) on one card, one model per card and offloaded
(12 / 16 / 24 GB), and of two and three SDXL / FLUX.1 dev models held as one base + LoRAs
against as many full models (12 / 16 / 24 GB), computed from the published configs by `multifusion.memory` (parameter
counts on the meta device, activation peaks of one fake-tensor forward; GiB). Prints the tables
of docs/sdxl.md, docs/flow.md and docs/quantization.md.

    python benchmarks/memory.py [--height 1024] [--width 1024] [--batch 1]
"""

from __future__ import annotations

import argparse

import torch

from multifusion.memory import (
    BYTES_PER_PARAM,
    LORA_RANKS,
    LORA_TARGETS,
    PUBLISHED,
    QUANT_FORMATS,
    Footprint,
    GiB,
    denoiser_activations,
    denoiser_lora_parameters,
    device_bytes,
    fits,
    footprint,
    host_bytes,
    per_device_bytes,
    quantizable,
    quantized,
    with_loras,
)

SECTIONS = [  # (title, families, model counts, cards in GB)
    ("SDXL", ["SDXL base"], (1, 2, 3), (12, 24)),
    ("SD3.5 and FLUX.1", ["SD3.5 Large", "SD3.5 Medium", "FLUX.1 dev"], (2,), (24, 80)),
]


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f}"


def components_table(fps: dict[str, Footprint]) -> list[str]:
    lines = [
        "| model | denoiser parameters (GiB) | text encoders' parameters (GiB) | VAE parameters (GiB) | "
        "activations: denoiser call | activations: VAE decode |",
        "|---|---|---|---|---|---|",
    ]
    for name, fp in fps.items():
        encoders = " + ".join(f"{k} {n:,}" for k, n in fp.text_encoders.items())
        lines.append(
            f"| {name} | {fp.denoiser:,} ({gib(fp.denoiser * BYTES_PER_PARAM)}) | {encoders} "
            f"({gib(sum(fp.text_encoders.values()) * BYTES_PER_PARAM)}) | {fp.vae:,} "
            f"({gib(fp.vae * BYTES_PER_PARAM)}) | {gib(fp.denoiser_activations)} | {gib(fp.decode_activations)} |"
        )
    return lines


def residency_table(fps: dict[str, Footprint], counts: tuple[int, ...], cards: tuple[int, ...]) -> list[str]:
    cols = ["models", "text encoders + VAE", "offload", "GPU peak", "GPU peak, VAE on CPU", "host RAM (offload)"]
    cols += [f"{c} GB card" for c in cards]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, fp in fps.items():
        for n in counts:
            sharings = [(True, "one set")] if n == 1 else [(True, "held once"), (False, "one set per model")]
            for offload in (False, True):
                # offload's device peak does not depend on sharing: one row, host RAM for each sharing
                rows = sharings if not offload else [(True, " / ".join(label for _, label in sharings))]
                for shared, label in rows:
                    peak = device_bytes(fp, n, offload=offload, shared=shared)
                    cpu_vae = device_bytes(fp, n, offload=offload, shared=shared, vae_on_device=False)
                    host = " / ".join(gib(host_bytes(fp, n, shared=s)) for s, _ in sharings) if offload else "-"
                    cells = [f"{n} x {name}", label, "on" if offload else "off", gib(peak), gib(cpu_vae), host]
                    cells += ["yes" if fits(peak, c) else "no" for c in cards]
                    lines.append("| " + " | ".join(cells) + " |")
    return lines


QUANTIZED = (["FLUX.1 dev", "SD3.5 Large", "SD3.5 Medium"], 2, (12, 16, 24))  # models, how many fused, cards


def quantized_table(fps: dict[str, Footprint], n: int, cards: tuple[int, ...]) -> list[str]:
    """Two fine-tunes of one base (text encoders and VAE held once on one card) with the denoisers
    and T5 in each format: the peak of one card, of the busiest card with one model per card, and
    offloaded; for each card size the first way that fits (one card, one model per card, offload)."""
    cols = ["models", "denoiser + T5 weights", "weights held (one card)", "one card", "one model per card", "offload"]
    cols += [f"{c} GB" for c in cards]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, fp in fps.items():
        linear = quantizable(PUBLISHED[name])
        for fmt in QUANT_FORMATS:
            q = quantized(fp, linear, fmt)
            ways = [
                ("one card", device_bytes(q, n, offload=False)),
                (f"{n} cards", per_device_bytes(q, n, offload=False)),
                ("offload", device_bytes(q, n, offload=True)),
            ]
            fit = [next((way for way, peak in ways if fits(peak, c)), "no") for c in cards]
            cells = [f"{n} x {name}", fmt, gib(host_bytes(q, n)), *(gib(peak) for _, peak in ways), *fit]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


LORAS = (["SDXL base", "FLUX.1 dev"], (2, 3), (12, 16, 24))  # models, how many fused, cards


def lora_table(
    fps: dict[str, Footprint], counts: tuple[int, ...], cards: tuple[int, ...], height: int, width: int, batch: int
) -> list[str]:
    """N models as N full denoisers (fine-tunes sharing the text encoders and VAE) against one
    base denoiser + N LoRAs of each rank in `LORA_RANKS` (`with_loras`; the call's activations
    counted with an adapter active); FLUX.1 dev also with its denoiser and T5 in int8 (the LoRAs
    in bfloat16). For each card size the first way that fits: resident, else offload."""
    cols = ["models", "held as", "weights held", "GPU peak, resident", "GPU peak, offload"]
    cols += [f"{c} GB" for c in cards]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, fp in fps.items():
        model = PUBLISHED[name]
        lora = {r: denoiser_lora_parameters(model, r) for r in LORA_RANKS}
        f = 2 ** (len(model.vae["block_out_channels"]) - 1)
        latent = (model.vae.get("latent_channels", 4), height // f, width // f)

        # the adapted call's peak as the base's (MemTracker, `footprint`) plus what the adapters add,
        # both counted by the same quick counter
        def quick(rank: int) -> int:
            inputs = model.guidance_batch * batch
            return denoiser_activations(
                model.family, model.denoiser, inputs, latent, model.text_tokens, torch.bfloat16, quick=True, lora=rank
            )

        base_quick = quick(0)
        acts = {r: fp.denoiser_activations + max(0, quick(r) - base_quick) for r in LORA_RANKS}
        formats = ["bfloat16", "int8"] if model.family.__name__ == "FluxHandle" else ["bfloat16"]
        for fmt in formats:
            q = fp if fmt == "bfloat16" else quantized(fp, quantizable(model), fmt)
            tag = "" if fmt == "bfloat16" else f", {fmt} denoiser + T5"
            for n in counts:
                ways = [(f"{n} full denoisers{tag}", q, n)]
                ways += [(f"base + {n} LoRAs r{r}{tag}", with_loras(q, lora[r], n, acts[r]), 1) for r in LORA_RANKS]
                for label, held, k in ways:
                    resident, offload = device_bytes(held, k, offload=False), device_bytes(held, k, offload=True)
                    fit = ["resident" if fits(resident, c) else "offload" if fits(offload, c) else "no" for c in cards]
                    cells = [f"{n} x {name}", label, gib(host_bytes(held, k)), gib(resident), gib(offload), *fit]
                    lines.append("| " + " | ".join(cells) + " |")
    return lines


def lora_sizes() -> list[str]:
    lines = []
    for name in LORAS[0]:
        model = PUBLISHED[name]
        with torch.device("meta"):
            targets = LORA_TARGETS[type(model.family.build_denoiser(model.denoiser)).__name__]
        sizes = ", ".join(
            f"rank {r}: {(n := denoiser_lora_parameters(model, r)):,} parameters ({n * BYTES_PER_PARAM / 2**20:.1f} MiB)"
            for r in LORA_RANKS
        )
        lines.append(f"- {name}, LoRA on {', '.join(targets)}: {sizes}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="images per batch (the denoiser sees 2 x batch with CFG)")
    ap.add_argument("--loras-only", action="store_true", help="only the base + LoRAs table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.loras_only:
        for title, names, counts, cards in SECTIONS:
            fps = {name: footprint(PUBLISHED[name], args.height, args.width, args.batch) for name in names}
            print(f"### {title}: {args.height} x {args.width}, batch {args.batch}, GiB\n")
            print("\n".join(components_table(fps)) + "\n")
            print("\n".join(residency_table(fps, counts, cards)) + "\n")
        names, n, cards = QUANTIZED
        fps = {name: footprint(PUBLISHED[name], args.height, args.width, args.batch) for name in names}
        print(f"### Quantized: {n} models, {args.height} x {args.width}, batch {args.batch}, GiB\n")
        print("\n".join(f"- {fmt}: {what}" for fmt, (_, _, what) in QUANT_FORMATS.items()) + "\n")
        print("\n".join(quantized_table(fps, n, cards)) + "\n")
    names, counts, cards = LORAS
    fps = {name: footprint(PUBLISHED[name], args.height, args.width, args.batch) for name in names}
    print(f"### One base + LoRAs against full models: {args.height} x {args.width}, batch {args.batch}, GiB\n")
    print("\n".join(lora_sizes()) + "\n")
    print("\n".join(lora_table(fps, counts, cards, args.height, args.width, args.batch)) + "\n")


if __name__ == "__main__":
    main()
