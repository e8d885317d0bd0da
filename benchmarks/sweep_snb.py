"""SNB's knobs on the zoo's `fine-grained` app: the fusion window (late and early), k per model,
the blur kind and size, the soft-mask temperature, and the `gate` option, one factor at a time
around the defaults, plus one 2-D grid of the two factors that matter most.

Every cell runs the app's first P prompts x seeds 0..S-1 (the same seeds in every cell, so
cells differ only by their parameters) and is scored as the harness scores the app: success
(scene right and the object at its slot with the right shape, colour and texture) with a 95 %
Wilson interval; beside it the *double-object rate*: the fraction of images in which the judge
reads an object in more than one slot (the target always has exactly one object).

Resumable: each (cell, prompt) is one JSON file under --work; a second run only reads them.
Prints the markdown tables and writes a heatmap PNG.

    python benchmarks/sweep_snb.py --work runs/sweep-snb --out docs/img/snb-sweep.png [--prompts 8] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import FINE_GRAINED_MODELS as ROLES
from PIL import Image, ImageDraw

DEFAULTS = {"k": 1.0, "blur": "box", "blur_size": 4, "window": [0.0, 1.0]}
"""The faithful method's parameters before this sweep (the values every one-factor cell varies)."""


def _late(f: float) -> dict:
    return {"window": [f, 1.0]}


def _early(f: float) -> dict:
    return {"window": [0.0, f]}


FACTORS: dict[str, list[tuple[str, dict]]] = {
    # Late: fuse from trajectory fraction f to the end (t <= t_s, t_s ~ (1 - f) * 999).
    "window (late: fuse from f to the end)": [(f"f={f}", _late(f)) for f in (0.0, 0.2, 0.4, 0.6, 0.8)],
    # Early: fuse from pure noise up to f, then the general model alone (t > t_s).
    "window (early: fuse from noise to f)": [(f"f={f}", _early(f)) for f in (0.2, 0.4, 0.6)],
    "k (general, expert)": [
        (f"{a},{b}", {"k": [a, b]}) for a, b in ((1, 1), (1, 0.25), (1, 0.5), (1, 2), (1, 4), (4, 4), (16, 16))
    ],
    "blur": [
        (n, p)
        for n, p in (
            ("box 4", {}),
            ("none", {"blur": "none"}),
            ("box 2", {"blur_size": 2}),
            ("box 8", {"blur_size": 8}),
            ("gauss 1", {"blur": "gaussian", "blur_sigma": 1.0}),
            ("gauss 2", {"blur": "gaussian", "blur_sigma": 2.0}),
        )
    ],
    "temperature": [
        (n, p)
        for n, p in (
            ("hard", {}),
            ("0.1", {"temperature": 0.1}),
            ("0.5", {"temperature": 0.5}),
            ("1", {"temperature": 1.0}),
            ("2", {"temperature": 2.0}),
        )
    ],
    # Beyond the paper: the expert's map gated by the base's (the `gate` option), and the expert
    # told the object's slot ("a red striped circle on the left"; it was trained without slot words).
    "variants": [
        (n, p)
        for n, p in (
            ("faithful", {}),
            ("gate base", {"gate": "base"}),
            ("expert told the slot", {"expert_slot": True}),
            ("gate + slot", {"gate": "base", "expert_slot": True}),
            ("gate region", {"gate": "region"}),
            ("gate region + slot", {"gate": "region", "expert_slot": True}),
        )
    ],
}

GRID_ROWS = [("f=0.0", _late(0.0)), ("f=0.2", _late(0.2)), ("f=0.4", _late(0.4))]
GRID_COLS = [("k_e=0.5", {"k": [1, 0.5]}), ("k_e=1", {"k": [1, 1]}), ("k_e=2", {"k": [1, 2]}), ("k_e=4", {"k": [1, 4]})]
"""The 2-D grid: late window start (rows) x the expert's k (columns); chosen after the one-factor sweeps."""


def cell_key(params: dict) -> str:
    full = {**DEFAULTS, **params}
    return json.dumps(full, sort_keys=True)


def cell_name(params: dict) -> str:
    full = {**DEFAULTS, **params}
    return (
        "_".join(f"{k}-{v}" for k, v in sorted(full.items())).replace(" ", "").replace("[", "").replace("]", "").replace(",", "-")
    )


def run_cell(params: dict, app, handles, prompts, seeds: int, steps: int, judge, work: Path) -> list[dict]:
    """Per image: {"prompt", "seed", "success", "objects"}; cached per prompt under `work`."""
    from multifusion.api import Run
    from multifusion.bench.apps import own_prompts
    from multifusion.bench.stats import sample_success
    from multifusion.io import write_text
    from multifusion.zoo.render import PLAIN, Scene, caption

    full = {**DEFAULTS, **params}
    expert_slot = full.pop("expert_slot", False)
    folder = work / cell_name(params)
    out = []
    for p in prompts:
        path = folder / f"p{p.index:04d}-s{seeds}.json"
        if path.is_file():
            out += json.loads(path.read_text())["images"]
            continue
        recipe = own_prompts("snb", ROLES, full)(p, {r: f"zoo:{r}" for r in ROLES})
        if expert_slot:  # the expert's caption with the slot words of the general model's
            recipe["models"][1]["prompt"] = caption(Scene(PLAIN, "photo", p.scene.objects), position=True)
        recipe["sampling"] = {"num_inference_steps": steps, "seed": 0, "num_images": seeds}
        images = [im for part in Run(recipe, models=handles).batches(batch_size=seeds, progress=False) for im in part.images]
        readings = judge.read(np.stack([np.asarray(im) for im in images]))
        rows = []
        for seed, reading in enumerate(readings):
            hit, _ = sample_success(app, [reading], [p.target])
            rows.append(
                {
                    "prompt": p.index,
                    "seed": seed,
                    "success": hit,
                    "objects": sum(v is not None for v in reading["slots"].values()),
                    "reading": reading,
                }
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"params": full, "images": rows}, sort_keys=True))
        out += rows
    return out


def summarise(images: list[dict]) -> dict:
    from multifusion.bench.stats import wilson_interval

    n = len(images)
    hits = sum(i["success"] for i in images)
    double = sum(i["objects"] >= 2 for i in images)
    return {
        "n": n,
        "success": hits / n,
        "ci": wilson_interval(hits, n),
        "double": double / n,
        "double_ci": wilson_interval(double, n),
    }


def _fmt(s: dict) -> str:
    return f"{s['success']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {s['double']:.3f} [{s['double_ci'][0]:.3f}, {s['double_ci'][1]:.3f}]"


def _panel(title: str, rows: list[str], cols: list[str], values: np.ndarray, cell=(86, 44), left=90) -> Image.Image:
    """One heatmap panel: values (len(rows), len(cols)) in [0, 1]; darker blue = higher."""
    top = 40
    im = Image.new("RGB", (left + cell[0] * len(cols) + 10, top + cell[1] * len(rows) + 8), "white")
    draw = ImageDraw.Draw(im)
    draw.text((6, 4), title, fill="black")
    for j, c in enumerate(cols):
        draw.text((left + j * cell[0] + 4, 22), c, fill="black")
    for i, r in enumerate(rows):
        draw.text((6, top + i * cell[1] + cell[1] // 2 - 6), r, fill="black")
        for j in range(len(cols)):
            v = values[i, j]
            if np.isnan(v):
                continue
            shade = int(255 - 215 * min(v / 0.5, 1.0))  # 0.5 success and above: darkest
            x, y = left + j * cell[0], top + i * cell[1]
            draw.rectangle((x, y, x + cell[0] - 2, y + cell[1] - 2), fill=(shade, shade, 255))
            draw.text((x + 20, y + cell[1] // 2 - 6), f"{v:.3f}", fill="black" if shade > 120 else "white")
    return im


def figure(results: dict[str, dict], path: Path) -> None:
    """One-factor panels (one row each: success), then the 2-D grid's success and double-object rate."""
    panels = []
    for factor, cells in FACTORS.items():
        vals = np.array([[results[cell_key(p)]["success"] for _, p in cells]])
        panels.append(_panel(f"success: {factor}", ["success"], [n for n, _ in cells], vals))
    for what in ("success", "double"):
        vals = np.array([[results[cell_key({**r, **c})][what] for _, c in GRID_COLS] for _, r in GRID_ROWS])
        label = "success" if what == "success" else "double-object rate"
        panels.append(
            _panel(
                f"{label}: late window start (rows) x expert k (columns, general k = 1)",
                [n for n, _ in GRID_ROWS],
                [n for n, _ in GRID_COLS],
                vals,
            )
        )
    width = max(p.width for p in panels)
    im = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        im.paste(p, (0, y))
        y += p.height
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/sweep-snb", help="folder of per-cell results (resumable)")
    ap.add_argument("--out", default="snb-sweep.png", help="heatmap PNG")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-grid", action="store_true", help="only the one-factor sweeps (no 2-D grid, no figure)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from multifusion import load_models
    from multifusion.bench.apps import get_app
    from multifusion.zoo.judge import load_judge

    app = get_app("fine-grained")
    handles = load_models([f"zoo:{r}" for r in ROLES], names=list(ROLES))
    prompts = app.prompts(args.prompts)
    judge = load_judge()
    work = Path(args.work)
    results: dict[str, dict] = {}

    def cell(params: dict) -> dict:
        key = cell_key(params)
        if key not in results:
            results[key] = summarise(run_cell(params, app, handles, prompts, args.seeds, args.steps, judge, work))
        return results[key]

    lines = [
        f"{args.prompts} prompts x {args.seeds} seeds per cell, {args.steps} DDIM steps, guidance 7.5; "
        f"defaults: {json.dumps(DEFAULTS)}",
        "",
    ]
    for factor, cells in FACTORS.items():
        lines += [f"**{factor}**", "", "| value | params | success (95% CI) | double-object rate (95% CI) |", "|---|---|---|---|"]
        for name, params in cells:
            lines.append(f"| {name} | `{json.dumps(params)}` | {_fmt(cell(params))} |")
            print(lines[-1], flush=True)
        lines.append("")
    if not args.no_grid:
        lines += [
            "**late window start x expert k**",
            "",
            "| window | k | success (95% CI) | double-object rate (95% CI) |",
            "|---|---|---|---|",
        ]
        for rn, r in GRID_ROWS:
            for cn, c in GRID_COLS:
                lines.append(f"| {rn} | {cn} | {_fmt(cell({**r, **c}))} |")
                print(lines[-1], flush=True)
        figure(results, Path(args.out))
        print(f"wrote {args.out}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
