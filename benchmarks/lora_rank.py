"""How close an extracted LoRA comes to its fine-tune, by rank: zoo `toon` (a fine-tune of
`general`) extracted at several ranks.

For each rank: the relative Frobenius error of the LoRA's deltas against the fine-tune's deltas
over the UNet's Linear and Conv weights, ||tau - B A|| / ||tau||; the file's size over the
UNet's; and, once, the share of the fine-tune's whole delta (squared norm) that lies outside
LoRA layers (biases, norms), which no LoRA carries.

    python benchmarks/lora_rank.py [--base zoo:general] [--tuned zoo:toon]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="zoo:general")
    ap.add_argument("--tuned", default="zoo:toon")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64, 100000])
    args = ap.parse_args()

    from safetensors.torch import load_file

    from multifusion.loading import resolve
    from multifusion.weights.lora import extract_lora, lora_delta, lora_layers, read_lora

    def unet(model: str) -> tuple[dict, Path]:
        folder = Path(resolve(model).location)
        path = next((folder / "unet").glob("*.safetensors"))
        return load_file(path), path

    (base, base_file), (tuned, _) = unet(args.base), unet(args.tuned)
    layers = {f"{m}.weight" for m in lora_layers(Path(resolve(args.base).location), "unet")}
    deltas = {k: tuned[k].float() - base[k].float() for k in base}
    inside = sum(float(d.pow(2).sum()) for k, d in deltas.items() if k in layers)
    outside = sum(float(d.pow(2).sum()) for k, d in deltas.items() if k not in layers)
    print(
        f"{args.tuned} - {args.base}: share of the delta's squared norm outside LoRA layers (biases, norms): "
        f"{outside / (inside + outside):.4f}"
    )
    print("| rank | relative error (Linear and Conv weights) | LoRA file / UNet file |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            path = extract_lora(args.base, args.tuned, Path(tmp) / f"r{rank}.safetensors", rank=rank)
            lora = read_lora(path)["unet"]
            err = sum(float((deltas[f"{m}.weight"] - lora_delta(layer)).pow(2).sum()) for m, layer in lora.items())
            label = "full" if rank >= 100000 else str(rank)
            print(f"| {label} | {math.sqrt(err / inside):.4f} | {path.stat().st_size / base_file.stat().st_size:.2f} |")


if __name__ == "__main__":
    main()
