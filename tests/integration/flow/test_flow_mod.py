"""Mixture of Diffusers on flow transformers: regions on the patch grid, each region a whole image
of its own size to the model, one region over the canvas equal to `single`."""

import pytest
import torch
from handmade import mixed, region_weight

from multifusion import load_models, mod, run, single
from multifusion.errors import RecipeError
from multifusion.noise.regions import Canvas, Region

PROMPT, OTHER = "a red circle in a snowy field", "a blue square"
KW = dict(num_inference_steps=3, seed=4, num_images=2, progress=False)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_region_over_the_canvas_is_single(flow_dir, family):
    [a] = load_models([str(flow_dir / f"{family}_a")])
    ref = single(a, PROMPT, guidance_scale=3.5, height=16, width=24, **KW).latents
    region = {"row_init": 0, "row_end": 16, "col_init": 0, "col_end": 24, "prompt": PROMPT}
    assert torch.equal(mod([a], regions=[region], guidance_scale=3.5, height=16, width=24, **KW).latents, ref)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_region_is_denoised_as_an_image_of_its_own_size(flow_dir, family):
    """Two side-by-side regions with constant weights: each half of the canvas' prediction is the
    model's prediction for that half alone (FLUX's positions start at (0, 0) in each region)."""
    [a] = load_models([str(flow_dir / f"{family}_a")])
    left, right = a.guide(PROMPT, guidance_scale=3.5), a.guide(OTHER, guidance_scale=3.5)
    ones = torch.ones(8, 4)
    canvas = Canvas([Region((0, 8, 0, 4), left, ones), Region((0, 8, 4, 8), right, ones)], (8, 8))
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(800.0)
    v = canvas(x, t)
    assert torch.allclose(v[..., :4], left(x[..., :4], t), atol=1e-6)
    assert torch.allclose(v[..., 4:], right(x[..., 4:], t), atol=1e-6)
    assert not torch.allclose(v[..., :4], a.guide(PROMPT, guidance_scale=3.5)(x, t)[..., :4], atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_flow_models_paint_two_regions_by_their_weights(flow_dir, family):
    """Two different transformers on overlapping regions of unequal widths (8 and 6 latent
    columns, overlapping in 6-7): each step's velocity is the mix, by Gaussian weights computed
    by hand, of each region's own model on its window."""
    a, b = load_models([str(flow_dir / f"{family}_a"), str(flow_dir / f"{family}_b")])
    regions = [
        {"row_init": 0, "row_end": 16, "col_init": 0, "col_end": 16, "prompt": PROMPT, "model": 0},
        {"row_init": 0, "row_end": 16, "col_init": 12, "col_end": 24, "prompt": OTHER, "model": 1},
    ]
    steps = []
    out = mod([a, b], regions=regions, height=16, width=24, guidance_scale=3.5, callback=steps.append, **KW).latents
    assert out.shape[-2:] == (8, 12) and len(steps) == KW["num_inference_steps"]
    parts = [
        (a.guide(PROMPT, guidance_scale=3.5, batch_size=2), (0, 8, 0, 8)),
        (b.guide(OTHER, guidance_scale=3.5, batch_size=2), (0, 8, 6, 12)),
    ]
    weights = [region_weight(8, 8), region_weight(8, 6)]
    for step in steps:
        x, t = step.model_input[0], step.t[0]
        own = [g(x[:, :, r0:r1, c0:c1], t) for g, (r0, r1, c0, c1) in parts]
        assert (own[0][..., 6:] - own[1][..., :2]).abs().mean() > 1e-2  # the models differ where they overlap
        # float64 by hand against float32 in the library
        torch.testing.assert_close(
            step.eps[0].double(), mixed(own, [p[1] for p in parts], weights, (8, 12)), rtol=1e-5, atol=1e-6
        )


def _recipe(flow_dir, region, height=16, width=24):
    return {
        "method": "mod",
        "models": [{"model": str(flow_dir / "flux_a")}],
        "params": {"regions": [region], "background": {"prompt": OTHER}},
        "sampling": {"num_inference_steps": 2, "height": height, "width": width},
    }


def test_regions_off_the_patch_grid_are_refused_naming_the_field(flow_dir):
    """The tiny models' VAE factor is 2 and their patches 2x2 latents: a 4-pixel grid (16 px for
    the real models)."""
    region = {"row_init": 0, "row_end": 16, "col_init": 0, "col_end": 22, "prompt": PROMPT}
    with pytest.raises(
        RecipeError, match=r"params.regions\[0\].col_end: 22 px is not on the 4-pixel patch grid of FLUX.1 models.*use 20 or 24"
    ):
        run(_recipe(flow_dir, region), progress=False)


def test_a_canvas_off_the_patch_grid_is_refused_before_loading(flow_dir):
    region = {"row_init": 0, "row_end": 18, "col_init": 0, "col_end": 24, "prompt": PROMPT}
    with pytest.raises(
        RecipeError, match=r"sampling.height: 18 is not a multiple of 4, the patch grid of FLUX.1 models.*use 16 or 20"
    ):
        run(_recipe(flow_dir, region, height=18), progress=False)
