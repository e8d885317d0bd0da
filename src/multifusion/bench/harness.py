"""Running the benchmark: samples, resuming, sharding, merging and writing the results.

Layout of an output folder::

    OUT/settings.json                       what the samples were made with (refused if different)
    OUT/samples/APP/ROW/p0003-s000017.json  one finished sample: judge readings (one per view), features, recipe
    OUT/samples/APP/ROW/p0003-s000002.png   its image (kept for the first GRID_SEEDS seeds)
    OUT/results.json  results.csv  results.md  grid.png

A *sample* is one image: (app, row, prompt index, seed). Samples are computed in *units*: up to
``batch_size`` consecutive seeds of one prompt of one row, always the same seeds whatever the
run, so an image never depends on which process made it or on when a run was interrupted. A
unit is done when every one of its sample files exists; files are written atomically, so an
interrupted run leaves none half-written and the next run redoes only unfinished units.

Sharding: under ``accelerate launch --num_processes K`` process ``i`` takes units
``u`` with ``u % K == i`` (in one fixed enumeration of every unit); after all processes are
done (``wait_for_everyone``) the main process merges the sample files, in a fixed order, into
the same results a single process writes.

Confidence intervals (95 %), over the images of a row (every prompt x seed):

- ``image`` apps (success is one yes/no per image): the Wilson score interval;
- ``instance`` apps (success pools the objects of all images): a percentile bootstrap that
  resamples images (the objects of one image are not independent), 2,000 resamples from a
  fixed generator, so the interval is reproducible.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
import shutil
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.bench.apps import APPS, PROMPT_SEED, App, AppPrompt, Row, resolve_apps
from multifusion.errors import ModelLoadError, RecipeError, did_you_mean

FORMAT = 2
GRID_SEEDS = 4
"""Images of the first GRID_SEEDS seeds of every prompt are kept as PNG (the grid shows prompt 0)."""
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"

# ----------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial rate ``successes / n`` (Wilson 1927): unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 (n) successes the bound is exactly 0 (1); the formula leaves float round-off.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def bootstrap_interval(hits: Sequence[int], trials: Sequence[int], *, level: float = CI_LEVEL,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled rate ``sum(hits) / sum(trials)``, resampling
    whole images (clusters): ``hits[i]`` of ``trials[i] > 0`` objects of image ``i`` succeeded."""
    h, t = np.asarray(hits, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    if h.shape != t.shape or h.ndim != 1 or not len(h) or (t <= 0).any():
        raise ValueError("hits and trials must be equally long, non-empty, with trials > 0")
    idx = np.random.default_rng(seed).integers(0, len(h), size=(resamples, len(h)))  # (R, n)
    rates = h[idx].sum(axis=1) / t[idx].sum(axis=1)
    lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sample_success(app: App, readings: Sequence[Mapping[str, Any]], targets: Sequence[Any]) -> tuple[int, int]:
    """(hits, trials) of one image read in one or more views (``readings[k]`` against
    ``targets[k]``): for ``image`` apps (1 or 0, 1), 1 when every view shows everything its
    target states; for ``instance`` apps the objects read right out of the objects stated."""
    from multifusion.zoo.metrics import instance_success_rate

    hits = trials = 0
    every = True
    for reading, spec in zip(readings, targets, strict=True):
        n = len(spec.objects)
        got = round(instance_success_rate([reading], [spec]) * n) if n else 0
        hits, trials = hits + got, trials + n
        every &= got == n
        every &= spec.background is None or reading["background"] == spec.background
        every &= spec.style is None or reading["style"] == spec.style
    return (hits, trials) if app.success == "instance" else (int(every), 1)


# ----------------------------------------------------------------------------- settings


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: str | Path, *, whole_below: int = 256 << 20) -> str:
    """Content hash of a file or a folder (names, sizes and bytes of every file; for files over
    ``whole_below`` bytes only the first and last MiB, so a multi-GB checkpoint costs nothing)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= whole_below:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def model_fingerprint(ref: str) -> str:
    from multifusion.loading import resolve

    r = resolve(ref)
    return f"hub:{ref}" if r.kind == "hub" else file_fingerprint(r.location)


@dataclass(frozen=True)
class Unit:
    """Consecutive seeds of one prompt of one row, sampled as one batch."""

    app: App
    row: Row
    prompt: AppPrompt
    seeds: tuple[int, ...]


def sample_path(out: Path, app: str, row: str, index: int, seed: int, suffix: str = ".json") -> Path:
    return out / "samples" / app / row / f"p{index:04d}-s{seed:06d}{suffix}"


def _recipe(row: Row, prompt: AppPrompt, refs: Mapping[str, str], common: Mapping[str, Any],
            seeds: Sequence[int], runtime: Mapping[str, Any] | None = None) -> dict:
    recipe = row.build(prompt, refs)
    recipe["sampling"] = {"num_inference_steps": common["num_inference_steps"], "scheduler": common["scheduler"],
                          "guidance_scale": common["guidance_scale"], "seed": int(seeds[0]), "num_images": len(seeds)}
    if runtime:
        recipe["runtime"] = dict(runtime)
    return recipe


def _compare_settings(out: Path, have: dict, want: dict) -> None:
    """RecipeError when the folder's samples were made with different settings."""
    fix = f"Results of different settings are never mixed: choose another --out, or delete {str(out)!r} to start over."
    if have.get("format") != want["format"]:
        raise RecipeError(f"--out {str(out)!r} holds benchmark results of another format ({have.get('format')}); {fix}")
    diffs = [f"{k} is {have['common'].get(k)!r} there and {v!r} here" for k, v in want["common"].items() if have["common"].get(k) != v]
    for app, spec in want["apps"].items():
        old = have.get("apps", {}).get(app)
        if old is None:
            continue
        for role, m in spec["models"].items():
            if role in old["models"] and old["models"][role]["sha"] != m["sha"]:
                diffs.append(f"model {role!r} of app {app!r} has different weights ({old['models'][role]['ref']} there, {m['ref']} here)")
        for row, sha in spec["rows"].items():
            if row in old["rows"] and old["rows"][row] != sha:
                diffs.append(f"row {row!r} of app {app!r} builds a different recipe")
    if diffs:
        raise RecipeError(f"--out {str(out)!r} holds benchmark results made with different settings: " + "; ".join(diffs) + ". " + fix)


def _merge_settings(have: dict | None, want: dict) -> dict:
    if have is None:
        return want
    merged = json.loads(json.dumps(have))
    for app, spec in want["apps"].items():
        old = merged["apps"].setdefault(app, {"models": {}, "rows": {}})
        old["models"].update(spec["models"])
        old["rows"].update(spec["rows"])
    return merged


# ----------------------------------------------------------------------------- planning


def _resolve_models(apps: list[App], models: Mapping[str, str] | None) -> dict[str, dict[str, str]]:
    """Model reference per app and role: the override, else zoo:ROLE (which must be installed)."""
    from multifusion import loading

    models = dict(models or {})
    known = sorted({r for a in APPS.values() for r in a.roles})
    for role in models:
        if role not in known:
            raise RecipeError(f"models: unknown model role {role!r} (roles: {', '.join(known)}){did_you_mean(role, known)}")
    installed = loading.zoo_models()
    refs, missing = {}, []
    for app in apps:
        refs[app.id] = {}
        for role in app.roles:
            if role in models:
                refs[app.id][role] = str(models[role])
            else:
                refs[app.id][role] = f"zoo:{role}"
                if role not in installed:
                    missing.append((app.id, role))
    if missing:
        needed: dict[str, list[str]] = {}
        for app_id, role in missing:
            needed.setdefault(role, []).append(app_id)
        listed = ", ".join(f"zoo model {r!r} (needed by {', '.join(a)})" for r, a in needed.items())
        first = next(iter(needed))
        raise ModelLoadError(
            f"{listed}: not installed in this build (installed zoo models: {', '.join(installed) or 'none'}). "
            f"Train and install with `python -m multifusion.zoo.train --out runs/zoo --models {','.join(needed)} --install` "
            f"(see docs/zoo.md), or point a role at another model with --model {first}=PATH (Python: models={{{first!r}: PATH}})"
        )
    return refs


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import torch
    import transformers

    from multifusion import __version__

    return {"multifusion": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "numpy": np.__version__, "platform": platform.platform()}


def _check_args(seeds: int, prompts: int, steps: int, batch_size: int, guidance_scale: float, scheduler: str, dtype: str) -> None:
    from multifusion.loading import DTYPES
    from multifusion.loop import scheduler_class

    for name, v in (("seeds", seeds), ("prompts", prompts), ("num_inference_steps (--steps)", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise RecipeError(f"{name} must be a positive integer, got {v!r}")
    if not guidance_scale >= 0:
        raise RecipeError(f"guidance_scale (--cfg) must be >= 0, got {guidance_scale!r}")
    if dtype not in DTYPES:
        raise RecipeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    scheduler_class(scheduler)


# ----------------------------------------------------------------------------- running


def _run_unit(unit: Unit, handles: Mapping[str, Any], refs: Mapping[str, str], common: Mapping[str, Any],
              runtime: Mapping[str, Any], judge: Any, out: Path) -> int:
    """Sample, judge and write one unit; returns the number of images made."""
    from multifusion.api import iter_run
    from multifusion.io import image_metadata, save_png, write_text
    from multifusion.recipe import parse_recipe

    recipe = parse_recipe(_recipe(unit.row, unit.prompt, refs, common, unit.seeds, runtime))
    start = time.perf_counter()
    parts = list(iter_run(recipe, models=[handles[r] for r in unit.row.models], batch_size=len(unit.seeds),
                          seeds=list(unit.seeds), progress=False))
    images = [im for p in parts for im in p.images]
    views = unit.row.views(unit.prompt)
    crops = [np.asarray(im.crop(v.box) if v.box else im) for im in images for v in views]
    readings = judge.read(np.stack(crops))
    features = judge.features(np.stack(crops))
    seconds = (time.perf_counter() - start) / len(images)
    recipe_json = recipe.to_json()
    seams: list[float | None] = [None] * len(images)
    if unit.app.make_regions is not None:
        # Seams are scored at the row's own region edges; a row without regions (one prompt for
        # the whole image) is scored at the edges of the third-of-the-canvas layout, as a control.
        from multifusion.bench.apps import regions_per_slot, seam_columns, seam_score

        build = unit.row.build if unit.row.method == "mod" else regions_per_slot(unit.app.roles[0])
        params = build(unit.prompt, refs)["params"]
        factor = handles[unit.row.models[0]].vae_scale_factor
        columns = seam_columns(params, (images[0].size[1], images[0].size[0]), factor)
        seams = [seam_score(np.asarray(im), columns) for im in images]
    k = len(views)
    for i, (image, seed, seam) in enumerate(zip(images, unit.seeds, seams)):
        meta = image_metadata(recipe_json, seed)
        if seed < GRID_SEEDS:
            save_png(image, sample_path(out, unit.app.id, unit.row.id, unit.prompt.index, seed, ".png"), meta)
        record = {"app": unit.app.id, "row": unit.row.id, "method": unit.row.method, "models": list(unit.row.models),
                  "prompt_index": unit.prompt.index, "seed": seed, "prompts": dict(unit.prompt.prompts),
                  "target": unit.prompt.caption, "readings": readings[i * k:(i + 1) * k],
                  "features": [[float(x) for x in f] for f in features[i * k:(i + 1) * k]],
                  "seconds": seconds, "recipe": meta["recipe"]}
        if seam is not None:
            record["seam"] = seam
        # The JSON is written last: it is the mark of a finished sample.
        write_text(sample_path(out, unit.app.id, unit.row.id, unit.prompt.index, seed), json.dumps(record, sort_keys=True))
    return len(images)


def _plan(chosen: list[App], refs: dict[str, dict[str, str]], prompts: int, common: dict, runtime: dict):
    """Rows and prompts of every app, every recipe validated (before any model loads), and the
    settings record: common settings, model content hashes, row recipe hashes."""
    from multifusion.recipe import parse_recipe, validate_recipe

    plan: list[tuple[App, list[Row], list[AppPrompt]]] = []
    skipped: dict[str, list[str]] = {}
    want: dict[str, Any] = {"format": FORMAT, "common": common, "apps": {}}
    hashes: dict[str, str] = {}
    for app in chosen:
        rows, skipped[app.id] = app.rows()
        app_prompts = app.prompts(prompts)
        for row in rows:
            validate_recipe(parse_recipe(_recipe(row, app_prompts[0], refs[app.id], common, [0], runtime)))
        for ref in refs[app.id].values():
            hashes.setdefault(ref, model_fingerprint(ref))
        placeholders = {r: f"<{r}>" for r in app.roles}  # a row's hash must not depend on where models live
        want["apps"][app.id] = {
            "models": {r: {"ref": refs[app.id][r], "sha": hashes[refs[app.id][r]]} for r in app.roles},
            "rows": {row.id: _sha(_recipe(row, app_prompts[0], placeholders, common, [0])) for row in rows},
        }
        plan.append((app, rows, app_prompts))
    return plan, skipped, want


def _sync_settings(state: Any, out: Path, want: dict) -> None:
    """Refuse a folder of other settings (every process checks), then record ours (main only)."""
    from multifusion.io import write_text

    path = out / "settings.json"
    have = json.loads(path.read_text()) if path.is_file() else None
    if have is not None:
        _compare_settings(out, have, want)
    state.wait_for_everyone()  # every process has read the file before the main one rewrites it
    if state.is_main_process:
        write_text(path, json.dumps(_merge_settings(have, want), indent=2, sort_keys=True) + "\n")
    state.wait_for_everyone()


def _run_units(todo: list[Unit], refs: dict[str, dict[str, str]], common: dict, runtime: dict, judge: Any,
               out: Path, progress: bool) -> int:
    """Run this process's unfinished units (ordered by app, so each app's models load once)."""
    if not todo:
        return 0
    from tqdm.auto import tqdm

    from multifusion.loading import load_models

    handles: dict[str, dict[str, Any]] = {}
    computed = 0
    with tqdm(total=sum(len(u.seeds) for u in todo), desc="bench", unit="img", disable=not progress) as bar:
        for unit in todo:
            app = unit.app
            if app.id not in handles:
                loaded = load_models([refs[app.id][r] for r in app.roles], names=list(app.roles),
                                     dtype=runtime["dtype"], device=runtime["device"])
                handles = {app.id: dict(zip(app.roles, loaded))}  # one app's models held at a time
            bar.set_postfix_str(f"{app.id} {unit.row.id}", refresh=False)
            n = _run_unit(unit, handles[app.id], refs[app.id], common, runtime, judge, out)
            computed += n
            bar.update(n)
    return computed


def run_bench(
    apps: str | Sequence[str],
    out: str | Path,
    *,
    seeds: int = 64,
    prompts: int = 8,
    num_inference_steps: int = 30,
    scheduler: str = "ddim",
    guidance_scale: float = 7.5,
    batch_size: int = 16,
    models: Mapping[str, str] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    judge: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    update_doc: str | Path | None = None,
) -> dict | None:
    """Run the benchmark apps ``apps`` (an id, a list of ids, or ``"all"``) into ``out`` and
    return the results dict written to ``out/results.json`` (``None`` on the non-main
    processes of a sharded run).

    Each app runs ``prompts`` prompts x ``seeds`` seeds (seeds 0 .. seeds-1) through every row
    (each role alone, then each fusion method the registry has). ``models`` maps a role to a
    model reference (default ``zoo:ROLE``). ``batch_size`` images of one prompt are sampled
    together; ``threads`` sets torch's CPU threads (results are bit-identical across resumes
    and shards for one batch size and thread count). ``update_doc`` rewrites the part of a
    markdown file between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` with the tables.
    """
    import torch
    from accelerate import PartialState

    wall_start = time.perf_counter()
    chosen = resolve_apps(apps)
    _check_args(seeds, prompts, num_inference_steps, batch_size, guidance_scale, scheduler, dtype)
    if threads is not None:
        if threads <= 0:
            raise RecipeError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    out = Path(out)
    refs = _resolve_models(chosen, models)

    from multifusion import __version__
    from multifusion.zoo.judge import DEFAULT_WEIGHTS, load_judge

    judge_path = Path(judge) if judge is not None else DEFAULT_WEIGHTS
    judge_model = load_judge(judge_path)
    common = {"num_inference_steps": num_inference_steps, "scheduler": scheduler, "guidance_scale": float(guidance_scale),
              "dtype": dtype, "prompt_seed": PROMPT_SEED, "judge": file_fingerprint(judge_path), "multifusion": __version__}
    # PartialState only takes the CPU (gloo) path when told to; without CUDA that is the only one.
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    device = device or str(state.device)
    runtime = {"device": device, "dtype": dtype}
    # Batch size, thread count and device kind change float rounding: samples made with other
    # values are not mixed into one result.
    common.update(batch_size=batch_size, threads=torch.get_num_threads(), device=torch.device(device).type)

    plan, skipped, want = _plan(chosen, refs, prompts, common, runtime)
    _sync_settings(state, out, want)

    units = [Unit(app, row, p, tuple(range(s, min(s + batch_size, seeds))))
             for app, rows, app_prompts in plan for row in rows for p in app_prompts for s in range(0, seeds, batch_size)]
    mine = [u for i, u in enumerate(units) if i % state.num_processes == state.process_index]
    todo = [u for u in mine if not all(sample_path(out, u.app.id, u.row.id, u.prompt.index, s).is_file() for s in u.seeds)]
    computed = _run_units(todo, refs, common, runtime, judge_model, out, progress and state.is_main_process)
    state.wait_for_everyone()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        computed = sum(gather_object([computed]))
    if not state.is_main_process:
        return None

    results = merge_results(out, plan, seeds, judge_model)
    total = sum(r["images"] for r in results["rows"])
    results.update({
        "skipped": {k: v for k, v in skipped.items() if v},
        "settings": {**common, "seeds": seeds, "prompts_per_app": prompts, "apps": [a.id for a in chosen],
                     "models": refs, "batch_size": batch_size, "threads": torch.get_num_threads(), "device": device,
                     "num_processes": state.num_processes, "fingerprint": _sha(common),
                     "ci": "95%: Wilson score interval for image apps; percentile bootstrap over images "
                           f"({BOOTSTRAP_RESAMPLES} resamples, seed 0) for instance apps"},
        "versions": _versions(),
        "samples": {"total": total, "computed": computed, "reused": total - computed},
        "compute_time_s": round(sum(results["seconds_per_image"][f"{r['app']}/{r['row']}"] * r["images"] for r in results["rows"]), 3),
        "wall_time_s": round(time.perf_counter() - wall_start, 3),
    })
    write_results(out, results, plan)
    if update_doc is not None:
        write_doc(update_doc, results, out / "grid.png")
    return results


# ----------------------------------------------------------------------------- merging


def _reference_features(app: App, row: Row, prompts: Sequence[AppPrompt], seeds: int, judge: Any) -> np.ndarray:
    """Judge features of renders of every view's target scene of every sample (render noise
    seeded by prompt, seed and view): the reference set of the row's judge-FID."""
    from multifusion.zoo.render import render

    images = np.stack([render(v.scene, np.random.default_rng([PROMPT_SEED, zlib.crc32(app.id.encode()), p.index, s, k]))
                       for p in prompts for s in range(seeds) for k, v in enumerate(row.views(p))])
    return judge.features(images).numpy()


def _load_sample(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"sample {str(path)!r} is missing after every process finished; run the same command again to redo it")
    return json.loads(path.read_text())


def merge_results(out: str | Path, plan: Sequence[tuple[App, Sequence[Row], Sequence[AppPrompt]]], seeds: int, judge: Any) -> dict:
    """Rows and prompts from the sample files of ``out``: a pure function of those files, so a
    sharded run and a single process agree to the last digit."""
    from multifusion.zoo.metrics import judge_fid, summary

    out = Path(out)
    rows, prompt_list, success, timing = [], [], {}, {}
    for app, app_rows, prompts in plan:
        success[app.id] = {"kind": app.success, "definition": app.success_text}
        prompt_list += [p.to_json() for p in prompts]
        references: dict[Any, np.ndarray] = {}  # rows that read their images alike share one reference
        for row in app_rows:
            samples = [_load_sample(sample_path(out, app.id, row.id, p.index, s)) for p in prompts for s in range(seeds)]
            targets = [[v.target for v in row.views(p)] for p in prompts for _ in range(seeds)]
            hits, trials = zip(*(sample_success(app, s["readings"], t) for s, t in zip(samples, targets)))
            rate = sum(hits) / sum(trials)
            ci = wilson_interval(sum(hits), len(hits)) if app.success == "image" else bootstrap_interval(hits, trials)
            metrics: dict[str, Any] = {"success": rate, "success_ci": [ci[0], ci[1]]}
            metrics.update(summary([r for s in samples for r in s["readings"]], [t for ts in targets for t in ts]))
            features = np.array([f for s in samples for f in s["features"]])
            if len(features) >= 2:
                if row.views not in references:
                    references[row.views] = _reference_features(app, row, prompts, seeds, judge)
                metrics["judge_fid"] = judge_fid(features, references[row.views])
            if all("seam" in s for s in samples):
                metrics["seam"] = float(np.mean([s["seam"] for s in samples]))
            rows.append({"app": app.id, "method": row.method, "models": list(row.models), "row": row.id, "seeds": seeds,
                         "prompts": len(prompts), "images": len(samples), "metrics": metrics})
            # Timing is kept out of the rows: it is the one thing a resumed or sharded run changes.
            timing[f"{app.id}/{row.id}"] = float(np.mean([s["seconds"] for s in samples]))
    return {"rows": rows, "prompts": prompt_list, "success": success, "seconds_per_image": timing}


# ----------------------------------------------------------------------------- writing

_MD_COLUMNS = (("scene", "scene"), ("style", "style"), ("attr/shape", "shape"), ("attr/colour", "colour"),
               ("attr/texture", "texture"), ("attr/position", "position"), ("isr", "ISR"), ("judge_fid", "judge-FID"),
               ("seam", "seam"))


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def render_markdown(results: dict, grid: str | None = "grid.png") -> str:
    """The tables (one per app), settings and prompts, as markdown (no top-level title)."""
    s = results["settings"]
    v = results["versions"]
    lines = [
        f"Settings: {s['prompts_per_app']} prompts x {s['seeds']} seeds per app, {s['num_inference_steps']} "
        f"{s['scheduler']} steps, guidance scale {s['guidance_scale']}, {s['dtype']} on {s['device']} "
        f"({s['num_processes']} process(es), batch {s['batch_size']}, {s['threads']} thread(s)); wall time "
        f"{results['wall_time_s']:.0f} s, sampling time {results['compute_time_s']:.0f} s "
        f"({results['samples']['reused']} of {results['samples']['total']} images reused from earlier runs).",
        "",
        f"Versions: multifusion {v['multifusion']}, torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, accelerate {v['accelerate']}, Python {v['python']}.",
        "",
        f"Success intervals: {s['ci']}.",
        "",
    ]
    if grid:
        lines += [f"![comparison grid: rows are methods, columns the first seeds of prompt 0]({grid})", ""]
    by_app: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_app.setdefault(r["app"], []).append(r)
    for app, rows in by_app.items():
        cols = [(k, name) for k, name in _MD_COLUMNS if any(k in r["metrics"] for r in rows)]
        lines += [f"### {app}", "", f"Success ({results['success'][app]['kind']}): {results['success'][app]['definition']}.", ""]
        if results.get("skipped", {}).get(app):
            lines += [f"Not in this build yet (skipped): {', '.join(results['skipped'][app])}.", ""]
        lines += ["| row | models | success (95% CI) | " + " | ".join(n for _, n in cols) + " | s/image |",
                  "|---|---|---|" + "---|" * len(cols) + "---|"]
        for r in rows:
            m = r["metrics"]
            cells = [_fmt(m.get(k)) for k, _ in cols]
            lo, hi = m["success_ci"]
            lines.append(f"| {r['row']} | {', '.join(r['models'])} | {m['success']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         + " | ".join(cells) + f" | {results['seconds_per_image'][r['app'] + '/' + r['row']]:.3f} |")
        lines.append("")
    lines += ["### Prompts", "", "| app | # | target | prompts per model |", "|---|---|---|---|"]
    for p in results["prompts"]:
        given = "; ".join(f"{role}: {text}" for role, text in p["prompts"].items())
        if "regions" in p:
            given += "; regions: " + "; ".join(f"{slot}: {text}" for slot, text in p["regions"].items())
        lines.append(f"| {p['app']} | {p['index']} | {p['target']} | {given} |")
    return "\n".join(lines) + "\n"


def _csv(results: dict) -> str:
    keys = sorted({k for r in results["rows"] for k in r["metrics"]} - {"success", "success_ci"})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["app", "method", "models", "row", "seeds", "prompts", "images", "success", "success_lo", "success_hi", *keys, "seconds_per_image"])
    timing = results["seconds_per_image"]
    for r in results["rows"]:
        m = r["metrics"]
        w.writerow([r["app"], r["method"], "+".join(r["models"]), r["row"], r["seeds"], r["prompts"], r["images"],
                    m["success"], *m["success_ci"], *[m.get(k, "") for k in keys], timing[f"{r['app']}/{r['row']}"]])
    return buf.getvalue()


def make_grid(out: Path, plan: Sequence[tuple[App, Sequence[Row], Sequence[AppPrompt]]], seeds: int):
    """Rows = every row of every app; columns = the first seeds of prompt 0."""
    from PIL import Image

    from multifusion.io import grid

    shown = list(range(min(GRID_SEEDS, seeds)))
    cells, labels = [], []
    for app, rows, _ in plan:
        for row in rows:
            images = []
            for s in shown:
                path = sample_path(out, app.id, row.id, 0, s, ".png")
                images.append(Image.open(path).convert("RGB") if path.is_file() else Image.new("RGB", (64, 64), "grey"))
            cells.append(images)
            labels.append(f"{app.id}: {row.id}")
    return grid(cells, labels, [f"seed {s}" for s in shown])


def write_results(out: str | Path, results: dict, plan) -> None:
    """results.json, results.csv, results.md and grid.png, each written atomically."""
    from multifusion.io import save_png, write_text

    out = Path(out)
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "results.csv", _csv(results))
    write_text(out / "results.md", "# multifusion benchmark\n\n" + render_markdown(results))
    save_png(make_grid(out, plan, results["settings"]["seeds"]), out / "grid.png")


def write_doc(doc: str | Path, results: dict, grid_png: str | Path | None = None) -> Path:
    """Replace the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of the
    markdown file ``doc`` with the tables; the grid is copied beside it as ``<stem>-grid.png``."""
    from multifusion.io import write_text

    doc = Path(doc)
    if not doc.is_file():
        raise RecipeError(f"--update-doc: {str(doc)!r} does not exist")
    text = doc.read_text()
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1 or text.index(DOC_BEGIN) > text.index(DOC_END):
        raise RecipeError(f"--update-doc: {str(doc)!r} needs one {DOC_BEGIN} line followed by one {DOC_END} line around the tables")
    grid_name = None
    if grid_png is not None and Path(grid_png).is_file():
        grid_name = f"{doc.stem}-grid.png"
        from multifusion.io import atomic_path

        with atomic_path(doc.parent / grid_name) as tmp:
            shutil.copyfile(grid_png, tmp)
    head, rest = text.split(DOC_BEGIN)
    _, tail = rest.split(DOC_END)
    return write_text(doc, head + DOC_BEGIN + "\n" + render_markdown(results, grid_name) + DOC_END + tail)
