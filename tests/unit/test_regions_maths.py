import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.errors import RecipeError
from multifusion.noise.methods import Box, TilesParams
from multifusion.noise.regions import (
    ImageRegion,
    coverage,
    gaussian_weights,
    hold_image_regions,
    mix,
    normalised_weights,
    quartic_weights,
    region_weights,
    reroll,
)


def test_gaussian_weights_match_the_formula_computed_by_hand():
    h, w, var = 5, 8, 0.01
    ref = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            gy = math.exp(-(((y - (h - 1) / 2) / h) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
            gx = math.exp(-(((x - (w - 1) / 2) / w) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
            ref[y, x] = gy * gx
    assert np.allclose(gaussian_weights(h, w).numpy(), ref, rtol=1e-6)
    g = gaussian_weights(h, w)
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))  # centred in both axes


def test_quartic_weights_match_the_formula_and_stay_positive():
    n = 6
    u = [i / (n - 1) * 1.99 - 0.995 for i in range(n)]
    k = [15 / 16 * (1 - x * x) ** 2 for x in u]
    # A one-pixel-wide region has the kernel's peak value 15/16 across.
    assert np.allclose(quartic_weights(n, 1).numpy()[:, 0], np.array(k) * 15 / 16, rtol=1e-6)
    assert (quartic_weights(7, 3) > 0).all()
    assert torch.equal(region_weights(3, 4, "constant", 2.5), torch.full((3, 4), 2.5))
    with pytest.raises(ValueError, match="mask_type"):
        region_weights(2, 2, "cosine")


boxes = st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(0, 7), st.integers(1, 8)).filter(
    lambda b: b[0] < b[1] and b[2] < b[3]
)


@given(st.lists(boxes, min_size=1, max_size=4), st.sampled_from(["gaussian", "quartic", "constant"]), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_normalised_weights_sum_to_one_on_covered_pixels(bs, mask_type, seed):
    canvas = (6, 8)
    ws = [region_weights(b[1] - b[0], b[3] - b[2], mask_type) for b in bs]
    ones = [torch.ones(1, 1, b[1] - b[0], b[3] - b[2]) for b in bs]
    covered = coverage(bs, ws, canvas) > 0
    out = mix(ones, bs, ws, canvas)[0, 0]
    assert torch.allclose(out[covered], torch.ones(int(covered.sum())), atol=1e-5)
    # A constant field stays constant; a mix never leaves the range of its inputs.
    g = torch.Generator().manual_seed(seed)
    eps = [torch.rand(1, 2, b[1] - b[0], b[3] - b[2], generator=g) for b in bs]
    m = mix(eps, bs, ws, canvas)[:, :, covered]
    assert m.min() >= min(e.min() for e in eps) - 1e-5 and m.max() <= max(e.max() for e in eps) + 1e-5


def test_one_full_region_is_returned_exactly():
    e = torch.randn(2, 4, 3, 5)
    assert mix([e], [(0, 3, 0, 5)], [gaussian_weights(3, 5)], (3, 5)) is e


def test_pixel_to_latent_mapping_on_a_non_square_canvas():
    canvas = (32, 96)  # height 32, width 96: latent 8 x 24 at factor 4
    assert Box(row_init=0, row_end=32, col_init=64, col_end=96).latent_box("r", canvas, 4) == (0, 8, 16, 24)
    frac = Box(row_init=0.5, row_end=1.0, col_init=0.0, col_end=1 / 3, units="fraction")
    assert frac.latent_box("r", canvas, 4) == (4, 8, 0, 8)
    with pytest.raises(RecipeError, match=r"r.col_end: 100 lies outside the 32x96 canvas"):
        Box(row_init=0, row_end=32, col_init=0, col_end=100).latent_box("r", canvas, 4)
    with pytest.raises(RecipeError, match=r"r.row_end: 30 is not a multiple of the VAE factor 4; use 28 or 32"):
        Box(row_init=0, row_end=30, col_init=0, col_end=8).latent_box("r", canvas, 4)
    with pytest.raises(RecipeError, match="empty on the 4-pixel latent grid"):
        Box(row_init=0, row_end=0.01, col_init=0, col_end=0.5, units="fraction").latent_box("r", canvas, 4)


def test_tiles_make_regions_and_canvas():
    t = TilesParams(
        prompts=[["a", "b", "c"], ["d", "e", "f"]], tile_height=32, tile_width=48, tile_row_overlap=8, tile_col_overlap=16
    )
    assert t.canvas() == (2 * 32 - 8, 3 * 48 - 2 * 16)
    regions = t.regions()
    assert [(r.prompt, r.row_init, r.col_init) for r in regions][:4] == [("a", 0, 0), ("b", 0, 32), ("c", 0, 64), ("d", 24, 0)]
    assert regions[-1].row_end == t.canvas()[0] and regions[-1].col_end == t.canvas()[1]


def test_reroll_changes_only_its_box_and_does_not_depend_on_the_batch():
    noise = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    out = reroll(noise, (1, 3, 2, 5), seed=7, image_seeds=[10, 11, 12], mode="reset")
    inside = torch.zeros(6, 6, dtype=torch.bool)
    inside[1:3, 2:5] = True
    assert torch.equal(out[:, :, ~inside], noise[:, :, ~inside]) and not torch.equal(out[:, :, inside], noise[:, :, inside])
    alone = reroll(noise[1:2], (1, 3, 2, 5), seed=7, image_seeds=[11], mode="reset")
    assert torch.equal(alone, out[1:2])
    nudged = reroll(noise, (1, 3, 2, 5), seed=7, image_seeds=[10, 11, 12], mode="epsilon", eps=0.1)
    assert torch.allclose((nudged - noise)[:, :, inside], 0.1 * out[:, :, inside], atol=1e-6)


def test_image_region_is_held_until_its_strength():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(10)
    latents, noise = torch.zeros(1, 4, 4, 4), torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = torch.ones(1, 4, 2, 2)
    region = ImageRegion((0, 2, 0, 2), ref, strength=0.5)
    t_next = sched.timesteps[3]
    held = hold_image_regions(latents, noise, [region], sched, t_next, fraction=0.3)
    a = sched.alphas_cumprod[t_next]
    assert torch.allclose(held[:, :, :2, :2], a.sqrt() * ref + (1 - a).sqrt() * noise[:, :, :2, :2])
    assert torch.equal(held[:, :, 2:, :], latents[:, :, 2:, :])
    assert hold_image_regions(latents, noise, [region], sched, t_next, fraction=0.6) is latents
    end = hold_image_regions(latents, noise, [ImageRegion((0, 2, 0, 2), ref, 1.0)], sched, None, fraction=0.999)
    assert torch.equal(end[:, :, :2, :2], ref)


def test_normalised_weights_are_what_mix_gives_each_region():
    boxes = [(0, 4, 0, 6), (0, 4, 3, 8)]  # overlapping in columns 3-5, column 8 of 9 uncovered
    weights = [region_weights(4, 6), region_weights(4, 5, "quartic", 2.0)]
    shares = normalised_weights(boxes, weights, (4, 9))
    assert shares.shape == (2, 4, 9)
    assert torch.allclose(shares[:, :, :8].sum(0), torch.ones(4, 8)) and torch.equal(shares[:, :, 8], torch.zeros(2, 4))
    assert torch.equal(shares[0, :, :3], torch.ones(4, 3)) and torch.equal(shares[1, :, 6:8], torch.ones(4, 2))
    # mix of constant predictions 1 and 0 is region 0's share, pixel by pixel
    eps = [torch.ones(1, 1, 4, 6), torch.zeros(1, 1, 4, 6)]
    wide = [(0, 4, 0, 6), (0, 4, 3, 9)]
    w2 = [weights[0], region_weights(4, 6, "quartic", 2.0)]
    assert torch.allclose(mix(eps, wide, w2, (4, 9))[0, 0], normalised_weights(wide, w2, (4, 9))[0], atol=1e-6)
