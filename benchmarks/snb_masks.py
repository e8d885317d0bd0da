"""Where SNB hands the image to the expert, on the zoo's `fine-grained` app: per band of steps,
the share of latent pixels whose mask picks the expert inside the target object's slot (its
third of the image) and outside it, for the faithful method and for `gate="base"` and `"region"`; and how
flat the normalised maps are (max and min of H*W*M, 1 = uniform).

    python benchmarks/snb_masks.py [--prompts 8] [--seeds 4]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import FINE_GRAINED_MODELS as ROLES


def main() -> None:
    import torch

    from multifusion import load_models
    from multifusion.api import Run
    from multifusion.bench.apps import get_app, own_prompts
    from multifusion.zoo.render import SLOTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)

    app = get_app("fine-grained")
    handles = load_models([f"zoo:{r}" for r in ROLES], names=list(ROLES))
    bands = [(0, 3), (3, 10), (10, 20), (20, args.steps)]
    print(
        f"{args.prompts} prompts x {args.seeds} seeds, {args.steps} DDIM steps; expert share of latent pixels (mean over images)\n"
    )
    print(
        "| variant | steps | in the target slot | outside it | map max x HW (general, expert) | map min x HW (general, expert) |"
    )
    print("|---|---|---|---|---|---|")
    for name, params in (("faithful", {}), ("gate base", {"gate": "base"}), ("gate region", {"gate": "region"})):
        inside = {b: [] for b in bands}
        outside = {b: [] for b in bands}
        hi = {b: [] for b in bands}
        lo = {b: [] for b in bands}
        for p in app.prompts(args.prompts):
            recipe = own_prompts("snb", ROLES, params)(p, {r: f"zoo:{r}" for r in ROLES})
            recipe["sampling"] = {"num_inference_steps": args.steps, "seed": 0, "num_images": args.seeds}
            records: list[dict] = []
            list(
                Run(recipe, models=handles).batches(
                    batch_size=args.seeds, progress=False, callback=lambda s: records.append(s.record)
                )
            )
            slot = SLOTS.index(p.scene.objects[0].slot)
            for i, rec in enumerate(records):
                band = next(b for b in bands if b[0] <= i < b[1])
                mask, maps = rec["snb/mask"][1, :, 0], rec["snb/maps"][:, :, 0]  # (B, H, W), (N, B, H, W)
                w = mask.shape[-1]
                cols = torch.zeros(w, dtype=torch.bool)
                cols[round(slot * w / 3) : round((slot + 1) * w / 3)] = True
                inside[band].append(float(mask[..., cols].mean()))
                outside[band].append(float(mask[..., ~cols].mean()))
                hw = maps.shape[-1] * maps.shape[-2]
                hi[band].append((maps.amax(dim=(-2, -1)) * hw).mean(dim=1).tolist())
                lo[band].append((maps.amin(dim=(-2, -1)) * hw).mean(dim=1).tolist())
        for b in bands:
            high, low = np.mean(hi[b], axis=0), np.mean(lo[b], axis=0)
            print(
                f"| {name} | {b[0]}-{b[1] - 1} | {np.mean(inside[b]):.3f} | {np.mean(outside[b]):.3f} | "
                f"{high[0]:.2f}, {high[1]:.2f} | {low[0]:.2f}, {low[1]:.2f} |"
            )


if __name__ == "__main__":
    main()
