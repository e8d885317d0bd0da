"""K-LoRA's maths (features/klora.py) on hand-made updates: top-K sums, gamma with its outlier
rule, the style scale over sampling, and the per-layer choice."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.features.klora import balance, choose_subject, step_progress, style_scale, topk_sum


def test_topk_sum_of_a_hand_made_update():
    dw = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.0, -0.25]])
    assert topk_sum(dw, 1) == 3.0
    assert topk_sum(dw, 2) == 5.0  # |-3| + |2|
    assert topk_sum(dw, 3) == 6.0
    assert topk_sum(dw, 6) == 6.75
    assert topk_sum(dw, 99) == 6.75  # more than its entries: every entry


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=40),
    st.integers(1, 50),
    st.randoms(use_true_random=False),
)
def test_topk_sum_is_the_sum_of_the_k_largest_magnitudes(values, k, rnd):
    """Invariant under sign flips and reordering; the k largest |entries| summed, as a sort
    finds them; non-decreasing in k."""
    dw = torch.tensor(values)
    expected = sum(sorted((abs(v) for v in values), reverse=True)[:k])
    assert math.isclose(float(topk_sum(dw, k)), expected, rel_tol=1e-5, abs_tol=1e-5)
    shuffled = list(values)
    rnd.shuffle(shuffled)
    flipped = torch.tensor([-v for v in shuffled]).reshape(1, -1)
    assert math.isclose(float(topk_sum(flipped, k)), float(topk_sum(dw, k)), rel_tol=1e-6, abs_tol=1e-6)
    assert float(topk_sum(dw, k + 1)) >= float(topk_sum(dw, k)) * (1 - 1e-6) - 1e-6  # float32 sums in another order


def test_gamma_is_the_mean_ratio_without_outliers():
    # ratios 1, 2, 3, 30: mean 9; 30 >= 27 is left out; mean of 1, 2, 3 = 2
    assert balance([1.0, 4.0, 3.0, 30.0], [1.0, 2.0, 1.0, 1.0]) == 2.0
    # no outlier: the plain mean
    assert balance([1.0, 3.0], [1.0, 1.0]) == 2.0
    # a zero total gives no ratio; none left: 1
    assert balance([1.0, 2.0], [0.0, 1.0]) == 2.0
    assert balance([1.0], [0.0]) == 1.0
    assert balance([0.0], [0.0]) == 1.0


def test_style_scale_s_and_s_star():
    assert style_scale(0.0) == 0.5
    assert style_scale(1.0) == 2.0
    assert style_scale(0.5, alpha=1.5, beta=0.5) == 1.25
    # s*: beta = 0.85 alpha; it rises to alpha at p = 0.15, wraps to 0 and climbs again
    assert style_scale(0.0, 1.5, 1.275, wrap=True) == pytest.approx(1.275)
    assert style_scale(0.1, 1.5, 1.275, wrap=True) == pytest.approx(1.425)
    assert style_scale(0.2, 1.5, 1.275, wrap=True) == pytest.approx(0.075)
    assert style_scale(1.0, 1.5, 1.275, wrap=True) == pytest.approx(1.275)


def test_step_progress_is_the_middle_of_the_reference_counter_interval():
    """The reference's p for layer j of L in step i of N is (i L + j) / (N L); the middle over
    j = 1..L is (i + 1/2) / N + 1 / (2 N L)."""
    n, layers = 5, 560
    for i in range(n):
        ref = [(i * layers + j) / (n * layers) for j in range(1, layers + 1)]
        assert step_progress(i, n) == pytest.approx(sum(ref) / len(ref), abs=1 / (n * layers))
        assert min(ref) > i / n and max(ref) <= (i + 1) / n


def test_choice_per_layer():
    subject = torch.tensor([4.0, 4.0, 1.0, 0.0, 3.0])
    style = torch.tensor([1.0, 3.0, 1.0, 0.0, 0.0])
    # gamma 2: subject/2 = 2, 2, 0.5, 0, 1.5 against style * 1 = 1, 3, 1, 0, 0
    assert choose_subject(subject, style, 2.0, 1.0).tolist() == [True, False, False, False, True]
    # the style's weight grows over sampling: a layer the subject held goes to the style
    assert choose_subject(subject, style, 2.0, 2.5).tolist() == [False, False, False, False, True]


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.01, 100),
    st.floats(0.01, 100),
    st.floats(0.1, 10),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_a_layer_goes_from_subject_to_style_at_most_once_under_s(sc, ss, gamma, p, q):
    """Under s the style scale only grows with p: a layer on the style at p stays there later."""
    lo, hi = sorted((p, q))
    early = choose_subject(torch.tensor([sc]), torch.tensor([ss]), gamma, style_scale(lo))
    late = choose_subject(torch.tensor([sc]), torch.tensor([ss]), gamma, style_scale(hi))
    assert not (late and not early)
