"""`multifusion demo`: the main job on the embedded ShapeWorld zoo.

It runs, on fixed prompts and seeds:

- each installed zoo model alone on captions of its own training distribution, and on another
  model's (app `base`): the judge shows each model good at its job and bad at the rest;
- every benchmark app whose models are installed, through the benchmark harness with few seeds
  (each model alone, the weighted average, and each fusion method: SNB, Mixture of Diffusers...);
- pictures: a labelled comparison grid, the SNB masks of one fine-grained fusion, a regional
  composition and a wide panorama (Mixture of Diffusers tiles), each beside its region weights
  (each region's share of every latent pixel), and an AMDM aggregation strip (the clean image
  before and after each meeting);

and writes `report.md` and `report.json` (`rows`: app, method, models, seeds, metrics, with
`metrics.success` in [0, 1] as defined per app in docs/results.md). Without zoo weights it
falls back to tiny randomly initialised models and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from multifusion.io import grid, save_png, write_text

SEEDS = 4
PROMPTS = 2
STEPS = 25
BASE_CAPTIONS = 8


def _base_rows(installed: list[str], out: Path, progress: bool) -> tuple[list[dict], list]:
    """Each model on its own captions and on one other model's (zoo.evaluate.CROSS)."""
    from tqdm.auto import tqdm

    from multifusion.zoo.evaluate import CROSS, evaluate_model
    from multifusion.zoo.judge import load_judge

    judge = load_judge()
    rows, pictures = [], []
    jobs = [(m, m) for m in installed] + [(m, other) for m in installed for other in CROSS.get(m, [])[:1] if other in installed]
    for model, prompts in tqdm(jobs, desc="base models", disable=not progress):
        r = evaluate_model(
            f"zoo:{model}", n=BASE_CAPTIONS, prompts=prompts, num_inference_steps=STEPS, judge=judge, return_images=True
        )
        metrics = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in ("n", "guidance_scale")}
        metrics["success"] = r["image_success"]
        rows.append(
            {"app": "base", "method": "single", "models": [model], "prompts": prompts, "seeds": r["n"], "metrics": metrics}
        )
        if model == prompts:
            pictures.append((f"{model}", r["images"][:SEEDS]))
    return rows, pictures


def _pictures(installed: list[str], out: Path, progress: bool) -> list[str]:
    """SNB masks of one fine-grained fusion; a three-region composition and a wide panorama, each
    with its region weights; the strip of one AMDM aggregation."""
    from multifusion.api import generate_to_folder

    made = []
    if {"general", "expert"} <= set(installed):
        recipe = {
            "method": "snb",
            "models": [
                {"model": "zoo:general", "name": "general", "prompt": "a red circle in the centre in a snowy field"},
                {"model": "zoo:expert", "name": "expert", "prompt": "a red striped circle"},
            ],
            "sampling": {"num_inference_steps": STEPS, "seed": 0},
        }
        generate_to_folder(recipe, out / "pictures", stem="snb", export_masks=True, progress=progress)
        made += ["pictures/snb-s0.png", "pictures/snb-s0-masks.png", "pictures/snb-s0-masks.gif"]
    if "general" in installed:
        # One native-size (64 px) region per object, overlapping by 16 px: the paper's setting
        # (regions smaller than the model's native size fail; see docs/results.md, regional).
        objects = [
            "a red circle in the centre in a desert",
            "a blue square in the centre in a desert",
            "a yellow triangle in the centre in a desert",
        ]
        regions = [
            {"row_init": 0, "row_end": 64, "col_init": 48 * j, "col_end": 48 * j + 64, "prompt": p} for j, p in enumerate(objects)
        ]
        composition = {
            "method": "mod",
            "models": [{"model": "zoo:general", "name": "general"}],
            "params": {"regions": regions},
            "sampling": {"num_inference_steps": STEPS, "seed": 0, "height": 64, "width": 160},
        }
        generate_to_folder(composition, out / "pictures", stem="regions", export_masks=True, progress=progress)
        panorama = {
            "method": "mod",
            "models": [{"model": "zoo:general", "name": "general"}],
            "params": {
                "tiles": {
                    "prompts": [
                        [
                            "a red circle in a snowy field",
                            "a blue square in a desert",
                            "a yellow diamond in a forest",
                            "a pink triangle at sea",
                        ]
                    ],
                    "tile_height": 64,
                    "tile_width": 64,
                    "tile_col_overlap": 24,
                },
                "tile_batch_size": 4,
            },
            "sampling": {"num_inference_steps": STEPS, "seed": 0},
        }
        generate_to_folder(panorama, out / "pictures", stem="panorama", export_masks=True, progress=progress)
        made += [
            "pictures/regions-s0.png",
            "pictures/regions-s0-regions.png",
            "pictures/panorama-s0.png",
            "pictures/panorama-s0-regions.png",
        ]
    if {"layout", "palette"} <= set(installed):
        # AMDM: the layout model's trajectory, aggregated with the palette model's in the first steps.
        recipe = {
            "method": "amdm",
            "models": [
                {"model": "zoo:layout", "name": "layout", "prompt": "a circle on the left and a square on the right in a desert"},
                {"model": "zoo:palette", "name": "palette", "prompt": "a red circle and a blue square in a desert"},
            ],
            "sampling": {"num_inference_steps": STEPS, "seed": 0},
        }
        generate_to_folder(recipe, out / "pictures", stem="amdm", export_masks=True, progress=progress)
        made += ["pictures/amdm-s0.png", "pictures/amdm-s0-amdm.png"]
    if {"slice0", "slice1"} <= set(installed):
        # AFA: which slice model's features win where, per aggregation point (shipped aggregators).
        prompt = "a red circle on the left and a blue square on the right in a forest"
        recipe = {
            "method": "afa",
            "models": [
                {"model": "zoo:slice0", "name": "slice0", "prompt": prompt},
                {"model": "zoo:slice1", "name": "slice1", "prompt": prompt},
            ],
            "sampling": {"num_inference_steps": STEPS, "seed": 0},
        }
        generate_to_folder(recipe, out / "pictures", stem="afa", export_masks=True, progress=progress)
        made += ["pictures/afa-s0.png", "pictures/afa-s0-afa.png"]
    return made


def _installed(app: Any, installed: list[str]) -> bool:
    """Whether every zoo model and zoo LoRA of ``app`` is installed."""
    from multifusion.bench.apps import zoo_needs
    from multifusion.lora import zoo_loras

    models, loras = zoo_needs(app.roles)
    return models <= set(installed) and loras <= set(zoo_loras())


def _zoo_demo(installed: list[str], out: Path, progress: bool) -> Path:
    from multifusion.bench.apps import APPS
    from multifusion.bench.run import run_bench

    start = time.perf_counter()
    base_rows, base_pictures = _base_rows(installed, out, progress)
    save_png(grid([ims for _, ims in base_pictures], [name for name, _ in base_pictures]), out / "base-grid.png")
    apps = [a.id for a in APPS.values() if _installed(a, installed)]
    bench = (
        run_bench(
            apps,
            out / "bench",
            seeds=SEEDS,
            prompts=PROMPTS,
            num_inference_steps=STEPS,
            batch_size=SEEDS,
            threads=1,
            progress=progress,
        )
        if apps
        else {"rows": [], "prompts": []}
    )
    bench_rows = [{k: r[k] for k in ("app", "method", "models", "seeds", "metrics")} | {"row": r["row"]} for r in bench["rows"]]
    pictures = _pictures(installed, out, progress)
    rows = base_rows + bench_rows
    missing = [a.id for a in APPS.values() if a.id not in apps]
    note = (
        f"Models: the ShapeWorld zoo ({', '.join(installed)}). Apps without their models installed: "
        f"{', '.join(missing) or 'none'}. Few seeds ({SEEDS} per prompt, {PROMPTS} prompts per app, {STEPS} DDIM steps): "
        "a smoke view; `multifusion bench all` gives the numbers with confidence intervals."
    )
    report = {"note": note, "rows": rows, "wall_time_s": round(time.perf_counter() - start, 1)}
    write_text(out / "report.json", json.dumps(report, indent=2))
    lines = [
        "# multifusion demo",
        "",
        note,
        "",
        "## Each model alone (app `base`): its own captions, then another model's",
        "",
        "| model | prompts | success | scene | shape | colour | texture | instance success |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in base_rows:
        m = r["metrics"]
        lines.append(
            f"| {r['models'][0]} | {r['prompts']} | {fmt(m['success'])} | {fmt(m.get('scene'))} | {fmt(m.get('attr/shape'))} | "
            f"{fmt(m.get('attr/colour'))} | {fmt(m.get('attr/texture'))} | {fmt(m.get('isr'))} |"
        )
    lines += [
        "",
        "![each model on its own captions](base-grid.png)",
        "",
        "## Apps",
        "",
        "| app | row | method | models | success |",
        "|---|---|---|---|---|",
    ]
    for r in bench_rows:
        lines.append(
            f"| {r['app']} | {r['row']} | {r['method']} | {', '.join(r['models'])} | {fmt(r['metrics'].get('success'))} |"
        )
    if apps:
        lines += ["", "![methods side by side](bench/grid.png)"]
    for p in pictures:
        if p.endswith(".png"):
            lines += ["", f"![{Path(p).stem}]({p})"]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def _tiny_demo(out: Path, progress: bool) -> Path:
    """The demo's shape on tiny random models, for builds without zoo weights."""
    from PIL import Image

    from multifusion.api import generate_to_folder
    from multifusion.loading import load_models
    from multifusion.zoo.tiny import build_tiny_pipeline

    paths = []
    for name, seed in (("tiny-general", 0), ("tiny-expert", 1)):
        path = out / "models" / name
        if not (path / "model_index.json").exists():
            build_tiny_pipeline(path, seed=seed, text_seed=0, vae_seed=0)
        paths.append(str(path))
    handles = load_models(paths, names=["tiny-general", "tiny-expert"])
    prompts = ["a red circle in a snowy field", "a blue striped square"]
    sampling = {"num_inference_steps": 20, "seed": 0, "num_images": SEEDS}
    # Mixture of Diffusers: each model paints an overlapping side of the canvas with its own prompt.
    sides = {
        "regions": [
            {"row_init": 0, "row_end": 1, "col_init": 0, "col_end": 0.625, "units": "fraction", "prompt": prompts[0], "model": 0},
            {"row_init": 0, "row_end": 1, "col_init": 0.375, "col_end": 1, "units": "fraction", "prompt": prompts[1], "model": 1},
        ]
    }
    rows, grid_rows, labels = [], [], []
    for app, method, which in (
        ("base", "single", [0]),
        ("base", "single", [1]),
        ("fine-grained", "average", [0, 1]),
        ("fine-grained", "snb", [0, 1]),
        ("aggregation", "amdm", [0, 1]),
        ("regional", "mod", [0, 1]),
    ):
        recipe = {
            "method": method,
            "models": [{"model": paths[i], "name": handles[i].name, "prompt": prompts[i]} for i in which],
            "sampling": sampling,
        }
        if method == "mod":
            recipe["params"] = sides
        tag = f"{method}-{'+'.join(handles[i].name for i in which)}"
        written = generate_to_folder(
            recipe,
            out,
            stem=tag,
            models=[handles[i] for i in which],
            progress=progress,
            export_masks=method in ("snb", "amdm", "mod"),
            overwrite=True,
        )
        grid_rows.append(
            [Image.open(p).convert("RGB") for p in written if p.name.endswith(tuple(f"-s{s}.png" for s in range(SEEDS)))]
        )
        labels.append(tag)
        rows.append({"app": app, "method": method, "models": [handles[i].name for i in which], "seeds": SEEDS, "metrics": {}})
    save_png(grid(grid_rows, labels, [f"seed {s}" for s in range(SEEDS)]), out / "grid.png")
    note = (
        "Models: tiny randomly initialised test models (no ShapeWorld zoo weights are installed in this build), "
        "so the images are noise and no quality metric is reported; the demo shows the methods running end to end."
    )
    write_text(out / "report.json", json.dumps({"note": note, "rows": rows}, indent=2))
    lines = [
        "# multifusion demo",
        "",
        note,
        "",
        "![comparison grid](grid.png)",
        "",
        "| app | method | models | seeds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['app']} | {r['method']} | {', '.join(r['models'])} | {r['seeds']} |" for r in rows]
    lines += [
        "",
        "Who painted which pixel in the SNB fusion (first image; per step: mask, then each model's salience):",
        "",
        "![SNB masks](snb-tiny-general+tiny-expert-s0-masks.png)",
        "",
        "What AMDM's meetings changed (first image; per meeting step: the aggregate, then each model before and after):",
        "",
        "![AMDM strip](amdm-tiny-general+tiny-expert-s0-amdm.png)",
        "",
        (
            "Which region's prediction each pixel of the Mixture of Diffusers canvas takes (all regions mixed, then each "
            "region's share):"
        ),
        "",
        "![region weights](mod-tiny-general+tiny-expert-s0-regions.png)",
    ]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def run_demo(out: str | Path, *, progress: bool = True, tiny: bool = False) -> Path:
    """Write the demo into `out` and return the path of report.md. `tiny` forces the fallback."""
    from multifusion.loading import zoo_models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    installed = [] if tiny else zoo_models()
    return _zoo_demo(installed, out, progress) if installed else _tiny_demo(out, progress)
