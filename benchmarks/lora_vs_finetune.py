"""The zoo's LoRAs against the full fine-tunes they stand in for, on their own data's captions.

Each LoRA (rank 8 on the shipped general) and the full fine-tune trained on the same data are
scored by the judge on the same held-out captions and seeds (`multifusion.zoo.loras.evaluate_loras`).

    python benchmarks/lora_vs_finetune.py --n 64
"""

from __future__ import annotations

import argparse

from multifusion.zoo.evaluate import format_table
from multifusion.zoo.loras import evaluate_loras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="captions per row")
    parser.add_argument("--loras", help="comma-separated zoo LoRAs (default: all installed)")
    args = parser.parse_args()
    rows = evaluate_loras(args.loras.split(",") if args.loras else None, n=args.n)
    print(format_table(rows))


if __name__ == "__main__":
    main()
