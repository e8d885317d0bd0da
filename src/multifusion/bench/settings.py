"""What a benchmark run's samples are made with, and the checks that keep runs apart.

The *settings record* (``OUT/settings.json``) holds the common settings (steps, scheduler,
guidance, dtype, batch size, threads, device kind, judge and package version), a content hash
of every model per app and role, and a hash of every row's recipe. A folder whose record
differs is refused, so samples of different settings are never mixed; apps and rows a folder
does not have yet are added to its record. Model hashes are of content, not of paths, so the
same weights elsewhere are the same model.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.bench.apps import APPS, LORA_ROLES, App, AppPrompt, Row, zoo_needs
from multifusion.errors import ModelLoadError, RecipeError, did_you_mean
from multifusion.io import file_fingerprint

FORMAT = 2
"""Version of the folder layout and settings record; a folder of another format is refused."""

# ----------------------------------------------------------------------------- fingerprints


def json_fingerprint(data: Any) -> str:
    """Short content hash of JSON-able ``data`` (keys sorted, so dict order does not count)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(ref: str) -> str:
    """``hub:REF`` for a Hub id (its files are not read), else the content hash of its file or folder."""
    from multifusion.loading import resolve

    r = resolve(ref)
    return f"hub:{ref}" if r.kind == "hub" else file_fingerprint(r.location)


def role_fingerprint(role: str, model_sha: str) -> str:
    """A role's fingerprint: its model's, and for a LoRA role each of its LoRA files' and scales."""
    if role not in LORA_ROLES:
        return model_sha
    from multifusion.lora import lora_file

    parts = [f"{file_fingerprint(str(lora_file(e['path'])))}*{e['scale']}" for e in LORA_ROLES[role].entries()]
    return "+".join([model_sha, *parts])


# ----------------------------------------------------------------------------- the settings record


def row_recipe(
    row: Row,
    prompt: AppPrompt,
    refs: Mapping[str, str],
    common: Mapping[str, Any],
    seeds: Sequence[int],
    runtime: Mapping[str, Any] | None = None,
) -> dict:
    """The recipe dict of ``seeds`` (consecutive) of one prompt of one row, with the run's sampling settings."""
    recipe = row.build(prompt, refs)
    # A row's own sampling fields (a canvas size) stay; the run's settings are added over them.
    recipe["sampling"] = {
        **recipe.get("sampling", {}),
        "num_inference_steps": common["num_inference_steps"],
        "scheduler": common["scheduler"],
        "guidance_scale": common["guidance_scale"],
        "seed": int(seeds[0]),
        "num_images": len(seeds),
    }
    if runtime:
        recipe["runtime"] = dict(runtime)
    return recipe


def settings_record(
    plan: Sequence[tuple[App, Sequence[Row], Sequence[AppPrompt]]],
    refs: Mapping[str, Mapping[str, str]],
    common: Mapping[str, Any],
) -> dict:
    """The settings record of a run: ``common``, each app's model hashes per role and row recipe hashes."""
    record: dict[str, Any] = {"format": FORMAT, "common": common, "apps": {}}
    hashes: dict[str, str] = {}  # a model shared by apps is hashed once
    for app, rows, prompts in plan:
        for ref in refs[app.id].values():
            hashes.setdefault(ref, model_fingerprint(ref))
        placeholders = {r: f"<{r}>" for r in app.roles}  # a row's hash must not depend on where models live
        record["apps"][app.id] = {
            "models": {r: {"ref": refs[app.id][r], "sha": role_fingerprint(r, hashes[refs[app.id][r]])} for r in app.roles},
            "rows": {row.id: json_fingerprint(row_recipe(row, prompts[0], placeholders, common, [0])) for row in rows},
        }
    return record


def _compare_settings(out: Path, have: dict, want: dict) -> None:
    """RecipeError when the folder's samples were made with different settings."""
    fix = f"Results of different settings are never mixed: choose another output folder, or delete {str(out)!r} to start over."
    if have.get("format") != want["format"]:
        raise RecipeError(f"out: {str(out)!r} holds benchmark results of another format ({have.get('format')}); {fix}")
    diffs = [
        f"{k} is {have['common'].get(k)!r} there and {v!r} here" for k, v in want["common"].items() if have["common"].get(k) != v
    ]
    for app, spec in want["apps"].items():
        old = have.get("apps", {}).get(app)
        if old is None:
            continue
        for role, m in spec["models"].items():
            if role in old["models"] and old["models"][role]["sha"] != m["sha"]:
                diffs.append(
                    f"model {role!r} of app {app!r} has different weights ({old['models'][role]['ref']} there, {m['ref']} here)"
                )
        for row, sha in spec["rows"].items():
            if row in old["rows"] and old["rows"][row] != sha:
                diffs.append(f"row {row!r} of app {app!r} builds a different recipe")
    if diffs:
        raise RecipeError(
            f"out: {str(out)!r} holds benchmark results made with different settings: " + "; ".join(diffs) + ". " + fix
        )


def _merge_settings(have: dict | None, want: dict) -> dict:
    """The folder's record with the apps, models and rows of ``want`` added (``want`` is compatible)."""
    if have is None:
        return want
    merged = json.loads(json.dumps(have))
    for app, spec in want["apps"].items():
        old = merged["apps"].setdefault(app, {"models": {}, "rows": {}})
        old["models"].update(spec["models"])
        old["rows"].update(spec["rows"])
    return merged


def sync_settings(state: Any, out: Path, want: dict) -> None:
    """Refuse a folder of other settings (every process checks), then record ours (main only).
    ``state`` is accelerate's ``PartialState`` of the run."""
    from multifusion.io import write_text

    path = out / "settings.json"
    have = json.loads(path.read_text()) if path.is_file() else None
    if have is not None:
        _compare_settings(out, have, want)
    state.wait_for_everyone()  # every process has read the file before the main one rewrites it
    if state.is_main_process:
        write_text(path, json.dumps(_merge_settings(have, want), indent=2, sort_keys=True) + "\n")
    state.wait_for_everyone()


def versions() -> dict[str, str]:
    """Versions of the package, Python, the libraries that change numbers, and the platform."""
    import accelerate
    import diffusers
    import torch
    import transformers

    from multifusion.version import __version__

    return {
        "multifusion": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- arguments and models


def check_args(
    seeds: int, prompts: int, steps: int, batch_size: int, guidance_scale: float, scheduler: str, dtype: str, threads: int | None
) -> None:
    """RecipeError on the first bad argument of ``run_bench``, before anything loads."""
    from multifusion.loading import DTYPES
    from multifusion.schedulers import scheduler_class

    counts = (
        ("seeds", seeds),
        ("prompts", prompts),
        ("num_inference_steps", steps),
        ("batch_size", batch_size),
        ("threads", 1 if threads is None else threads),
    )
    for name, v in counts:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise RecipeError(f"{name} must be a positive integer, got {v!r}")
    from multifusion.recipe import MAX_GUIDANCE

    if not 0 <= guidance_scale <= MAX_GUIDANCE:  # NaN fails too
        raise RecipeError(f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE:g}], got {guidance_scale!r}")
    if dtype not in DTYPES:
        raise RecipeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    scheduler_class(scheduler)


def resolve_models(apps: list[App], models: Mapping[str, str] | None) -> dict[str, dict[str, str]]:
    """Model reference per app and role: the override, else zoo:ROLE (which must be installed).
    A LoRA role (:data:`LORA_ROLES`) is its base role's model: it follows that role's override,
    and its zoo LoRAs must be installed."""
    from multifusion.loading import zoo_models
    from multifusion.lora import zoo_loras

    models = dict(models or {})
    known = sorted({r for a in APPS.values() for r in a.roles if r not in LORA_ROLES})
    for role in models:
        if role in LORA_ROLES:
            raise RecipeError(
                f"models: role {role!r} is the {LORA_ROLES[role].base!r} model with zoo LoRAs; "
                f"point {LORA_ROLES[role].base!r} at another model instead (--model {LORA_ROLES[role].base}=PATH)"
            )
        if role not in known:
            raise RecipeError(f"models: unknown model role {role!r} (roles: {', '.join(known)}){did_you_mean(role, known)}")
    installed, installed_loras = zoo_models(), zoo_loras()
    refs, missing, missing_loras = {}, [], {}
    for app in apps:
        refs[app.id] = {}
        for role in app.roles:
            base = LORA_ROLES[role].base if role in LORA_ROLES else role
            if base in models:
                refs[app.id][role] = str(models[base])
            else:
                refs[app.id][role] = f"zoo:{base}"
                if base not in installed:
                    missing.append((app.id, base))
            for name in zoo_needs([role])[1] - set(installed_loras):
                missing_loras.setdefault(name, []).append(app.id)
    if missing:
        needed: dict[str, list[str]] = {}
        for app_id, role in missing:
            needed.setdefault(role, []).append(app_id)
        listed = ", ".join(f"zoo model {r!r} (needed by {', '.join(dict.fromkeys(a))})" for r, a in needed.items())
        first = next(iter(needed))
        raise ModelLoadError(
            f"{listed}: not installed in this build (installed zoo models: {', '.join(installed) or 'none'}). "
            f"Train and install with `multifusion zoo train --out runs/zoo --models {','.join(needed)} --install` "
            f"(see docs/zoo.md), or point a role at another model with models={{{first!r}: PATH}} (CLI: --model {first}=PATH)"
        )
    if missing_loras:
        listed = ", ".join(f"zoo LoRA {n!r} (needed by {', '.join(dict.fromkeys(a))})" for n, a in missing_loras.items())
        raise ModelLoadError(
            f"{listed}: not installed in this build. Train and install with "
            f"`multifusion zoo train-lora --out runs/loras --loras {','.join(missing_loras)} --install` (docs/zoo-training.md)"
        )
    return refs
