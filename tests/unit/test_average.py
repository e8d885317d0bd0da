import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.noise.average import Average, weighted_average


def test_weighted_average_matches_formula():
    a, b = torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), 4.0)
    out = weighted_average([a, b], [1.0, 2.0])
    assert torch.allclose(out, torch.full_like(a, (1 * 1 + 2 * 4) / 3))


@given(st.floats(0.01, 100), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_single_or_identical_inputs_are_returned_exactly(w, seed):
    e = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(weighted_average([e], [w]), e)
    assert torch.equal(weighted_average([e, e], [w, w]), e)


@given(st.lists(st.floats(0.0, 10.0), min_size=2, max_size=5).filter(lambda w: sum(w) > 0.1), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_average_is_a_convex_combination_and_order_free(weights, seed):
    g = torch.Generator().manual_seed(seed)
    eps = [torch.randn(1, 4, 2, 2, generator=g) for _ in weights]
    out = weighted_average(eps, weights)
    stacked = torch.stack(eps)
    assert torch.all(out <= stacked.max(0).values + 1e-5) and torch.all(out >= stacked.min(0).values - 1e-5)
    perm = list(reversed(range(len(weights))))
    assert torch.allclose(out, weighted_average([eps[i] for i in perm], [weights[i] for i in perm]), atol=1e-5)


def test_zero_total_weight_is_an_error():
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([torch.zeros(1), torch.ones(1)], [0.0, 0.0])


def test_average_skips_models_with_zero_weight_and_checks_lengths():
    calls = []

    def fn(value):
        def f(x, t, record=None):
            calls.append(value)
            return torch.full_like(x, value)

        return f

    x = torch.zeros(1, 4, 2, 2)
    out = Average([fn(1.0), fn(5.0)], [0.0, 1.0])(x, torch.tensor(10))
    assert calls == [5.0] and torch.equal(out, torch.full_like(x, 5.0))
    with pytest.raises(ValueError, match="one weight per model"):
        Average([fn(1.0)], [0.5, 0.5])
