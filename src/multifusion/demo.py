"""`multifusion demo`: each available method on fixed prompts and seeds, with a report.

Until the ShapeWorld zoo ships trained weights, the demo runs on tiny randomly initialised
test models (built locally in seconds): it exercises every method end to end and writes the
report in its final format, but its images are noise, not pictures, and it says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from multifusion.io import grid, save_png, write_text

SEEDS = [0, 1, 2, 3]
PROMPTS = ["a red circle in a snowy field", "a blue striped square"]


def _tiny_models(folder: Path) -> list[str]:
    from multifusion.testing import build_tiny_pipeline

    paths = []
    for name, seed in (("tiny-general", 0), ("tiny-expert", 1)):
        path = folder / name
        if not (path / "model_index.json").exists():
            build_tiny_pipeline(path, seed=seed, text_seed=0, vae_seed=0)
        paths.append(str(path))
    return paths


def run_demo(out: str | Path, *, progress: bool = True) -> Path:
    """Write OUT/{method}-s{seed}.png, OUT/grid.png, OUT/report.md and OUT/report.json."""
    from multifusion.api import run
    from multifusion.loading import load_models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _tiny_models(out / "models")
    handles = load_models(paths, names=["tiny-general", "tiny-expert"])
    sampling = {"num_inference_steps": 20, "seed": SEEDS[0], "num_images": len(SEEDS), "scheduler": "ddim"}
    runs = [
        ("base", "single", [0], {}),
        ("base", "single", [1], {}),
        ("fine-grained", "average", [0, 1], {"weights": [0.5, 0.5]}),
    ]
    rows, grid_rows, labels = [], [], []
    for app, method, which, params in runs:
        models = [{"model": paths[i], "name": handles[i].name, "prompt": PROMPTS[i]} for i in which]
        recipe = {"method": method, "models": models, "params": params, "sampling": sampling}
        start = time.perf_counter()
        result = run(recipe, models=[handles[i] for i in which], progress=progress)
        seconds = time.perf_counter() - start
        tag = f"{method}-{'+'.join(handles[i].name for i in which)}"
        for image, seed in zip(result.images, result.seeds):
            save_png(image, out / f"{tag}-s{seed}.png", {"recipe": recipe, "seed": seed})
        grid_rows.append(result.images)
        labels.append(tag)
        rows.append({
            "app": app,
            "method": method,
            "models": [handles[i].name for i in which],
            "seeds": len(result.seeds),
            "metrics": {"seconds_per_image": round(seconds / len(result.seeds), 4)},
        })
    save_png(grid(grid_rows, labels, [f"seed {s}" for s in SEEDS]), out / "grid.png")
    note = ("Models: tiny randomly initialised test models (the ShapeWorld zoo has no trained weights in "
            "this build yet), so the images are noise and no quality metric is reported; the demo shows "
            "the methods running end to end.")
    write_text(out / "report.json", json.dumps({"note": note, "rows": rows}, indent=2))
    lines = ["# multifusion demo", "", note, "", "![comparison grid](grid.png)", "",
             "| app | method | models | seeds | seconds per image |", "|---|---|---|---|---|"]
    lines += [f"| {r['app']} | {r['method']} | {', '.join(r['models'])} | {r['seeds']} | {r['metrics']['seconds_per_image']} |" for r in rows]
    return write_text(out / "report.md", "\n".join(lines) + "\n")
