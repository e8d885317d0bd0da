"""Does more CPU time make the zoo models good at their own captions? A curve per model.

Each model named continues from its shipped weights (``multifusion zoo train --from-shipped``:
fresh optimizer, the same recipe, deterministic) and is scored at every checkpoint in
``--at`` (steps beyond the shipped ones; 0 is the shipped model itself) on ``--n`` held-out
captions of its own distribution (``multifusion zoo evaluate``'s sampler and judge). One JSON
line per (model, step) is appended to ``OUT/curve.jsonl`` as soon as it is measured, so an
interrupted run resumes where it stopped; the figure ``OUT/zoo-curve.png`` and a markdown table
are redrawn from that file at the end.

    python benchmarks/zoo_curve.py --out runs/curve --models palette,general --at 0,750,1500,3000,4500 \
        --figure docs/img/zoo-curve.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from multifusion.zoo.evaluate import evaluate_model
from multifusion.zoo.judge import load_judge
from multifusion.zoo.train import shipped_steps, train_zoo

SHOWN = ("scene", "attr/shape", "attr/colour", "attr/texture", "attr/position", "attr/count", "isr")
"""The attributes a model's own captions state (whichever its distribution has), and ISR."""


def measured(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def figure(rows: list[dict], path: Path, panel: tuple[int, int] = (360, 240)) -> None:
    """One panel per model: each attribute's accuracy against total training steps, PIL-drawn."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (188, 189, 34), (214, 39, 40), (148, 103, 189), (80, 80, 80)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    W, H = panel
    left, right, top, bottom = 44, 24, 24, 34
    im = Image.new("RGB", (W * len(models), H + 72), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for j, name in enumerate(models):
        pts = sorted((r for r in rows if r["model"] == name), key=lambda r: r["total_steps"])
        x0, x1 = pts[0]["total_steps"], max(pts[-1]["total_steps"], pts[0]["total_steps"] + 1)

        def xy(step: float, acc: float, ox: int = j * W) -> tuple[float, float]:
            return ox + left + (W - left - right) * (step - x0) / (x1 - x0), top + (H - top - bottom) * (1 - acc)

        d.rectangle([j * W + left, top, j * W + W - right, H - bottom], outline=(0, 0, 0))
        d.text((j * W + left, 6), f"{name} on its own captions (n={pts[0]['n']})", fill=(0, 0, 0))
        for acc in (0.0, 0.5, 0.8, 1.0):
            y = xy(x0, acc)[1]
            d.line([j * W + left - 4, y, j * W + left, y], fill=(0, 0, 0))
            d.text((j * W + 8, y - 6), f"{acc:.1f}", fill=(0, 0, 0))
        y8 = xy(x0, 0.8)[1]
        for x in range(int(j * W + left), int(j * W + W - right), 6):  # the 0.8 target, dashed
            d.line([x, y8, x + 2, y8], fill=(150, 150, 150))
        last_label = -1e9
        for r in pts:
            x = xy(r["total_steps"], 0)[0]
            d.line([x, H - bottom, x, H - bottom + 4], fill=(0, 0, 0))
            if x - last_label > 36:  # skip labels that would overlap the previous one
                d.text((x - 14, H - bottom + 8), str(r["total_steps"]), fill=(0, 0, 0))
                last_label = x
        for k, key in enumerate(SHOWN):
            line = [xy(r["total_steps"], r["metrics"][key]) for r in pts if key in r["metrics"]]
            if len(line) > 1:
                d.line(line, fill=colours[k], width=2)
            for x, y in line:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[k])
    for k, key in enumerate(SHOWN):  # legend under the panels, three entries a row
        x, y = 10 + (k % 3) * 110, H + 4 + 16 * (k // 3)
        d.line([x, y + 6, x + 18, y + 6], fill=colours[k], width=3)
        d.text((x + 22, y), key.removeprefix("attr/"), fill=(0, 0, 0))
    d.text((10, H + 56), "x: total training steps (shipped + continued, batch 32); dashed: 0.8", fill=(0, 0, 0))
    im.save(path)


def table(rows: list[dict]) -> str:
    keys = [k for k in SHOWN if any(k in r["metrics"] for r in rows)]
    rows = sorted(rows, key=lambda r: (r["model"], r["total_steps"]))
    out = [
        "| model | total steps | minutes since the last point | " + " | ".join(k.removeprefix("attr/") for k in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [f"{100 * r['metrics'][k]:.0f}" if k in r["metrics"] else "-" for k in keys]
        out.append(f"| {r['model']} | {r['total_steps']} | {r['train_minutes']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints, curve.jsonl)")
    p.add_argument("--models", default="palette,general")
    p.add_argument("--at", default="0,750,1500,3000,4500", help="steps beyond the shipped ones at which to score")
    p.add_argument("--n", type=int, default=128, help="held-out captions per point")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", help="also copy the figure here")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "curve.jsonl"
    torch.set_num_threads(args.threads)
    judge = load_judge()
    at = sorted({int(s) for s in args.at.split(",")})
    for name in args.models.split(","):
        for steps in at:
            if any(r["model"] == name and r["steps"] == steps and r["n"] == args.n for r in measured(log)):
                continue
            t0 = time.time()
            if steps:
                train_zoo(out, [name], steps=steps, threads=args.threads, from_shipped=True)
                model = str(out / name / "pipeline")
            else:
                model = f"zoo:{name}"
            train_minutes = (time.time() - t0) / 60
            result = evaluate_model(model, args.n, prompts=name, judge=judge)
            metrics = {k: float(v) for k, v in result.items() if k in SHOWN}
            row = {
                "model": name,
                "steps": steps,
                "total_steps": shipped_steps(name) + steps,
                "n": args.n,
                "train_minutes": train_minutes,
                "metrics": metrics,
            }
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} +{steps}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
    rows = [r for r in measured(log) if r["n"] == args.n]
    figure(rows, out / "zoo-curve.png")
    if args.figure:
        Path(args.figure).write_bytes((out / "zoo-curve.png").read_bytes())
    print(table(rows))
    print("steps beyond shipped:", np.unique([r["steps"] for r in rows]).tolist())


if __name__ == "__main__":
    main()
