"""The registered merge methods (TIES, DARE, DARE-TIES, Model Stock, SLERP, geometric median):
degenerate cases exact, hand-computed examples, and bad hyper-parameters refused from the
registered signature, naming the field, before any tensor is read."""

import math
from typing import Annotated

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.errors import RecipeError
from multifusion.weights import MergeSpec
from multifusion.weights.merge import (
    dare,
    dare_drop,
    dare_ties,
    disjoint_mean,
    geometric_median,
    model_stock,
    model_stock_ratio,
    slerp,
    ties,
    trim,
)
from multifusion.weights.registry import BUILTIN, MERGE_METHODS, MergeSpecError, Range, get_merge_method, merge_method

seeds = st.integers(0, 2**31 - 1)


def _models(seed, n, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_the_builtins_are_registered_with_what_their_signatures_say():
    assert set(BUILTIN) <= set(MERGE_METHODS)
    m = get_merge_method("ties")
    assert m.models == ("base",) and m.variadic and m.min_models == 2 and list(m.hypers) == ["density", "alpha"]
    assert get_merge_method("dare").random and "merge_seed" in get_merge_method("dare").hypers
    assert get_merge_method("model_stock").min_models == 3 and get_merge_method("model_stock").ratio is None
    assert get_merge_method("slerp").max_models == 2 and get_merge_method("slerp").ratio == "t"
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        get_merge_method("tiez")


# --- TIES ---------------------------------------------------------------------------------------


def test_ties_by_hand():
    base = torch.zeros(4)
    m1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    m2 = torch.tensor([-1.0, -2.0, 0.25, -4.0])
    m3 = torch.tensor([2.0, 1.5, -0.1, 1.0])
    # trim to density 0.5 (2 of 4 entries per task vector): m1 -> [3, 0, 0, 2], m2 -> [0, -2, 0, -4],
    # m3 -> [2, 1.5, 0, 0]
    trimmed = trim(torch.stack([m1, m2, m3]), 0.5)
    assert torch.equal(trimmed, torch.tensor([[3.0, 0, 0, 2], [0, -2, 0, -4], [2, 1.5, 0, 0]]))
    # elect: sums [5, -0.5, 0, -2] -> signs [+, -, 0, -]; disjoint mean over agreeing nonzero entries:
    # entry 0: (3 + 2) / 2; entry 1: -2; entry 2: none -> 0; entry 3: -4
    assert torch.equal(disjoint_mean(trimmed), torch.tensor([2.5, -2.0, 0.0, -4.0]))
    assert torch.equal(ties(base, m1, m2, m3, density=0.5, alpha=2.0), torch.tensor([5.0, -4.0, 0.0, -8.0]))


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4))
def test_ties_at_full_density_with_agreeing_signs_is_the_mean_of_the_deltas(seed, n):
    base, *rest = _models(seed, n + 1)
    step = rest[0].abs() + 0.1  # every delta along one sign pattern
    sign = torch.sign(rest[0])
    models = [base + sign * step * (i + 1) for i in range(n)]
    want = base + torch.stack([m - base for m in models]).mean(0)
    assert torch.allclose(ties(base, *models, density=1.0, alpha=1.0), want, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4), st.floats(0.01, 1.0))
def test_ties_of_models_equal_to_the_base_or_alpha_zero_is_the_base(seed, n, density):
    base, *models = _models(seed, n + 1)
    assert torch.equal(ties(base, *[base.clone() for _ in range(n)], density=density), base)
    assert torch.equal(ties(base, *models, density=density, alpha=0.0), base)


def test_ties_of_one_fine_tune_at_full_density_is_the_fine_tune():
    base, m = _models(0, 2)
    assert torch.allclose(ties(base, m, density=1.0), m, atol=1e-6)


# --- DARE ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4), st.floats(0.0, 2.0))
def test_dare_without_drops_is_the_scaled_sum_of_the_deltas(seed, n, alpha):
    base, *models = _models(seed, n + 1)
    want = base + alpha * torch.stack([m - base for m in models]).sum(0)
    got = dare(base, *models, drop_rate=0.0, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(got, want, atol=1e-5)


def test_dare_ties_without_drops_is_ties_at_full_density():
    base, *models = _models(3, 4)
    assert torch.equal(dare_ties(base, *models, drop_rate=0.0), ties(base, *models, density=1.0))


def test_dare_drops_with_probability_p_and_rescales_the_rest():
    deltas = torch.ones(1, 200_000)
    out = dare_drop(deltas, 0.75, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.all(out[kept] == 4.0)  # 1 / (1 - p)
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.03  # unbiased
    same = dare_drop(deltas, 0.75, torch.Generator().manual_seed(0))
    other = dare_drop(deltas, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(out, same) and not torch.equal(out, other)  # the seed fixes the draw


# --- Model Stock --------------------------------------------------------------------------------


def test_model_stock_ratio_by_hand():
    # two deltas at 45 degrees: cos = 1/sqrt(2), t = 2 cos / (1 + cos) = 0.8284...
    deltas = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    assert model_stock_ratio(deltas).item() == pytest.approx(2 * c / (1 + c), rel=1e-12)
    # three deltas, pairwise cosines 0, 0, 1/sqrt(2)... -> mean cos = (0 + 1/sqrt(2) + 1/sqrt(2)) / 3 ?
    d3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    cos = (0 + c + c) / 3
    assert model_stock_ratio(d3).item() == pytest.approx(3 * cos / (1 + 2 * cos), rel=1e-12)
    # orthogonal deltas: t = 0, the base
    assert model_stock_ratio(torch.eye(2)).item() == 0.0


def test_model_stock_by_hand():
    base = torch.tensor([1.0, 1.0])
    m1, m2 = base + torch.tensor([1.0, 0.0]), base + torch.tensor([1.0, 1.0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    want = t * (m1 + m2) / 2 + (1 - t) * base
    assert torch.allclose(model_stock(base, m1, m2), want, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(2, 5))
def test_model_stock_of_identical_fine_tunes_is_that_fine_tune(seed, n):
    base, m = _models(seed, 2)
    assert torch.allclose(model_stock(base, *[m.clone() for _ in range(n)]), m, atol=1e-6)


# --- SLERP and the geometric median --------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seeds, st.floats(0.0, 1.0))
def test_slerp_endpoints_exact_and_the_norm_between(seed, t):
    a, b = _models(seed, 2)
    assert torch.equal(slerp(a, b, t=0.0), a) and torch.equal(slerp(a, b, t=1.0), b)
    ua, ub = a / a.norm(), b / b.norm()
    assert slerp(ua, ub, t=t).norm().item() == pytest.approx(1.0, abs=1e-5)  # unit vectors stay on the sphere
    assert torch.allclose(slerp(a, a.clone(), t=t), a, atol=1e-6)  # parallel: linear, the same tensor


def test_slerp_of_orthogonal_unit_vectors_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = slerp(a, b, t=0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5)] * 2), atol=1e-6)  # unit length, 45 degrees


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4))
def test_geometric_median_of_identical_models_is_the_model(seed, n):
    [m] = _models(seed, 1)
    assert torch.equal(geometric_median(*[m.clone() for _ in range(n)]), m)


def test_geometric_median_by_hand_and_robust_to_an_outlier():
    # three points on a line: the median is the middle one; the mean would be pulled to 34
    xs = [torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([100.0])]
    assert geometric_median(*xs, iterations=1000).item() == pytest.approx(2.0, abs=1e-3)
    # the vertices of an equilateral triangle: the centre
    tri = [torch.tensor([math.cos(a), math.sin(a)]) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    assert torch.allclose(geometric_median(*tri), torch.zeros(2), atol=1e-5)


# --- bad input: refused from the signature, naming the field --------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, match",
    [
        (dict(method="ties", options={"density": 0.0}), "density", r"density: 0.0 is not a finite number in \(0, 1\]"),
        (dict(method="ties", options={"density": 1.5}), "density", r"in \(0, 1\]"),
        (dict(method="ties", alpha=-1.0), "alpha", r"alpha: -1.0 is not a finite number >= 0"),
        (dict(method="ties", options={"density": float("nan")}), "density", "not a finite number"),
        (dict(method="dare", options={"drop_rate": 1.0}), "drop_rate", r"in \[0, 1\)"),
        (dict(method="dare", options={"merge_seed": -1}), "merge_seed", ">= 0"),
        (dict(method="dare", options={"merge_seed": 0.5}), "merge_seed", "not an integer"),
        (dict(method="slerp", options={"t": float("inf")}), "t", "not a finite number"),
        (dict(method="geometric_median", options={"iterations": 0}), "iterations", r"in \[1, 10000\]"),
        (dict(method="ties", options={"densty": 0.5}), "densty", "did you mean 'density'"),
        (dict(method="model_stock", alpha=0.5), "alpha", "model_stock takes no hyper-parameters, not `alpha`"),
        (dict(method="model_stock", blocks="GRAD_V"), "blocks", "no ratio to set per block"),
        (dict(method="slerp", blocks="GRAD_V", options={"t": 0.5}), "blocks", "either block weights"),
    ],
)
def test_bad_hyper_parameters_are_refused_naming_the_field(kwargs, field, match):
    with pytest.raises(MergeSpecError, match=match) as err:
        MergeSpec(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    "method, n, match",
    [
        ("model_stock", 2, r"model_stock merges at least 3 models \(base, ...\), got 2"),
        ("slerp", 3, r"slerp merges two models \(a, b\), got 3"),
        ("ties", 1, "ties merges at least 2 models"),
        ("dare", 1, "dare merges at least 2 models"),
    ],
)
def test_wrong_model_counts_are_refused(method, n, match):
    with pytest.raises(MergeSpecError, match=match):
        MergeSpec(method).check_models(n)


def test_a_method_added_from_outside_is_one_function():
    @merge_method(ratio="w")
    def _towards_b(a: torch.Tensor, b: torch.Tensor, *, w: Annotated[float, Range(0, 1)] = 0.5) -> torch.Tensor:
        return a + w * (b - a)

    try:
        m = get_merge_method("towards_b")
        assert m.hypers["w"].range == Range(0, 1)
        with pytest.raises(MergeSpecError, match=r"w: 2 is not a finite number in \[0, 1\]"):
            MergeSpec("towards_b", options={"w": 2})
        spec = MergeSpec("towards_b", options={"w": 0.25})
        assert spec.resolved() == {"w": 0.25}
        assert torch.equal(m([torch.zeros(2), torch.ones(2) * 4], spec.resolved()), torch.ones(2))
    finally:
        del MERGE_METHODS["towards_b"]


def test_spec_json_round_trip_keeps_the_options():
    spec = MergeSpec("dare", options={"drop_rate": 0.3, "merge_seed": 7})
    assert MergeSpec(**spec.as_json()) == spec
    assert spec.resolved() == {"drop_rate": 0.3, "alpha": 1.0, "merge_seed": 7}
