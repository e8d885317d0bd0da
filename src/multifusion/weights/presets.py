"""Block weights: A1111 weight strings and the community's named presets.

A block weight is the share of the second model in that block, as in A1111's merge-block-
weighted extension: `(1 - w) * A + w * B` (for add-difference, the alpha of `A + w (B - C)`).
A string holds one value per block id of the denoiser (`multifusion.families.blocks`), optionally
led by BASE, which weighs the text encoder(s); for SD-1.x/2.x that is 25 or 26 values. FLUX
strings may instead lead with SuperMerger's CLIP and T5 (61 values for FLUX.1 dev). Presets and
SD-1 strings are resampled onto UNets only: on a transformer only the constant presets apply.

Presets are named as in the merge-block-weighted extension (bbc-mc/sdweb-merge-block-weighted-gui,
`csv/preset.tsv`, 25 values) and SuperMerger (hako-mikan/sd-webui-supermerger,
`scripts/mbwpresets.txt`, the same 25 values after a BASE of 0, and a BASE of 1 for ALL_B).
Their values are quoted below; the smooth ones are written as the formulas that reproduce the
published numbers (GRAD: i/12; SMOOTHSTEP: 3x^2 - 2x^3 at x = i/24; COSINE: (1 + cos(pi x)) / 2),
and tests check them against published values. The AFA paper (arXiv 2405.17082) measures
against these merges.

Presets are defined on the 25 SD-1 blocks. On a UNet with fewer or more levels (the zoo's has
13 blocks, SDXL 19) `block_weights` resamples them: the IN values and the OUT values are each
interpolated linearly over their relative depth, M00 and BASE are kept. Deviation: SuperMerger
maps its presets to SDXL by dropping entries (`weighttoxl`); resampling keeps a gradient a
gradient and a ring a ring on any depth. A weight string the user writes is resampled the
same way only when it is in the SD-1 notation (25 values, or 26 with BASE) and the UNet has
another depth; any other length must match the UNet (its count, or one more with BASE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from multifusion.errors import RecipeError, did_you_mean
from multifusion.families.blocks import BlockLayout

SD1_BLOCKS = 25


@dataclass(frozen=True)
class BlockWeights:
    """One weight per block id in notation order (IN.., M00, OUT.. for a UNet) and the weight of
    the text encoders: `base` (BASE, or SuperMerger's CLIP for FLUX), None when the string gave
    none (the first model's text encoders); `t5` the T5 encoder's own weight when given apart
    (SuperMerger's FLUX T5), else the T5 takes `base`."""

    values: tuple[float, ...]
    base: float | None = None
    t5: float | None = None

    def __post_init__(self):
        if not self.values:
            raise RecipeError("block weights: no values given")
        for v in (*self.values, *(w for w in (self.base, self.t5) if w is not None)):
            if not math.isfinite(v):
                raise RecipeError(f"block weight {v!r} is not a finite number")

    def by_block(self, layout: BlockLayout) -> dict[str, float]:
        """{block id: weight} for `layout`; the lengths must agree."""
        if len(self.values) != len(layout.ids):
            raise RecipeError(_length_message(len(self.values), layout))
        return dict(zip(layout.ids, self.values))

    def text_weight(self, component: str, layout: BlockLayout) -> float | None:
        """The weight of text encoder `component` (None: keep the first model's)."""
        return self.t5 if component == layout.t5 and self.t5 is not None else self.base

    def named(self, layout: BlockLayout) -> list[tuple[str, float]]:
        """(id, weight) pairs, the leading text-encoder weights first: what a range check names."""
        lead = [("BASE" if self.t5 is None else "CLIP", self.base)] if self.base is not None else []
        lead += [("T5", self.t5)] if self.t5 is not None else []
        return lead + list(zip(layout.ids, self.values))


def _length_message(given: int, layout: BlockLayout | None) -> str:
    n = SD1_BLOCKS if layout is None else len(layout.ids)
    kind = "UNet" if layout is None else layout.kind
    names = "IN00..IN11, M00, OUT00..OUT11" if layout is None else layout.describe()
    leads = (("BASE",),) if layout is None else layout.leads
    forms = [
        f"{n + len(lead)} (with a leading {', '.join(lead)}" + (", as SuperMerger writes them)" if len(lead) > 1 else ")")
        for lead in leads
    ]
    return f"block weights: {given} values given; this {kind} expects {n} ({names}) or " + " or ".join(forms)


def parse_numbers(text: str | Sequence[float]) -> list[float]:
    """The finite numbers of a weight string "w,w,...,w" or a list; RecipeError quoting a bad one."""
    if isinstance(text, str):
        items = [s.strip() for s in text.split(",")]
        try:
            values = [float(s) for s in items]
        except ValueError:
            bad = next(s for s in items if not is_number(s))
            raise RecipeError(f"block weights: {bad!r} is not a number (in {text!r})") from None
    else:
        values = [float(v) for v in text]
    bad = [v for v in values if not math.isfinite(v)]
    if bad:  # "nan" and "inf" parse as floats
        raise RecipeError(f"block weights: {bad[0]!r} is not a finite number")
    return values


def parse_block_weights(text: str | Sequence[float], layout: BlockLayout | None = None) -> BlockWeights:
    """Parse "w,w,...,w" (or a list of numbers) with one value per block id of `layout` (the
    SD-1 25 blocks when None), or with the layout's leading text-encoder weights first (BASE;
    for FLUX also CLIP, T5)."""
    values = parse_numbers(text)
    n = SD1_BLOCKS if layout is None else len(layout.ids)
    if len(values) == n:
        return BlockWeights(tuple(values))
    for lead in (("BASE",),) if layout is None else layout.leads:
        if len(values) == n + len(lead):
            t5 = values[lead.index("T5")] if "T5" in lead else None
            return BlockWeights(tuple(values[len(lead) :]), base=values[0], t5=t5)
    raise RecipeError(_length_message(len(values), layout))


def is_number(s: str) -> bool:
    """Whether `s` reads as a float (a weight string's item, not a preset name)."""
    try:
        float(s)
    except ValueError:
        return False
    return True


def _gradient(i: int) -> float:
    return 1 - i / 12  # GRAD_V's IN half: 1, 11/12, ..., 1/12 (preset.tsv rounds to 10 digits)


def _smoothstep(x: float) -> float:
    return 3 * x * x - 2 * x**3


def _cosine(x: float) -> float:
    return (1 + math.cos(math.pi * x)) / 2


def _values(text: str) -> tuple[float, ...]:
    return tuple(float(s) for s in text.split(","))


_GRAD_V = tuple(_gradient(i) for i in range(12)) + (0.0,) + tuple(_gradient(12 - i) for i in range(1, 13))
# The 25 block values of each preset (BASE is 0 in SuperMerger's tables, 1 for ALL_B).
_PRESETS: dict[str, tuple[float, ...]] = {
    "GRAD_V": _GRAD_V,
    "GRAD_A": tuple(1 - v for v in _GRAD_V),
    "FLAT_25": (0.25,) * 25,
    "FLAT_75": (0.75,) * 25,
    "WRAP08": _values("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1"),
    "WRAP12": _values("1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1"),
    "WRAP14": _values("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1"),
    "WRAP16": _values("1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1"),
    "MID12_50": _values("0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0"),
    "OUT07": _values("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1"),
    "OUT12": _values("0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1"),
    "OUT12_5": _values("0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1"),
    "RING08_SOFT": _values("0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0"),
    "RING08_5": _values("0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0"),
    "RING10_5": _values("0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0"),
    "RING10_3": _values("0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0"),
    "SMOOTHSTEP": tuple(_smoothstep(i / 24) for i in range(25)),
    "REVERSE_SMOOTHSTEP": tuple(1 - _smoothstep(i / 24) for i in range(25)),
    "COSINE": tuple(_cosine(i / 24) for i in range(25)),
    "REVERSE_COSINE": tuple(1 - _cosine(i / 24) for i in range(25)),
    "ALL_A": (0.0,) * 25,
    "ALL_B": (1.0,) * 25,
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str) -> BlockWeights:
    """The named preset on the 25 SD-1 blocks (case and '-'/'_' do not matter)."""
    key = name.strip().upper().replace("-", "_")
    if key not in _PRESETS:
        raise RecipeError(
            f"unknown block-weight preset {name!r} (known: {', '.join(PRESET_NAMES)}){did_you_mean(key, PRESET_NAMES)}"
        )
    return BlockWeights(_PRESETS[key], base=1.0 if key == "ALL_B" else 0.0)


def resample(weights: BlockWeights, layout: BlockLayout) -> BlockWeights:
    """`weights` moved to `layout`'s number of blocks: the IN values and the OUT values each
    linearly interpolated over relative depth, M00 and BASE kept. Same length: unchanged."""
    n = len(layout.ids)
    if len(weights.values) == n:
        return weights
    k_src, k_dst = (len(weights.values) - 1) // 2, (n - 1) // 2
    ins, mid, outs = weights.values[:k_src], weights.values[k_src], weights.values[k_src + 1 :]
    return BlockWeights((*_interpolate(ins, k_dst), mid, *_interpolate(outs, k_dst)), weights.base)


def _interpolate(values: Sequence[float], n: int) -> tuple[float, ...]:
    """`n` samples of the piecewise-linear curve through `values` (evenly spaced, ends kept)."""
    if n == 1 or len(values) == 1:
        return (values[0],) * n
    out = []
    for j in range(n):
        pos = j * (len(values) - 1) / (n - 1)
        lo = min(int(pos), len(values) - 2)
        frac = pos - lo
        out.append(values[lo] if frac == 0 else values[lo] * (1 - frac) + values[lo + 1] * frac)
    return tuple(out)


def block_weights(spec: str | Sequence[float] | BlockWeights, layout: BlockLayout) -> tuple[BlockWeights, str]:
    """Block weights for `layout` from a preset name, a weight string, a list of numbers or a
    BlockWeights, and a note of where they came from (for merge.json). On a UNet, presets and
    strings or lists in the SD-1 notation (25 values, or 26 with BASE) are resampled to the
    layout; other strings and lists must have the layout's length (or one more, with BASE). A
    transformer takes its own count only, and of the presets those constant over the blocks
    (ALL_A, ALL_B, FLAT_25, FLAT_75): the others are curves over a UNet's IN/M00/OUT halves."""
    if isinstance(spec, BlockWeights):
        spec.by_block(layout)  # checks the length
        return spec, "given"
    if isinstance(spec, str) and "," not in spec and not is_number(spec):
        weights, note = preset(spec), f"preset {spec.strip().upper().replace('-', '_')}"
        if not layout.resamples:
            if len(set(weights.values)) != 1:
                raise RecipeError(
                    f"{note} is a curve over a UNet's IN, M00 and OUT blocks; a {layout.kind} has blocks "
                    f"{layout.describe()}: give its {len(layout.ids)} values (or a constant preset: ALL_A, ALL_B, FLAT_25, FLAT_75)"
                )
            return BlockWeights((weights.values[0],) * len(layout.ids), weights.base), note
    else:
        n = len(spec.split(",")) if isinstance(spec, str) else len(spec)
        if not layout.resamples or n in (len(layout.ids), len(layout.ids) + 1) or n not in (SD1_BLOCKS, SD1_BLOCKS + 1):
            return parse_block_weights(spec, layout), "given"
        weights, note = parse_block_weights(spec), f"given as {n} SD-1 values"
    resampled = resample(weights, layout)
    return resampled, note if resampled is weights else f"{note}, resampled from 25 to {len(layout.ids)} blocks"
