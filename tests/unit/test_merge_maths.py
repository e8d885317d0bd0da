"""Weight merges: the pure maths, weight strings and presets, on hand-made tensors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.errors import RecipeError
from multifusion.families.blocks import BlockLayout
from multifusion.weights import (
    PRESET_NAMES,
    BlockWeights,
    add_difference,
    block_weighted,
    parse_block_weights,
    preset,
    resample,
    weighted_sum,
)

seeds = st.integers(0, 2**31 - 1)
unit = st.floats(0.0, 1.0)


def _randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_weighted_sum_matches_formula_and_normalises():
    a, b = torch.full((2, 3), 1.0), torch.full((2, 3), 4.0)
    assert torch.allclose(weighted_sum([a, b], [1.0, 2.0]), torch.full((2, 3), 3.0))
    assert torch.equal(weighted_sum([a, b], [2.0, 2.0]), weighted_sum([a, b], [0.5, 0.5]))


@given(seeds, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
@settings(max_examples=30, deadline=None)
def test_weights_one_zero_give_the_first_model_exactly(seed, dtype):
    a, b = _randn(seed, 4, 5, dtype=dtype), _randn(seed + 1, 4, 5, dtype=dtype)
    out = weighted_sum([a, b], [1.0, 0.0])
    assert out.dtype == dtype and torch.equal(out, a)
    assert torch.equal(weighted_sum([a, b], [0.0, 3.0]), b)
    # Even a non-finite tensor with weight 0 leaves the other untouched.
    assert torch.equal(weighted_sum([a, torch.full_like(b, float("nan"))], [1.0, 0.0]), a)


@given(st.lists(st.floats(0.0, 10.0), min_size=2, max_size=5).filter(lambda w: sum(w) > 0.1), seeds)
@settings(max_examples=40, deadline=None)
def test_weighted_sum_is_a_convex_combination_with_weight_i_for_model_i(weights, seed):
    ts = [_randn(seed + i, 3, 4) for i in range(len(weights))]
    out = weighted_sum(ts, weights)
    stacked = torch.stack(ts)
    assert torch.all(out <= stacked.max(0).values + 1e-5) and torch.all(out >= stacked.min(0).values - 1e-5)
    expected = sum(w * t for w, t in zip(weights, ts)) / sum(weights)
    assert torch.allclose(out, expected, atol=1e-5)


def test_half_precision_inputs_merge_in_float32():
    a = torch.tensor([1.0, 2049.0], dtype=torch.float16)  # 2049 is not a float16: stored as 2048
    b = torch.tensor([1.0, 2052.0], dtype=torch.float16)
    out = weighted_sum([a, b], [0.5, 0.5])
    assert out.dtype == torch.float16 and out.tolist() == [1.0, 2050.0]


@given(seeds, st.floats(-3.0, 3.0))
@settings(max_examples=30, deadline=None)
def test_add_difference(seed, alpha):
    a, b, c = (_randn(seed + i, 3, 3) for i in range(3))
    assert torch.allclose(add_difference(a, b, c, alpha), a + alpha * (b - c), atol=1e-5)
    assert torch.equal(add_difference(a, b, c, 0.0), a)
    assert torch.equal(add_difference(a, b, b, alpha), a)


@given(seeds, unit)
@settings(max_examples=30, deadline=None)
def test_block_weighted_with_every_block_at_w_is_the_weighted_sum_at_w(seed, w):
    sds = [{f"k{i}": _randn(seed + 10 * m + i, 2, 3) for i in range(4)} for m in range(2)]
    blocks = {"IN00": w, "M00": w, "OUT00": w}
    block_of = {"k0": "IN00", "k1": "M00", "k2": "OUT00", "k3": "OUT00"}.__getitem__
    merged = block_weighted(sds, block_of, blocks)
    for k in sds[0]:
        assert torch.equal(merged[k], weighted_sum([sds[0][k], sds[1][k]], [1 - w, w]))


def test_block_weighted_picks_each_parameters_block():
    a = {"x": torch.zeros(2), "y": torch.zeros(2)}
    b = {"x": torch.ones(2), "y": torch.ones(2)}
    out = block_weighted([a, b], {"x": "IN00", "y": "OUT00"}.__getitem__, {"IN00": 0.25, "OUT00": 1.0})
    assert out["x"].tolist() == [0.25, 0.25] and out["y"].tolist() == [1.0, 1.0]
    c = {"x": torch.full((2,), 0.5), "y": torch.zeros(2)}
    out = block_weighted([a, b, c], {"x": "IN00", "y": "OUT00"}.__getitem__, {"IN00": 2.0, "OUT00": 0.0}, "add_difference")
    assert out["x"].tolist() == [1.0, 1.0] and torch.equal(out["y"], a["y"])


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -0.5], "not a finite number >= 0"),
        ([1.0, float("nan")], "not a finite number >= 0"),
        ([0.0, 0.0], "sum to zero"),
        ([1.0], "1 weights for 2 models"),
    ],
)
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(RecipeError, match=match):
        weighted_sum([torch.zeros(2), torch.ones(2)], weights)


def test_non_finite_alpha_is_refused():
    with pytest.raises(RecipeError, match="not a finite number"):
        add_difference(torch.zeros(1), torch.ones(1), torch.ones(1), float("inf"))


# --- weight strings and presets ---------------------------------------------------------------


def test_weight_strings_of_25_and_26_values():
    w = parse_block_weights(",".join(["0.5"] * 25))
    assert w.values == (0.5,) * 25 and w.base is None
    w = parse_block_weights("1," + ",".join(["0"] * 25))
    assert w.base == 1.0 and w.values == (0.0,) * 25
    assert parse_block_weights([0.1] * 25).values == (0.1,) * 25


@pytest.mark.parametrize("n", [1, 13, 24, 27])
def test_weight_string_of_the_wrong_length_says_what_it_got_and_expects(n):
    with pytest.raises(RecipeError, match=rf"{n} values given; this UNet expects 25 \(IN00..IN11, M00, OUT00..OUT11\) or 26"):
        parse_block_weights(",".join(["0.5"] * n))


def test_weight_string_length_follows_the_layout():
    layout = BlockLayout(2, ("IN00", "IN01", "M00", "OUT00", "OUT01"), {})
    assert parse_block_weights("0,0.5,1,0.5,0", layout).values == (0, 0.5, 1, 0.5, 0)
    with pytest.raises(RecipeError, match=r"expects 5 \(IN00..IN01, M00, OUT00..OUT01\) or 6"):
        parse_block_weights(",".join(["0.5"] * 25), layout)


def test_weight_strings_reject_non_numbers_and_nan():
    with pytest.raises(RecipeError, match="'x' is not a number"):
        parse_block_weights("0.5,x," + ",".join(["0"] * 23))
    with pytest.raises(RecipeError, match="not a finite number"):
        parse_block_weights("nan," + ",".join(["0"] * 24))


def test_the_required_presets_exist_with_25_values():
    for name in (
        "GRAD_V",
        "GRAD_A",
        "FLAT_25",
        "FLAT_75",
        "WRAP08",
        "MID12_50",
        "OUT07",
        "RING08_SOFT",
        "SMOOTHSTEP",
        "COSINE",
        "ALL_A",
        "ALL_B",
    ):
        assert name in PRESET_NAMES
    for name in PRESET_NAMES:
        w = preset(name)
        assert len(w.values) == 25 and all(0 <= v <= 1 for v in w.values)


# Values as published in bbc-mc/sdweb-merge-block-weighted-gui csv/preset.tsv and
# hako-mikan/sd-webui-supermerger scripts/mbwpresets.txt (BASE dropped).
PUBLISHED = {
    "GRAD_V": (0, 1.0, 1, 0.9166666667, 12, 0.0, 13, 0.0833333333, 24, 1.0),
    "SMOOTHSTEP": (1, 0.00506365740740741, 6, 0.15625, 12, 0.5, 23, 0.994936342592593),
    "COSINE": (1, 0.995722430686905, 8, 0.75, 12, 0.5, 24, 0.0),
    "REVERSE_COSINE": (1, 0.00427756931309475, 16, 0.75),
    "MID12_50": (4, 0.0, 5, 0.5, 18, 0.5, 19, 0.0),
    "RING08_SOFT": (5, 0.5, 6, 1.0, 9, 0.5, 15, 0.5, 19, 0.5, 20, 0.0),
    "OUT07": (17, 0.0, 18, 1.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_reproduce_the_published_values(name):
    quoted = PUBLISHED[name]
    values = preset(name).values
    for i, v in zip(quoted[::2], quoted[1::2]):
        assert math.isclose(values[i], v, abs_tol=1e-9), (name, i)


def test_preset_names_forgive_case_and_hyphens_and_suggest_on_typos():
    assert preset("ring08_soft") == preset("RING08_SOFT")
    assert preset("REVERSE-SMOOTHSTEP") == preset("REVERSE_SMOOTHSTEP")
    assert preset("ALL_B").base == 1.0 and preset("ALL_A").base == 0.0
    with pytest.raises(RecipeError, match="did you mean 'RING08_SOFT'"):
        preset("RING08_SOFTT")


def test_resampling_keeps_ends_middle_and_straight_lines():
    layout = BlockLayout(3, tuple(f"IN{i:02d}" for i in range(6)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(6)), {})
    grad = resample(preset("GRAD_V"), layout)
    assert len(grad.values) == 13 and grad.values[6] == 0.0
    ins = grad.values[:6]
    assert ins[0] == 1.0 and math.isclose(ins[-1], 1 / 12)
    steps = [ins[i + 1] - ins[i] for i in range(5)]
    assert all(math.isclose(s, steps[0]) for s in steps)  # still a straight line
    assert resample(preset("FLAT_25"), layout).values == (0.25,) * 13
    assert resample(
        preset("RING08_SOFT"),
        BlockLayout(4, tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12)), {}),
    ) == preset("RING08_SOFT")


def test_block_weights_check_themselves():
    with pytest.raises(RecipeError, match="no values given"):
        BlockWeights(())
    with pytest.raises(RecipeError, match="not a finite number"):
        BlockWeights((0.5,) * 3, base=float("inf"))
    with pytest.raises(RecipeError, match="not a finite number"):
        BlockWeights((0.5,) * 4, base=0.5, t5=float("nan"))  # an even count is a transformer's (IN, D00, S00, OUT)
