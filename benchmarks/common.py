"""Helpers shared by the benchmark scripts: tiny models in a temporary folder, timing."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

FINE_GRAINED_MODELS = ("general", "expert")
"""The `fine-grained` app's two full models (its other roles, the LoRA stand-ins, belong to other rows)."""


def tiny_models(names_seeds: list[tuple[str, int]], **kwargs) -> list[str]:
    """Build tiny pipelines that share their text encoder and VAE (seed 0) in a temp folder."""
    from multifusion.testing import build_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="mf-bench-"))
    return [str(build_tiny_pipeline(root / n, seed=s, text_seed=0, vae_seed=0, **kwargs)) for n, s in names_seeds]


def interleaved_medians(fns: dict[str, callable], repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median seconds of each function, measured in alternation so that machine load affects
    all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# One thread: timings stay comparable when another job shares the machine.
torch.set_num_threads(1)
