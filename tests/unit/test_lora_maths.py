"""LoRA maths on hand-made tensors: the truncated SVD is the best approximation of its rank
(its error is the norm of the dropped singular values), exact at full rank, and a layer's delta
is (alpha / r) B A for Linear and Conv shapes."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.weights.lora import LoraLayer, lora_delta, truncated_svd


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    kernel=st.sampled_from([None, 1, 3]),
    rank=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_truncated_svd_keeps_the_largest_singular_values(out, inp, kernel, rank, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (out, inp) if kernel is None else (out, inp, kernel, kernel)
    delta = torch.randn(shape, generator=g, dtype=torch.float64).float()
    up, down = truncated_svd(delta, rank)
    r = min(rank, out, math.prod(shape[1:]))
    assert down.shape == (r, *shape[1:]) and up.shape == ((out, r) if kernel is None else (out, r, 1, 1))
    approx = lora_delta(LoraLayer(down, up))
    assert approx.shape == delta.shape
    s = torch.linalg.svdvals(delta.flatten(1).double())
    dropped = float(s[r:].pow(2).sum().sqrt())  # Eckart-Young: the best rank-r error
    err = float((delta.double() - approx.double()).flatten().norm())
    assert abs(err - dropped) <= 1e-4 * (1 + float(s.norm()))


def test_a_layers_delta_is_its_scaled_product():
    down = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])  # (r=2, in=3)
    up = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # (out=2, r=2)
    want = torch.tensor([[1.0, 1.0, 2.0], [0.0, 3.0, 0.0]])
    assert torch.equal(lora_delta(LoraLayer(down, up)), want)
    assert torch.equal(lora_delta(LoraLayer(down, up, alpha=1.0)), want / 2)  # alpha / r
    conv = lora_delta(LoraLayer(down.reshape(2, 3, 1, 1).repeat(1, 1, 3, 3), up.reshape(2, 2, 1, 1)))
    assert conv.shape == (2, 3, 3, 3) and torch.equal(conv[:, :, 1, 2], want)


def test_per_sample_names_mix_single_loras_at_one_weight_each():
    """Models of one base share a call when each runs at most one LoRA and every LoRA has one
    weight among them; otherwise None (they run apart)."""
    from multifusion.lora import BASE_ONLY, AdapterSet, per_sample_names

    a, b, a_weak, ab = (
        AdapterSet(("a",), (0.8,)),
        AdapterSet(("b",), (1.0,)),
        AdapterSet(("a",), (0.3,)),
        AdapterSet(("a", "b"), (1.0, 1.0)),
    )
    assert per_sample_names([None, a, b, AdapterSet()]) == ([BASE_ONLY, "a", "b", BASE_ONLY], {"a": 0.8, "b": 1.0})
    assert per_sample_names([a, a]) == (["a", "a"], {"a": 0.8})
    assert per_sample_names([a, a_weak]) is None
    assert per_sample_names([None, ab]) is None
