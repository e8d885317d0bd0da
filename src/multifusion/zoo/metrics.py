"""Judge-based metrics reused by every benchmark: pure functions of readings and targets.

A *reading* is what :meth:`multifusion.zoo.judge.Judge.read` returns for one image (a dict with
``background``, ``style``, ``slots`` and ``p_style``). A *target* says what the image should
show; it may be a prompt (parsed with :func:`~multifusion.zoo.render.parse_caption`), a
:class:`~multifusion.zoo.render.SceneSpec` (only its non-``None`` fields are scored) or a full
:class:`~multifusion.zoo.render.Scene` (every field is scored). Metrics only score what a
target states: a prompt without position words leaves its objects free to stand in any slot,
and a prompt without texture words does not score texture.

:func:`judge_fid` is the Frechet distance between Gaussians fitted to two sets of judge
features, as FID does with Inception features.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multifusion.errors import MultifusionError
from multifusion.zoo.render import SLOTS, ObjectSpec, Scene, SceneSpec, parse_caption

Reading = Mapping[str, Any]
Target = str | Scene | SceneSpec
ATTRIBUTES = ("shape", "colour", "texture")


class MetricError(MultifusionError):
    """Metric inputs that cannot be scored: mismatched lengths, nothing to score, bad arrays."""


def as_spec(target: Target) -> SceneSpec:
    """The :class:`SceneSpec` of a prompt, spec or full scene (a scene states every field)."""
    if isinstance(target, SceneSpec):
        return target
    if isinstance(target, str):
        return parse_caption(target)
    if isinstance(target, Scene):
        objects = tuple(ObjectSpec(o.shape, o.colour, o.texture, o.slot) for o in target.objects)
        return SceneSpec(target.background, target.style, objects)
    raise MetricError(f"target={target!r} is not a prompt, SceneSpec or Scene; pass one of those per image")


def _pairs(readings: Sequence[Reading], targets: Sequence[Target]) -> list[tuple[Reading, SceneSpec]]:
    if len(readings) != len(targets):
        raise MetricError(f"got {len(readings)} readings and {len(targets)} targets; pass one target per image")
    if not readings:
        raise MetricError("readings is empty; score at least one image")
    for i, reading in enumerate(readings):
        missing = [k for k in ("background", "style", "slots") if k not in reading]
        if missing:
            raise MetricError(f"readings[{i}] lacks {missing}; pass the dicts that Judge.read returns")
    return [(reading, as_spec(target)) for reading, target in zip(readings, targets)]


def _checks(obj: ObjectSpec, read: Mapping[str, str] | None) -> dict[str, bool]:
    """Which stated attributes of ``obj`` the slot reading ``read`` (None = empty) gets right."""
    stated = {"shape": obj.shape, "colour": obj.colour, "texture": obj.texture}
    return {k: read is not None and read[k] == v for k, v in stated.items() if v is not None}


def match_objects(reading: Reading, spec: SceneSpec) -> list[tuple[ObjectSpec, str]]:
    """Assign each object of ``spec`` a slot of ``reading``, in ``spec.objects`` order.

    An object with a stated slot gets that slot. Objects without one share the remaining slots,
    assigned to maximise the number of stated attributes read right (ties: the first such
    assignment in left-to-right order), so "a red circle and a blue square" is scored wherever
    the two objects stand.
    """
    taken = {obj.slot for obj in spec.objects if obj.slot is not None}
    free_objects = [i for i, obj in enumerate(spec.objects) if obj.slot is None]
    free_slots = [slot for slot in SLOTS if slot not in taken]
    best: tuple[str, ...] = tuple(free_slots[: len(free_objects)])
    best_score = -1
    for perm in itertools.permutations(free_slots, len(free_objects)):
        score = sum(sum(_checks(spec.objects[i], reading["slots"][slot]).values()) for i, slot in zip(free_objects, perm))
        if score > best_score:
            best, best_score = perm, score
    assigned = dict(zip(free_objects, best))
    return [(obj, obj.slot if obj.slot is not None else assigned[i]) for i, obj in enumerate(spec.objects)]


def attribute_accuracy(readings: Sequence[Reading], targets: Sequence[Target]) -> dict[str, float]:
    """Fraction of stated attributes read right, per attribute, over all images.

    Keys (present only when some target states the attribute): ``background``, ``style``;
    per object ``shape``, ``colour``, ``texture`` (at the object's slot, see
    :func:`match_objects`), ``position`` (the stated slot is not empty); per image ``count``
    (as many objects read as stated); and ``overall``, the fraction of all these checks passed.
    """
    hits: dict[str, list[bool]] = {}
    for reading, spec in _pairs(readings, targets):
        if spec.background is not None:
            hits.setdefault("background", []).append(reading["background"] == spec.background)
        if spec.style is not None:
            hits.setdefault("style", []).append(reading["style"] == spec.style)
        for obj, slot in match_objects(reading, spec):
            for key, ok in _checks(obj, reading["slots"][slot]).items():
                hits.setdefault(key, []).append(ok)
            if obj.slot is not None:
                hits.setdefault("position", []).append(reading["slots"][slot] is not None)
        n_read = sum(v is not None for v in reading["slots"].values())
        hits.setdefault("count", []).append(n_read == len(spec.objects))
    result = {key: float(np.mean(values)) for key, values in hits.items()}
    result["overall"] = float(np.mean([v for values in hits.values() for v in values]))
    return result


def _instance_hits(readings: Sequence[Reading], targets: Sequence[Target]) -> list[list[bool]]:
    """Per image, per stated object: read at its slot with its shape and every stated attribute."""
    return [
        [all(_checks(obj, reading["slots"][slot]).values()) for obj, slot in match_objects(reading, spec)]
        for reading, spec in _pairs(readings, targets)
    ]


def instance_success_rate(readings: Sequence[Reading], targets: Sequence[Target]) -> float:
    """Instance success rate (ISR, as COCO-MIG scores it): the fraction of all stated objects
    found at their slot with the right shape and the right colour and texture where stated."""
    hits = [ok for image in _instance_hits(readings, targets) for ok in image]
    if not hits:
        raise MetricError("no target states an object; instance success needs prompts with objects")
    return float(np.mean(hits))


def image_success_rate(readings: Sequence[Reading], targets: Sequence[Target]) -> float:
    """Fraction of images whose stated objects all succeed (COCO-MIG's image success rate)."""
    return float(np.mean([all(image) for image in _instance_hits(readings, targets)]))


def scene_accuracy(readings: Sequence[Reading], targets: Sequence[Target]) -> float:
    """Fraction of images read with the stated background, over targets that state one."""
    hits = [r["background"] == s.background for r, s in _pairs(readings, targets) if s.background is not None]
    if not hits:
        raise MetricError("no target states a background; scene accuracy needs prompts with a scene phrase")
    return float(np.mean(hits))


def style_score(readings: Sequence[Reading], targets: Sequence[Target], *, soft: bool = False) -> float:
    """Fraction of images read in the stated style, over targets that state one; with
    ``soft=True`` the judge's mean probability of the stated style instead."""
    pairs = [(r, s) for r, s in _pairs(readings, targets) if s.style is not None]
    if not pairs:
        raise MetricError("no target states a style; style score needs prompts such as 'a cartoon of ...'")
    if soft:
        return float(np.mean([r["p_style"][s.style] for r, s in pairs]))
    return float(np.mean([r["style"] == s.style for r, s in pairs]))


def summary(readings: Sequence[Reading], targets: Sequence[Target]) -> dict[str, float]:
    """Every metric the targets allow, flat, for a report row: ``isr``, ``image_success``,
    ``scene``, ``style``, ``style_soft`` and ``attr/<name>`` from :func:`attribute_accuracy`."""
    pairs = _pairs(readings, targets)
    specs = [s for _, s in pairs]
    out: dict[str, float] = {}
    if any(s.objects for s in specs):
        out["isr"] = instance_success_rate(readings, specs)
        out["image_success"] = image_success_rate(readings, specs)
    if any(s.background is not None for s in specs):
        out["scene"] = scene_accuracy(readings, specs)
    if any(s.style is not None for s in specs):
        out["style"] = style_score(readings, specs)
        out["style_soft"] = style_score(readings, specs, soft=True)
    out.update({f"attr/{k}": v for k, v in attribute_accuracy(readings, specs).items()})
    return out


# ----------------------------------------------------------------------------- judge-FID


def _as_matrix(name: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise MetricError(f"{name} has shape {arr.shape}; pass an (N, D) array of features")
    if not np.isfinite(arr).all():
        raise MetricError(f"{name} holds NaN or inf; check the images the features came from")
    return arr


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, N >= 2, in float64."""
    x = _as_matrix("features", features)
    if len(x) < 2:
        raise MetricError(f"features has {len(x)} rows; a covariance needs at least 2 images")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite (D, D) matrix by eigendecomposition
    (eigenvalues below 0, from rounding, are clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1^1/2 sigma2 sigma1^1/2)^1/2)

    The symmetric form of the cross term keeps every matrix symmetric PSD, so ``eigh`` serves
    for both roots (no scipy ``sqrtm`` and its complex round-off). Shapes (D,) and (D, D).
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0]
    for name, m in (("sigma1", sigma1), ("sigma2", sigma2)):
        if m.shape != (d, d):
            raise MetricError(f"{name} has shape {m.shape}; expected ({d}, {d}) to match mu1")
    if mu2.shape != (d,):
        raise MetricError(f"mu2 has shape {mu2.shape}; expected ({d},) to match mu1")
    root1 = sqrt_psd(sigma1)
    cross = root1 @ sigma2 @ root1
    cross_eigs = np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(cross_eigs)))
    return max(value, 0.0) if math.isfinite(value) else value


def judge_fid(features_a: Any, features_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D),
    e.g. ``judge.features(generated)`` and ``judge.features(renders)``. Use the same number of
    images when comparing scores: like FID, it is biased upwards for small N."""
    a, b = _as_matrix("features_a", features_a), _as_matrix("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"features_a has {a.shape[1]} dims and features_b {b.shape[1]}; use features of one judge")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
