"""Running the benchmark (``run_bench``): samples in units, resuming, sharding across processes.

A *sample* is one image: (app, row, prompt index, seed), kept as one file of the output folder
(:mod:`multifusion.bench.layout`). Samples are computed in *units*: up to ``batch_size``
consecutive seeds of one prompt of one row, always the same seeds whatever the run, so an image
never depends on which process made it or on when a run was interrupted. A unit is done when
every one of its sample files exists; files are written atomically, so an interrupted run leaves
none half-written and the next run redoes only unfinished units.

Sharding: under ``accelerate launch --num_processes K`` process ``i`` takes units
``u`` with ``u % K == i`` (in one fixed enumeration of every unit); after all processes are
done (``wait_for_everyone``) the main process merges the sample files, in a fixed order, into
the same results a single process writes (:mod:`multifusion.bench.merge`), and writes them
(:mod:`multifusion.bench.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.bench.apps import LORA_ROLES, PROMPT_SEED, App, AppPrompt, Row, resolve_apps, role_loras
from multifusion.bench.layout import GRID_SEEDS, sample_name, sample_path
from multifusion.bench.merge import merge_results
from multifusion.bench.report import write_doc, write_results
from multifusion.bench.settings import (
    check_args,
    json_fingerprint,
    resolve_models,
    row_recipe,
    settings_record,
    sync_settings,
    versions,
)
from multifusion.bench.stats import CI_TEXT
from multifusion.errors import RecipeError, did_you_mean
from multifusion.io import file_fingerprint


@dataclass(frozen=True)
class Unit:
    """Consecutive seeds of one prompt of one row, sampled as one batch."""

    app: App
    row: Row
    prompt: AppPrompt
    seeds: tuple[int, ...]


def _run_unit(
    unit: Unit,
    handles: Mapping[str, Any],
    refs: Mapping[str, str],
    common: Mapping[str, Any],
    runtime: Mapping[str, Any],
    judge: Any,
    out: Path,
) -> int:
    """Sample, judge and write one unit; returns the number of images made."""
    from multifusion.api import write_images
    from multifusion.io import write_text
    from multifusion.recipe import parse_recipe

    def image_name(seed: int) -> Path | None:
        return sample_name(unit.app.id, unit.row.id, unit.prompt.index, seed, ".png") if seed < GRID_SEEDS else None

    recipe = parse_recipe(row_recipe(unit.row, unit.prompt, refs, common, unit.seeds, runtime))
    start = time.perf_counter()
    # A unit is sampled whole, in one batch (batch size changes float rounding): an image an
    # interrupted unit left behind is made again (`overwrite`), never kept.
    [made] = write_images(
        recipe,
        out,
        image_name,
        seeds=unit.seeds,
        models=[handles[r] for r in unit.row.models],
        batch_size=len(unit.seeds),
        overwrite=True,
        progress=False,
    )
    images = made.result.images
    views = unit.row.views(unit.prompt)
    crops = [np.asarray(im.crop(v.box) if v.box else im) for im in images for v in views]
    readings = judge.read(np.stack(crops))
    features = judge.features(np.stack(crops))
    seconds = (time.perf_counter() - start) / len(images)
    seams: list[float | None] = [None] * len(images)
    if unit.app.make_regions is not None:
        # Seams are scored at the row's own region edges; a row without regions (one prompt for
        # the whole image) is scored, as a control, at the edges of the MoD layout of its canvas:
        # the tiles on the tile canvas, the thirds on the native one.
        from multifusion.bench.apps import regions_per_slot, seam_columns, seam_score, tile_canvas, tiles_per_slot

        wide = (images[0].size[1], images[0].size[0]) == tile_canvas()
        control = tiles_per_slot(unit.app.roles[0]) if wide else regions_per_slot(unit.app.roles[0])
        params = unit.row.build(unit.prompt, refs)["params"]
        if not (params.get("regions") or params.get("tiles")):
            params = control(unit.prompt, refs)["params"]
        factor = handles[unit.row.models[0]].vae_scale_factor
        columns = seam_columns(params, (images[0].size[1], images[0].size[0]), factor)
        seams = [seam_score(np.asarray(im), columns) for im in images]
    k = len(views)
    for i, (seed, seam) in enumerate(zip(unit.seeds, seams)):
        record = {
            "app": unit.app.id,
            "row": unit.row.id,
            "method": unit.row.method,
            "models": list(unit.row.models),
            "prompt_index": unit.prompt.index,
            "seed": seed,
            "prompts": dict(unit.prompt.prompts),
            "target": unit.prompt.caption,
            "readings": readings[i * k : (i + 1) * k],
            "features": [[float(x) for x in f] for f in features[i * k : (i + 1) * k]],
            "seconds": seconds,
            "recipe": made.metadata[i]["recipe"],
        }
        if seam is not None:
            record["seam"] = seam
        # The JSON is written last: it is the mark of a finished sample.
        write_text(sample_path(out, unit.app.id, unit.row.id, unit.prompt.index, seed), json.dumps(record, sort_keys=True))
    return len(images)


def _plan(
    chosen: list[App],
    refs: dict[str, dict[str, str]],
    prompts: int,
    common: dict,
    runtime: dict,
    only: Sequence[str] | None = None,
):
    """Rows and prompts of every app (only the rows named in `only`, when given), every recipe
    validated before any model loads (or is hashed), and the fusion rows each app skips
    because the registry lacks their method."""
    from multifusion.recipe import parse_recipe
    from multifusion.validate import validate_recipe

    plan: list[tuple[App, list[Row], list[AppPrompt]]] = []
    skipped: dict[str, list[str]] = {}
    if only is not None:
        known = {r.id for app in chosen for r in app.rows()[0]}
        unknown = [r for r in only if r not in known]
        if unknown or not only:
            raise RecipeError(
                f"rows: {', '.join(unknown) or 'none given'}: not a row of {', '.join(a.id for a in chosen)} "
                f"(rows: {', '.join(sorted(known))}){did_you_mean(unknown[0], known) if unknown else ''}"
            )
    for app in chosen:
        rows, skipped[app.id] = app.rows()
        # The zoo's LoRAs fit the zoo's general only: with another model in a LoRA role's base
        # role, the rows of LoRA roles are skipped (and listed as skipped).
        moved = {r for r in app.roles if r in LORA_ROLES and refs[app.id][r] != f"zoo:{LORA_ROLES[r].base}"}
        skipped[app.id] += [r.id for r in rows if set(r.models) & moved]
        rows = [r for r in rows if not set(r.models) & moved and (only is None or r.id in only)]
        if not rows:
            continue
        app_prompts = app.prompts(prompts)
        for row in rows:
            validate_recipe(parse_recipe(row_recipe(row, app_prompts[0], refs[app.id], common, [0], runtime)))
        plan.append((app, rows, app_prompts))
    return plan, skipped


def _run_units(
    todo: list[Unit], refs: dict[str, dict[str, str]], common: dict, runtime: dict, judge: Any, out: Path, progress: bool
) -> int:
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
                # The roles this run's rows of the app use. The LoRA roles load apart from the plain
                # ones: among themselves they hold their base once, and a plain model stays a model
                # without adapters (a weight merge refuses a module that carries any).
                roles = [r for r in app.roles if any(r in u.row.models for u in todo if u.app.id == app.id)]
                handles = {app.id: {}}  # one app's models held at a time
                for group in ([r for r in roles if r not in LORA_ROLES], [r for r in roles if r in LORA_ROLES]):
                    if group:
                        loaded = load_models(
                            [refs[app.id][r] for r in group],
                            names=group,
                            loras=[role_loras(r) for r in group],
                            dtype=runtime["dtype"],
                            device=runtime["device"],
                        )
                        handles[app.id].update(zip(group, loaded))
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
    rows: Sequence[str] | None = None,
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
    ``rows`` runs only the rows of these ids (say, one new method beside tables made before: the
    other rows' numbers do not change, the harness being deterministic).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from multifusion.version import __version__
    from multifusion.zoo.judge import DEFAULT_WEIGHTS, load_judge

    wall_start = time.perf_counter()
    chosen = resolve_apps(apps)
    check_args(seeds, prompts, num_inference_steps, batch_size, guidance_scale, scheduler, dtype, threads)
    if device is not None:
        from multifusion.validate import check_device

        check_device("device", device)
    out = Path(out)
    from multifusion.io import check_output_dir

    check_output_dir("out", out)  # before the judge and the models load
    if threads is not None:
        torch.set_num_threads(threads)
    refs = resolve_models(chosen, models)

    judge_path = Path(judge) if judge is not None else DEFAULT_WEIGHTS
    judge_model = load_judge(judge_path)
    common = {
        "num_inference_steps": num_inference_steps,
        "scheduler": scheduler,
        "guidance_scale": float(guidance_scale),
        "dtype": dtype,
        "prompt_seed": PROMPT_SEED,
        "judge": file_fingerprint(judge_path),
        "multifusion": __version__,
    }
    # PartialState only takes the CPU (gloo) path when told to; without CUDA that is the only one.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    device = device or str(state.device)
    runtime = {"device": device, "dtype": dtype}
    # Batch size, thread count and device kind change float rounding: samples made with other
    # values are not mixed into one result.
    common.update(batch_size=batch_size, threads=torch.get_num_threads(), device=torch.device(device).type)

    plan, skipped = _plan(chosen, refs, prompts, common, runtime, rows)
    sync_settings(state, out, settings_record(plan, refs, common))

    units = [
        Unit(app, row, p, tuple(range(s, min(s + batch_size, seeds))))
        for app, rows, app_prompts in plan
        for row in rows
        for p in app_prompts
        for s in range(0, seeds, batch_size)
    ]
    mine = [u for i, u in enumerate(units) if i % state.num_processes == state.process_index]
    todo = [u for u in mine if not all(sample_path(out, u.app.id, u.row.id, u.prompt.index, s).is_file() for s in u.seeds)]
    computed = _run_units(todo, refs, common, runtime, judge_model, out, progress and state.is_main_process)
    state.wait_for_everyone()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        computed = sum(gather_object([computed]))
    # The last collective. Without this a gloo process can abort at exit (its worker threads
    # outlive the interpreter), failing a run whose samples are all written.
    state.destroy_process_group()
    if not state.is_main_process:
        return None

    results = merge_results(out, plan, seeds, judge_model)
    total = sum(r["images"] for r in results["rows"])
    results.update(
        {
            "skipped": {k: v for k, v in skipped.items() if v},
            "settings": {
                **common,
                "seeds": seeds,
                "prompts_per_app": prompts,
                "apps": [a.id for a in chosen],
                "models": refs,
                "batch_size": batch_size,
                "threads": torch.get_num_threads(),
                "device": device,
                "num_processes": state.num_processes,
                "fingerprint": json_fingerprint(common),
                "ci": CI_TEXT,
            },
            "versions": versions(),
            "samples": {"total": total, "computed": computed, "reused": total - computed},
            "compute_time_s": round(
                sum(results["seconds_per_image"][f"{r['app']}/{r['row']}"] * r["images"] for r in results["rows"]), 3
            ),
            "wall_time_s": round(time.perf_counter() - wall_start, 3),
        }
    )
    write_results(out, results, plan)
    if update_doc is not None:
        write_doc(update_doc, results, out / "grid.png")
    return results
