"""Success per sample and its confidence interval over the images of a row (every prompt x seed).

Intervals are 95 %:

- ``image`` apps (success is one yes/no per image): the Wilson score interval;
- ``instance`` apps (success pools the objects of all images): a percentile bootstrap that
  resamples images (the objects of one image are not independent), 2,000 resamples from a
  fixed generator, so the interval is reproducible.
- ``region`` apps (success pools the views of all images): the same bootstrap over images.

Two rows of one image app on the same prompts and seeds are compared image by image with the
exact McNemar test (:func:`mcnemar_p`; ``benchmarks/paired.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multifusion.bench.apps import App

CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
CI_TEXT = (
    "95%: Wilson score interval for image apps; percentile bootstrap over images "
    f"({BOOTSTRAP_RESAMPLES} resamples, seed 0) for instance and region apps"
)
"""How the intervals are made, as recorded in a run's settings and printed under its tables."""


def wilson_interval(successes: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial rate ``successes / n`` (Wilson 1927; scipy's
    ``binomtest(...).proportion_ci(method="wilson")``): unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n successes, where its bound is exactly 0 (1).
    ValueError (scipy's) unless ``0 <= successes <= n`` and ``n >= 1``."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_interval(
    hits: Sequence[int], trials: Sequence[int], *, level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled rate ``sum(hits) / sum(trials)``, resampling
    whole images (clusters): ``hits[i]`` of ``trials[i] > 0`` objects of image ``i`` succeeded."""
    h, t = np.asarray(hits, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    if h.shape != t.shape or h.ndim != 1 or not len(h) or (t <= 0).any():
        raise ValueError("hits and trials must be equally long, non-empty, with trials > 0")
    idx = np.random.default_rng(seed).integers(0, len(h), size=(resamples, len(h)))  # (R, n)
    rates = h[idx].sum(axis=1) / t[idx].sum(axis=1)
    lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of two rows judged on the same images (same prompts and
    seeds): ``only_a`` images right in row A only, ``only_b`` in row B only. If neither row is
    better, each of the ``n = only_a + only_b`` discordant images favours either row with
    probability 1/2, so ``only_a ~ Binomial(n, 1/2)`` (McNemar 1947, exact form); images both
    rows get right, or both wrong, say nothing about the difference. Pairing removes the spread
    the prompts and seeds share, so it separates rows whose Wilson intervals overlap. 1.0 when
    no image is discordant; ValueError on a negative count."""
    from scipy.stats import binomtest

    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)


def sample_success(app: App, readings: Sequence[Mapping[str, Any]], targets: Sequence[Any]) -> tuple[int, int]:
    """(hits, trials) of one image read in one or more views (``readings[k]`` against
    ``targets[k]``): for ``image`` apps (1 or 0, 1), 1 when every view shows everything its
    target states; for ``instance`` apps the objects read right out of the objects stated; for
    ``region`` apps the views read entirely right (scene, style, objects) out of the views; for
    ``elements`` apps (1 or 0, 1), 1 when every element a LoRA adds is there: the style read as
    stated and every stated object's texture read at its slot (shape, colour and scene not asked)."""
    from multifusion.zoo.metrics import instance_success_rate

    if app.success == "elements":
        present = all(
            (spec.style is None or reading["style"] == spec.style)
            and all(o.texture is None or (reading["slots"].get(o.slot) or {}).get("texture") == o.texture for o in spec.objects)
            for reading, spec in zip(readings, targets, strict=True)
        )
        return int(present), 1

    hits = trials = regions = 0
    every = True
    for reading, spec in zip(readings, targets, strict=True):
        n = len(spec.objects)
        got = round(instance_success_rate([reading], [spec]) * n) if n else 0
        hits, trials = hits + got, trials + n
        right = (
            got == n
            and (spec.background is None or reading["background"] == spec.background)
            and (spec.style is None or reading["style"] == spec.style)
        )
        regions += right
        every &= right
    if app.success == "region":
        return regions, len(targets)
    return (hits, trials) if app.success == "instance" else (int(every), 1)


def extra_objects(readings: Sequence[Mapping[str, Any]], targets: Sequence[Any]) -> float:
    """The fraction of readings in which the judge reads more objects (filled slots) than the
    target states: a second object where one was asked for (the judge reads at most one object
    per slot, so two objects in one slot count once)."""
    if len(readings) != len(targets) or not readings:
        raise ValueError("readings and targets must be equally long and non-empty")
    extra = [sum(v is not None for v in r["slots"].values()) > len(t.objects) for r, t in zip(readings, targets)]
    return float(np.mean(extra))
