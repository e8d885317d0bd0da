import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.noise.snb import blend, blend_mask, blur2d, gate_by_base, salience, spatial_softmax


def _blob(h, w, cy, cx, value=5.0):
    r = torch.zeros(1, 4, h, w)
    r[:, :, cy - 1 : cy + 2, cx - 1 : cx + 2] = value
    return r


@pytest.mark.parametrize("kind", ["box", "gaussian", "none"])
def test_blur_keeps_size_and_constants(kind):
    x = torch.full((2, 3, 7, 9), 2.5)
    y = blur2d(x, kind, size=4, sigma=1.0)
    assert y.shape == x.shape and torch.allclose(y, x)


def test_box_blur_is_a_local_mean():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 16.0
    y = blur2d(x, "box", size=4)
    assert torch.isclose(y.sum(), torch.tensor(16.0)) and torch.isclose(y.max(), torch.tensor(1.0))


def _impulse(h=11, w=11, r=5, c=5):
    x = torch.zeros(1, 1, h, w, dtype=torch.float64)
    x[0, 0, r, c] = 1.0
    return x


@pytest.mark.parametrize(
    "sigma, taps",
    [
        (1.0, [math.exp(-2), math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(-2)]),  # radius ceil(2 sigma) = 2
        (0.5, [math.exp(-2), 1.0, math.exp(-2)]),  # radius 1: taps at +-1 are exp(-1 / (2 * 0.25))
        (1.3, [math.exp(-(a * a) / (2 * 1.69)) for a in (-3, -2, -1, 0, 1, 2, 3)]),  # radius ceil(2.6) = 3
    ],
)
def test_gaussian_blur_of_an_impulse_is_the_hand_computed_kernel(sigma, taps):
    """Away from the borders an impulse comes back as the kernel itself: the outer product of
    the normalised taps exp(-a^2 / (2 sigma^2)), a = -ceil(2 sigma)..ceil(2 sigma)."""
    g = torch.tensor(taps, dtype=torch.float64) / sum(taps)
    r = len(taps) // 2
    want = torch.zeros(11, 11, dtype=torch.float64)
    want[5 - r : 5 + r + 1, 5 - r : 5 + r + 1] = torch.outer(g, g)
    torch.testing.assert_close(blur2d(_impulse(), "gaussian", sigma=sigma)[0, 0], want, rtol=1e-12, atol=1e-15)


def test_box_blur_of_an_impulse_is_the_hand_computed_window():
    """A k x k box averages rows i - (k - 1) // 2 .. i + k // 2 (and columns alike) into output
    i, so an impulse at (5, 5) spreads 1 / k^2 over outputs 5 - k // 2 .. 5 + (k - 1) // 2: for
    k = 4, rows and columns 3..6, for k = 3, 4..6, for k = 1 only (5, 5)."""
    for k, lo, hi in ((4, 3, 6), (3, 4, 6), (2, 4, 5), (1, 5, 5)):
        want = torch.zeros(11, 11, dtype=torch.float64)
        want[lo : hi + 1, lo : hi + 1] = 1 / k**2
        torch.testing.assert_close(blur2d(_impulse(), "box", size=k)[0, 0], want, rtol=1e-12, atol=1e-15, msg=f"k = {k}")


def test_blurs_replicate_the_border():
    """An impulse in the corner: replicate padding folds the taps that fall off the image back
    onto the corner pixel, so the corner keeps (sum of the taps at offsets <= 0)^2."""
    corner = _impulse(r=0, c=0)
    g = torch.tensor([math.exp(-2), math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(-2)], dtype=torch.float64)
    g = g / g.sum()
    assert math.isclose(float(blur2d(corner, "gaussian", sigma=1.0)[0, 0, 0, 0]), float(g[:3].sum()) ** 2, rel_tol=1e-12)
    # box 4: output (0, 0) averages rows -1..2 and columns -1..2, where row and column -1 repeat row and column 0
    assert math.isclose(float(blur2d(corner, "box", size=4)[0, 0, 0, 0]), 4 / 16, rel_tol=1e-12)


def _reference_blur(x: torch.Tensor, kind: str, size: int, sigma: float) -> torch.Tensor:
    """blur2d written as the docstring says, one output pixel at a time: border pixels repeated
    (index clamped), a size x size window i - (size - 1) // 2 .. i + size // 2 for the box, the
    normalised Gaussian taps of radius ceil(2 sigma) for the Gaussian."""
    if kind == "box":
        offsets = list(range(-((size - 1) // 2), size // 2 + 1))
        taps = [1.0 / size] * size
    else:
        r = math.ceil(2 * sigma)
        offsets = list(range(-r, r + 1))
        raw = [math.exp(-(a * a) / (2 * sigma * sigma)) for a in offsets]
        taps = [v / sum(raw) for v in raw]
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for a, ta in zip(offsets, taps):
                for d, td in zip(offsets, taps):
                    out[:, :, i, j] += ta * td * x[:, :, min(max(i + a, 0), h - 1), min(max(j + d, 0), w - 1)]
    return out


@given(
    st.sampled_from(["box", "gaussian"]),
    st.integers(1, 5),
    st.floats(0.3, 2.0),
    st.integers(5, 9),
    st.integers(5, 9),
    st.integers(0, 10_000),
)
@settings(max_examples=25, deadline=None)
def test_blur_equals_the_pixel_by_pixel_reference(kind, size, sigma, h, w, seed):
    x = torch.randn(2, 2, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(
        blur2d(x, kind, size=size, sigma=sigma), _reference_blur(x, kind, size, sigma), rtol=1e-10, atol=1e-12
    )


def test_salience_is_channel_mean_of_blurred_magnitude():
    r = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    s = salience(r, "none")
    assert s.shape == (2, 1, 6, 6) and torch.allclose(s, r.abs().mean(1, keepdim=True))
    assert torch.equal(salience(-r, "box"), salience(r, "box"))


@given(st.floats(0.01, 50.0), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_spatial_softmax_sums_to_one_per_image(k, seed):
    s = torch.rand(3, 1, 5, 7, generator=torch.Generator().manual_seed(seed))
    m = spatial_softmax(s, k)
    assert torch.allclose(m.sum(dim=(1, 2, 3)), torch.ones(3), atol=1e-5)
    assert torch.equal(m.flatten(1).argmax(1), s.flatten(1).argmax(1))


def test_a_bright_blob_selects_its_model_there():
    h = w = 12
    resp_a, resp_b = _blob(h, w, 3, 3), _blob(h, w, 8, 8)
    maps = torch.stack([spatial_softmax(salience(r, "box", 3), 1.0) for r in (resp_a, resp_b)])
    mask = blend_mask(maps)
    assert mask.shape == (2, 1, 1, h, w)
    assert mask[0, 0, 0, 3, 3] == 1 and mask[1, 0, 0, 8, 8] == 1
    assert torch.equal(mask.sum(0), torch.ones(1, 1, h, w))


def test_large_k_makes_the_mask_follow_that_models_salience():
    g = torch.Generator().manual_seed(3)
    resp = [torch.rand(1, 4, 10, 10, generator=g) for _ in range(2)]
    sal = [salience(r, "none") for r in resp]
    maps = torch.stack([spatial_softmax(sal[0], 200.0), spatial_softmax(sal[1], 1.0)])
    mask = blend_mask(maps)
    peak = sal[0].flatten().argmax()
    assert mask[0].flatten()[peak] == 1
    # Model 0 wins only where its own salience is high: its winning pixels are its top ones.
    won = mask[0].flatten().bool()
    assert sal[0].flatten()[won].min() >= torch.quantile(sal[0].flatten(), 0.8)


@given(st.integers(2, 4), st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_soft_mask_sums_to_one_and_hardens_as_temperature_falls(n, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.stack([spatial_softmax(torch.rand(1, 1, 4, 4, generator=g) * 5, 1.0) for _ in range(n)])
    soft = blend_mask(maps, temperature=1.0)
    assert torch.allclose(soft.sum(0), torch.ones(1, 1, 4, 4), atol=1e-5)
    cold = blend_mask(maps, temperature=1e-4)
    # Away from near-ties (log-ratio of the two largest maps > 0.01, i.e. exp(100) at T = 1e-4)
    # the cold soft mask is the hard one.
    top2 = maps.log().topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 0.01
    assert torch.allclose(cold[:, clear], blend_mask(maps)[:, clear], atol=1e-3)


def test_blend_picks_the_chosen_models_values_exactly():
    eps = torch.stack([torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), 7.0)])
    mask = torch.zeros(2, 1, 1, 2, 2)
    mask[0, ..., 0] = 1
    mask[1, ..., 1] = 1
    out = blend(eps, mask)
    assert torch.equal(out[..., 0], torch.full((1, 4, 2), 1.0)) and torch.equal(out[..., 1], torch.full((1, 4, 2), 7.0))
    half = torch.full((2, 1, 1, 2, 2), 0.5)
    assert torch.allclose(blend(eps, half), torch.full((1, 4, 2, 2), 4.0))


def test_gate_keeps_the_base_map_and_scales_the_others_by_its_relative_height():
    base = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2) / 11
    other = torch.full((1, 1, 2, 2), 0.5)
    gated = gate_by_base(torch.stack([base, other]))
    assert torch.equal(gated[0], base)
    # g = (M_0 - min) / (max - min) = [[0, 1/4], [1/2, 1]]
    assert torch.allclose(gated[1], torch.tensor([[0.0, 0.125], [0.25, 0.5]]).view(1, 1, 2, 2))
    # Where the base responds least it wins; at its peak the comparison is unchanged (0.5 > 5/11).
    mask = blend_mask(gated)
    assert mask[0, 0, 0, 0, 0] == 1 and mask[1, 0, 0, 1, 1] == 1


def test_gate_over_a_constant_base_map_changes_nothing():
    maps = torch.stack([torch.full((2, 1, 3, 3), 1 / 9), torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(gate_by_base(maps), maps)


def test_gate_with_one_model_is_the_identity():
    maps = torch.rand(1, 2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gate_by_base(maps), maps)


@given(st.integers(2, 4), st.integers(0, 10_000), st.sampled_from([None, 0.5, 2.0]))
@settings(max_examples=40, deadline=None)
def test_gated_models_never_gain_pixels(n, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    maps = torch.stack([spatial_softmax(torch.rand(2, 1, 5, 6, generator=g) * 4, 1.0) for _ in range(n)])
    plain, gated = blend_mask(maps, temperature), blend_mask(gate_by_base(maps), temperature)
    # The base's share only grows; together the others' share only shrinks.
    assert (gated[0] >= plain[0] - 1e-6).all()
    assert (gated[1:].sum(0) <= plain[1:].sum(0) + 1e-6).all()
    assert torch.allclose(gated.sum(0), torch.ones(2, 1, 5, 6), atol=1e-5)


def test_region_gate_renormalises_inside_the_base_response():
    base = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2) / 11
    other = torch.full((1, 1, 2, 2), 0.25)
    gated = gate_by_base(torch.stack([base, other]), renormalise=True)
    # g = [[0, 1/4], [1/2, 1]] times 1/4, over its sum 7/16: [[0, 1/7], [2/7, 4/7]]
    assert torch.allclose(gated[1], torch.tensor([[0.0, 1 / 7], [2 / 7, 4 / 7]]).view(1, 1, 2, 2))
    assert torch.equal(gated[0], base)
    # The plain gate would leave the expert nothing (0.25 * g < M_0 everywhere); renormalised it
    # wins at the base's peak (4/7 > 5/11) and still never where the base responds least.
    assert blend_mask(gate_by_base(torch.stack([base, other])))[1].sum() == 0
    mask = blend_mask(gated)
    assert mask[1, 0, 0, 1, 1] == 1 and mask[0, 0, 0, 0, 0] == 1


def test_region_gate_of_a_map_gated_to_zero_stays_zero():
    base = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    other = torch.tensor([[0.5, 0.0], [0.25, 0.25]]).view(1, 1, 2, 2)  # nothing where the base responds
    gated = gate_by_base(torch.stack([base, other]), renormalise=True)
    assert torch.equal(gated[1], torch.zeros(1, 1, 2, 2))


@given(st.integers(2, 4), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_region_gated_maps_sum_to_one_and_vanish_where_the_base_responds_least(n, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.stack([spatial_softmax(torch.rand(2, 1, 5, 6, generator=g) * 4, 1.0) for _ in range(n)])
    gated = gate_by_base(maps, renormalise=True)
    assert torch.allclose(gated[1:].sum(dim=(-2, -1)), torch.ones(n - 1, 2, 1), atol=1e-5)
    least = maps[0] == maps[0].amin(dim=(-2, -1), keepdim=True)  # (B, 1, H, W)
    assert (gated[1:][:, least] == 0).all()
