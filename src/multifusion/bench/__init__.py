"""The benchmark harness: every method side by side on the zoo apps, with the same prompts,
seeds and judge (``multifusion bench``); and CLIP score / FID / IS for real models
(:mod:`multifusion.bench.realworld`).

    from multifusion.bench import run_bench
    results = run_bench("fine-grained", "runs/bench", seeds=64)
    results["rows"][0]["metrics"]["success"], results["rows"][0]["metrics"]["success_ci"]
"""

from multifusion.bench.apps import APPS, App, AppPrompt, Fusion, Row, View, get_app, own_prompts, regions_per_slot, tiles_per_slot
from multifusion.bench.run import run_bench
from multifusion.bench.stats import bootstrap_interval, mcnemar_p, wilson_interval

__all__ = [
    "APPS",
    "App",
    "AppPrompt",
    "Fusion",
    "Row",
    "View",
    "get_app",
    "own_prompts",
    "regions_per_slot",
    "tiles_per_slot",
    "bootstrap_interval",
    "mcnemar_p",
    "run_bench",
    "wilson_interval",
]
