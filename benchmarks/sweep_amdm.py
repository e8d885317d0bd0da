"""AMDM's knobs on a zoo app, scored by the app's instance success rate with 95 % bootstrap
intervals (images resampled, as the harness does), on the app's own prompts and seeds 0..S-1.
Prints a markdown table and writes a heatmap PNG.

`--grid window` (default, the `aggregation` app's first sweep): the specified model's weight w
and the window (its first k steps of 30), the relative default correction.
`--grid paper`: w x S x eta around the `paper` preset: w, the window [1, S] (the authors' S
corrected steps after the uncorrected first one) and eta as a multiple f of the authors' 55 / 45
in SD latent units (`scaled`; f = 0 aggregates without correcting); the heatmap shows f = 1.

    python benchmarks/sweep_amdm.py --out docs/img/amdm-sweep.png [--prompts 8] [--seeds 8]
    python benchmarks/sweep_amdm.py --app aggregation-layout --grid paper --out docs/img/amdm-sweep-layout.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from multifusion import load_models
from multifusion.api import Run
from multifusion.bench.apps import get_app, own_prompts
from multifusion.bench.stats import bootstrap_interval, sample_success
from multifusion.zoo.judge import load_judge

WEIGHTS = (0.3, 0.5, 0.7)
WINDOWS = (3, 6, 10)  # meeting steps 0 .. k-1 of 30
PAPER_S = (1, 3, 6)  # --grid paper: meeting steps 1 .. S
ETA_FACTORS = (0.0, 1.0, 2.0)  # --grid paper: eta = f * (55, 45), scaled


def score(app, handles, prompts, params: dict, seeds: int, steps: int, judge) -> tuple[float, tuple[float, float]]:
    roles = app.roles
    build = own_prompts("amdm", roles, params)
    hits, trials = [], []
    for p in prompts:
        recipe = build(p, {r: f"zoo:{r}" for r in roles})
        recipe["sampling"] = {"num_inference_steps": steps, "seed": 0, "num_images": seeds}
        images = [im for part in Run(recipe, models=handles).batches(batch_size=seeds, progress=False) for im in part.images]
        readings = judge.read(np.stack([np.asarray(im) for im in images]))
        for reading in readings:  # the app reads whole images against the prompt's full target
            h, t = sample_success(app, [reading], [p.target])
            hits.append(h)
            trials.append(t)
    return sum(hits) / sum(trials), bootstrap_interval(hits, trials)


def heatmap(table: dict[tuple[float, int], float], path: Path, windows=WINDOWS, label="{} of 30 steps", cell: int = 90) -> None:
    """Rows: w; columns: window length; each cell its success rate (darker = higher)."""
    top, left = 30, 70
    im = Image.new("RGB", (left + cell * len(windows), top + cell * len(WEIGHTS)), "white")
    draw = ImageDraw.Draw(im)
    hi = max(table.values()) or 1.0
    for j, k in enumerate(windows):
        draw.text((left + j * cell + 8, 8), label.format(k), fill="black")
    for i, w in enumerate(WEIGHTS):
        draw.text((6, top + i * cell + cell // 2 - 6), f"w = {w}", fill="black")
        for j, k in enumerate(windows):
            v = table[(w, k)]
            shade = int(255 - 200 * v / hi)
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 2, y + cell - 2), fill=(shade, shade, 255))
            draw.text((x + cell // 2 - 14, y + cell // 2 - 6), f"{v:.3f}", fill="black" if shade > 120 else "white")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="amdm-sweep.png", help="heatmap PNG")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--app", default="aggregation", help="an instance app with two roles, the first specified")
    ap.add_argument("--grid", choices=("window", "paper"), default="window")
    args = ap.parse_args()
    torch.set_num_threads(1)

    app = get_app(args.app)
    handles = load_models([f"zoo:{r}" for r in app.roles], names=list(app.roles))
    prompts = app.prompts(args.prompts)
    judge = load_judge()
    table, lines = {}, []
    if args.grid == "paper":
        for w in WEIGHTS:
            for s in PAPER_S:
                for f in ETA_FACTORS:
                    params = {"preset": "paper", "w": w, "steps": [1, s], "correction": [55.0 * f, 45.0 * f]}
                    rate, (lo, hi) = score(app, handles, prompts, params, args.seeds, args.steps, judge)
                    if f == 1.0:
                        table[(w, s)] = rate
                    lines.append(f"| {w} | {s} | {f:g} | {rate:.3f} [{lo:.3f}, {hi:.3f}] |")
                    print(lines[-1], flush=True)
        heatmap(table, Path(args.out), PAPER_S, "steps 1-{}")
        print(
            f"\n{args.app}: {args.prompts} prompts x {args.seeds} seeds per cell, {args.steps} DDIM steps, eta f x (55, 45) scaled"
        )
        print("| w | S | f | ISR (95% CI) |\n|---|---|---|---|\n" + "\n".join(lines))
        print(f"wrote {args.out}")
        return
    for w in WEIGHTS:
        for k in WINDOWS:
            rate, (lo, hi) = score(app, handles, prompts, {"w": w, "steps": [0, k - 1]}, args.seeds, args.steps, judge)
            table[(w, k)] = rate
            lines.append(f"| {w} | {k} | {rate:.3f} [{lo:.3f}, {hi:.3f}] |")
            print(lines[-1], flush=True)
    heatmap(table, Path(args.out))
    print(f"\n{args.prompts} prompts x {args.seeds} seeds per cell, {args.steps} DDIM steps, relative correction (0.43, 0.68)")
    print("| w | window (steps) | ISR (95% CI) |\n|---|---|---|\n" + "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
