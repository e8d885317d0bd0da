"""From the sample files of an output folder to the results: success and its interval, the
judge's summary metrics, judge-FID against renders of the target scenes, seams and timing."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.bench.apps import PROMPT_SEED, App, AppPrompt, Row
from multifusion.bench.layout import sample_path
from multifusion.bench.stats import bootstrap_interval, extra_objects, sample_success, wilson_interval
from multifusion.errors import RecipeError


def _reference_features(app: App, row: Row, prompts: Sequence[AppPrompt], seeds: int, judge: Any) -> np.ndarray:
    """Judge features of renders of every view's target scene of every sample (render noise
    seeded by prompt, seed and view): the reference set of the row's judge-FID."""
    from multifusion.zoo.render import render

    images = np.stack(
        [
            render(v.scene, np.random.default_rng([PROMPT_SEED, zlib.crc32(app.id.encode()), p.index, s, k]))
            for p in prompts
            for s in range(seeds)
            for k, v in enumerate(row.views(p))
        ]
    )
    return judge.features(images).numpy()


def _load_sample(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"sample {str(path)!r} is missing after every process finished; run the same command again to redo it")
    return json.loads(path.read_text())


def merge_results(
    out: str | Path, plan: Sequence[tuple[App, Sequence[Row], Sequence[AppPrompt]]], seeds: int, judge: Any
) -> dict:
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
            ci = (
                wilson_interval(sum(hits), len(hits))
                if app.success in ("image", "elements")
                else bootstrap_interval(hits, trials)
            )
            metrics: dict[str, Any] = {"success": rate, "success_ci": [ci[0], ci[1]]}
            metrics.update(summary([r for s in samples for r in s["readings"]], [t for ts in targets for t in ts]))
            metrics["extra"] = extra_objects([r for s in samples for r in s["readings"]], [t for ts in targets for t in ts])
            features = np.array([f for s in samples for f in s["features"]])
            if len(features) >= 2:
                if row.views not in references:
                    references[row.views] = _reference_features(app, row, prompts, seeds, judge)
                metrics["judge_fid"] = judge_fid(features, references[row.views])
            if all("seam" in s for s in samples):
                metrics["seam"] = float(np.mean([s["seam"] for s in samples]))
            rows.append(
                {
                    "app": app.id,
                    "method": row.method,
                    "models": list(row.models),
                    "row": row.id,
                    "seeds": seeds,
                    "prompts": len(prompts),
                    "images": len(samples),
                    "metrics": metrics,
                }
            )
            # Timing is kept out of the rows: it is the one thing a resumed or sharded run changes.
            timing[f"{app.id}/{row.id}"] = float(np.mean([s["seconds"] for s in samples]))
    return {"rows": rows, "prompts": prompt_list, "success": success, "seconds_per_image": timing}
