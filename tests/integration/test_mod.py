"""Mixture of Diffusers on tiny models: degenerate cases, batching, non-square canvases,
image-guided regions, bad input."""

import pytest
import torch
from handmade import mixed, region_weight, shares
from PIL import Image

from multifusion import RecipeError, load_models, single
from multifusion.api import run
from multifusion.loop import Trajectory, initial_noise, sample
from multifusion.noise.regions import Canvas, Region, region_weights
from multifusion.schedulers import make_scheduler

PROMPT = "a red circle in a snowy field"


def ddim(fn, handle, noise, steps=3, **kwargs):
    """One trajectory of noise function `fn` under a fresh DDIM scheduler of `handle`."""
    return sample(
        [Trajectory(fn, make_scheduler("ddim", handle.scheduler_config), noise)],
        num_inference_steps=steps,
        progress=False,
        **kwargs,
    )[0]


def mod(models, params, **sampling):
    return {
        "method": "mod",
        "models": [{"model": m} for m in models],
        "params": params,
        "sampling": {"num_inference_steps": 4, "seed": 3, "num_images": 2, **sampling},
    }


def check_steps_mix(steps, parts, canvas):
    """Every recorded step's prediction recomputed by hand: each region's own noise function on
    its window of the step's input, weighted by its hand-computed share of each pixel. `parts`:
    (noise function, latent box, hand-computed weights (h, w)) per region, in the canvas' order."""
    boxes, weights = [b for _, b, _ in parts], [w for _, _, w in parts]
    assert steps
    for step in steps:
        x, t = step.model_input[0], step.t[0]
        preds = [fn(x[:, :, r0:r1, c0:c1], t) for fn, (r0, r1, c0, c1), _ in parts]
        # float64 by hand against float32 in the library: 1e-6 is a few float32 roundings here.
        torch.testing.assert_close(step.eps[0].double(), mixed(preds, boxes, weights, canvas), rtol=1e-5, atol=1e-6)
        if "mod/weights" in step.record:
            torch.testing.assert_close(step.record["mod/weights"].double(), shares(boxes, weights, canvas), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpm++"])
def test_one_region_over_the_canvas_is_single(tiny_a, scheduler):
    [h] = load_models([tiny_a])
    region = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": PROMPT}
    out = run(mod([tiny_a], {"regions": [region]}, scheduler=scheduler), models=[h], progress=False).latents
    ref = single(h, PROMPT, num_inference_steps=4, seed=3, num_images=2, scheduler=scheduler, progress=False).latents
    assert torch.equal(out, ref)


def test_a_region_may_name_another_model(tiny_a, tiny_b):
    ha, hb = load_models([tiny_a, tiny_b], names=["general", "expert"])
    region = {
        "row_init": 0,
        "row_end": 1,
        "col_init": 0,
        "col_end": 1,
        "units": "fraction",
        "prompt": PROMPT,
        "model": "expert",
        "guidance_scale": 3,
    }
    out = run(
        {
            **mod([tiny_a, tiny_b], {"regions": [region]}),
            "models": [{"model": tiny_a, "name": "general"}, {"model": tiny_b, "name": "expert"}],
        },
        models=[ha, hb],
        progress=False,
    ).latents
    ref = single(hb, PROMPT, guidance_scale=3, num_inference_steps=4, seed=3, num_images=2, progress=False).latents
    assert torch.equal(out, ref)


def test_batched_regions_equal_one_at_a_time(tiny_a):
    [h] = load_models([tiny_a])
    tiles = {
        "prompts": [["a red circle", "a blue square", "a pink diamond"]],
        "tile_height": 32,
        "tile_width": 32,
        "tile_col_overlap": 16,
    }
    one = run(mod([tiny_a], {"tiles": tiles, "tile_batch_size": 1}), models=[h], progress=False).latents
    three = run(mod([tiny_a], {"tiles": tiles, "tile_batch_size": 3}), models=[h], progress=False).latents
    assert one.shape == (2, 4, 8, 16)  # canvas 32 x 64 pixels from the tiles
    assert torch.allclose(one, three, atol=1e-5)


def test_the_default_tile_batch_is_the_largest_the_memory_budget_holds(tiny_a):
    """tile_batch_size unset: with room for every tile the run is the 3-tile batch bit for bit,
    with room for none it is one tile per call bit for bit, and both equal one tile per call to
    float rounding. The rule itself on hand-set budgets: 2.5 tiles' activations hold 2."""
    from multifusion.memory import GiB, activations_per_input
    from multifusion.noise.methods import memory_tile_batch
    from multifusion.recipe import Runtime

    [h] = load_models([tiny_a])
    tiles = {
        "prompts": [["a red circle", "a blue square", "a pink diamond"]],
        "tile_height": 32,
        "tile_width": 32,
        "tile_col_overlap": 16,
    }
    latents = {k: run(mod([tiny_a], {"tiles": tiles, "tile_batch_size": k}), models=[h], progress=False).latents for k in (1, 3)}
    roomy = run(mod([tiny_a], {"tiles": tiles}), models=[h], progress=False).latents
    tight = run({**mod([tiny_a], {"tiles": tiles}), "runtime": {"max_memory_gib": 1e-9}}, models=[h], progress=False).latents
    assert torch.equal(roomy, latents[3]) and torch.equal(tight, latents[1])
    torch.testing.assert_close(roomy, latents[1], rtol=1e-5, atol=1e-5)

    guided = [h.guide([p] * 2, guidance_scale=5.0) for p in ("a", "b", "c")]
    group = [Region((0, 4, 4 * i, 4 * i + 4), g, torch.ones(4, 4)) for i, g in enumerate(guided)]
    tile = 2 * 2 * activations_per_input(type(h), h.unet.config, (4, 4, 4), guided[0].positive.embeds.shape[1], torch.float32)
    for held, want in ((0.5, 1), (1.5, 1), (2.5, 2), (3.5, 3), (100, 3)):
        assert memory_tile_batch([group], Runtime(max_memory_gib=held * tile / GiB)) == want, held
    assert memory_tile_batch([], Runtime(max_memory_gib=1e-9)) == 1


def test_non_square_canvas_halves_are_independent_models_runs(tiny_a):
    """Two constant-weight regions side by side on a 32x64 canvas never mix: each half must be
    exactly a single-model run on that half's noise (a swapped height/width would break this)."""
    [h] = load_models([tiny_a])
    left, right = h.guide("a red circle", batch_size=1), h.guide("a blue square", batch_size=1)
    canvas = Canvas(
        [
            Region((0, 8, 0, 8), left, region_weights(8, 8, "constant")),
            Region((0, 8, 8, 16), right, region_weights(8, 8, "constant")),
        ],
        (8, 16),
    )
    noise = initial_noise((4, 8, 16), [torch.Generator().manual_seed(0)])
    both = ddim(canvas, h, noise)
    alone = ddim(right, h, noise[:, :, :, 8:].contiguous())
    assert torch.allclose(both[:, :, :, 8:], alone, atol=1e-5)


def test_image_region_with_full_strength_reproduces_the_reference(tiny_a, tmp_path):
    [h] = load_models([tiny_a])
    Image.new("RGB", (16, 32), (200, 30, 30)).save(tmp_path / "ref.png")
    params = {
        "regions": [{"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": PROMPT}],
        "image_regions": [
            {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 16, "image": str(tmp_path / "ref.png"), "strength": 1.0}
        ],
    }
    out = run(mod([tiny_a], params), models=[h], progress=False).latents
    from multifusion.io import read_rgb_image
    from multifusion.vae import encode

    ref = encode(h.vae, read_rgb_image("x", str(tmp_path / "ref.png"), (32, 16)))
    assert torch.equal(out[:, :, :, :4], ref.expand(2, -1, -1, -1))
    free = run(
        mod([tiny_a], {**params, "image_regions": [{**params["image_regions"][0], "strength": 0.0}]}), models=[h], progress=False
    ).latents
    assert torch.equal(free, run(mod([tiny_a], {"regions": params["regions"]}), models=[h], progress=False).latents)


def test_reroll_keeps_the_rest_of_the_start_noise(tiny_a):
    [h] = load_models([tiny_a])
    region = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": PROMPT, "mask_type": "constant"}
    base = run(mod([tiny_a], {"regions": [region]}), models=[h], progress=False).latents
    rerolled = run(
        mod(
            [tiny_a], {"regions": [region], "rerolls": [{"row_init": 0, "row_end": 16, "col_init": 0, "col_end": 16, "seed": 5}]}
        ),
        models=[h],
        progress=False,
    ).latents
    assert not torch.equal(base, rerolled)
    # Constant weights over one full region: pixels far from the rerolled box keep their latents
    # only approximately (the UNet sees the whole canvas), so compare the untouched corner loosely.
    assert (base - rerolled)[:, :, 6:, 6:].abs().mean() < (base - rerolled)[:, :, :4, :4].abs().mean()


def test_region_weight_picture_and_step_previews(tiny_a, tmp_path):
    """`--export-masks` draws each region's share of the canvas (the UI shows the same file); a
    preview decodes the clean image each step predicts."""
    from multifusion.api import Run, generate_to_folder
    from multifusion.viz import RegionWeightRecorder, x0_previews

    [h] = load_models([tiny_a])
    params = {
        "regions": [
            {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 24, "prompt": PROMPT, "mask_type": "constant"},
            {"row_init": 0, "row_end": 32, "col_init": 8, "col_end": 32, "prompt": "a blue square", "mask_type": "constant"},
        ],
        "background": {"prompt": "a snowy field"},
    }
    written = generate_to_folder(mod([tiny_a], params), tmp_path, stem="canvas", models=[h], export_masks=True, progress=False)
    picture = Image.open(tmp_path / "canvas-s3-regions.png")
    assert tmp_path / "canvas-s3-regions.png" in written and picture.width >= 4 * picture.height // 2  # the mix and three regions

    recorder, previews = RegionWeightRecorder(), []
    session = Run(mod([tiny_a], params), models=[h])
    result = session.batch(
        [3, 4], callback=lambda step: (recorder(step), previews.append(x0_previews(step, h.vae))), progress=False
    )
    assert recorder.names == ["regions[0]", "regions[1]", "background"]
    shares = recorder.shares  # (3, 8, 8): region 0 alone on the left, region 1 alone on the right
    assert shares.shape == (3, 8, 8) and torch.allclose(shares.sum(0), torch.ones(8, 8))
    assert shares[0, :, 0].min() > 0.9 and shares[1, :, 7].min() > 0.9 and shares[2].max() < 0.1
    assert [len(p) for p in previews] == [2] * 4 and previews[0][1][1] == "image 1"
    assert previews[-1][0][0].size == result.images[0].size


def test_guidance_at_or_below_one_and_background(tiny_a):
    """A region at guidance 0.5 predicts halfway between its unconditional and conditional
    predictions, the background at guidance 1 its conditional one, and the canvas mixes them by
    their weights: a Gaussian over the region, a constant 0.01 over the whole canvas."""
    [h] = load_models([tiny_a])
    params = {
        "regions": [{"row_init": 0, "row_end": 16, "col_init": 0, "col_end": 32, "prompt": PROMPT, "guidance_scale": 0.5}],
        "background": {"prompt": "a snowy field", "guidance_scale": 1.0},
    }
    steps = []
    run(mod([tiny_a], params), models=[h], callback=steps.append, progress=False)
    # The unconditional prediction is the model's conditional one on the (empty) negative prompt;
    # guidance 1 runs only that conditional half, so neither side goes through the library's
    # guidance formula, which is under test here.
    uncond, cond = h.guide("", guidance_scale=1.0, batch_size=2), h.guide(PROMPT, guidance_scale=1.0, batch_size=2)

    def halfway(x, t):
        u, c = uncond(x, t), cond(x, t)
        return u + 0.5 * (c - u)

    check_steps_mix(
        steps,
        [
            (halfway, (0, 4, 0, 8), region_weight(4, 8)),
            (h.guide("a snowy field", guidance_scale=1.0, batch_size=2), (0, 8, 0, 8), region_weight(8, 8, "constant", 0.01)),
        ],
        (8, 8),
    )


def test_two_models_paint_overlapping_regions_by_their_weights(tiny_a, tiny_b):
    """Two different models on overlapping regions of unequal sizes (a Gaussian region, a quartic
    one of weight 2) and a background: each step's prediction is the mix, by weights computed by
    hand from the reference formulas, of each region's own model on its window. Regions of one
    model cannot show a weight given to the wrong region; the overlap of two models can."""
    ha, hb = load_models([tiny_a, tiny_b])
    regions = [
        {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 40, "prompt": PROMPT, "model": 0},
        {
            "row_init": 8,
            "row_end": 32,
            "col_init": 24,
            "col_end": 56,
            "prompt": "a blue square",
            "model": 1,
            "mask_type": "quartic",
            "mask_weight": 2.0,
            "guidance_scale": 4.0,
        },
    ]
    params = {"regions": regions, "background": {"prompt": "a snowy field", "model": 1, "mask_weight": 0.05}}
    recipe = {**mod([tiny_a, tiny_b], params, width=56, height=32), "models": [{"model": tiny_a}, {"model": tiny_b}]}
    steps = []
    run(recipe, models=[ha, hb], callback=steps.append, progress=False)
    parts = [
        (ha.guide(PROMPT, batch_size=2), (0, 8, 0, 10), region_weight(8, 10)),
        (hb.guide("a blue square", guidance_scale=4.0, batch_size=2), (2, 8, 6, 14), region_weight(6, 8, "quartic", 2.0)),
        (hb.guide("a snowy field", batch_size=2), (0, 8, 0, 14), region_weight(8, 14, "constant", 0.05)),
    ]
    check_steps_mix(steps, parts, (8, 14))
    # The overlap is shared: at some pixel each of the two models holds more than a tenth.
    share = steps[0].record["mod/weights"]
    assert ((share[0] > 0.1) & (share[1] > 0.1)).any() and steps[0].record["mod/names"][2] == "background"


@pytest.mark.parametrize(
    "params, message",
    [
        (
            {"regions": [{"row_init": 0, "row_end": 40, "col_init": 0, "col_end": 32, "prompt": "x"}]},
            "params.regions[0].row_end: 40 lies outside the 32x32 canvas",
        ),
        (
            {"regions": [{"row_init": 0, "row_end": 30, "col_init": 0, "col_end": 32, "prompt": "x"}]},
            "params.regions[0].row_end: 30 is not a multiple of the VAE factor 4",
        ),
        (
            {"regions": [{"row_init": 8, "row_end": 8, "col_init": 0, "col_end": 32, "prompt": "x"}]},
            "params.regions[0]: empty box",
        ),
        (
            {"regions": [{"row_init": 0, "row_end": 16, "col_init": 0, "col_end": 32, "prompt": "x"}]},
            "covered by no region (pixel rows 16-32, columns 0-32)",
        ),
        (
            {"regions": [{"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": "x", "model": 3}]},
            "params.regions[0].model: index 3",
        ),
        (
            {"regions": [{"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": "x", "mask_type": "cosine"}]},
            "params.regions[0].mask_type",
        ),
        ({"regions": []}, "give `regions` or `tiles`"),
        (
            {
                "regions": [{"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": "x"}],
                "image_regions": [
                    {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "image": "ref.png", "strength": 1.5}
                ],
            },
            "params.image_regions[0].strength: must lie in [0, 1]",
        ),
        (
            {"tiles": {"prompts": [["a", "b"]], "tile_height": 32, "tile_width": 32}},
            "sampling.width: 32 contradicts the tiles' canvas width 64",
        ),
    ],
)
def test_bad_regions_are_refused_before_sampling(tiny_a, params, message):
    recipe = mod([tiny_a], params, height=32, width=32)
    with pytest.raises(RecipeError) as info:
        run(recipe, progress=False)
    assert message in str(info.value)


def test_reference_image_of_a_wrong_mode(tiny_a, tmp_path):
    Image.new("RGBA", (8, 8)).save(tmp_path / "rgba.png")
    params = {
        "regions": [{"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": "x"}],
        "image_regions": [{"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "image": str(tmp_path / "rgba.png")}],
    }
    with pytest.raises(RecipeError, match=r"params.image_regions\[0\].image: .* has mode RGBA; give an RGB image"):
        run(mod([tiny_a], params), progress=False)


def test_python_api_mirrors_the_recipe(tiny_a):
    from multifusion import mod as mixture

    [h] = load_models([tiny_a])
    tiles = {"prompts": [["a red circle", "a blue square"]], "tile_height": 32, "tile_width": 32, "tile_col_overlap": 8}
    out = mixture([h], tiles=tiles, num_inference_steps=3, seed=1, progress=False)
    assert out.images[0].size == (56, 32)  # PIL size is (width, height)
    recipe = {
        "method": "mod",
        "models": [{"model": tiny_a}],
        "params": {"tiles": tiles},
        "sampling": {"num_inference_steps": 3, "seed": 1},
    }
    assert torch.equal(out.latents, run(recipe, models=[h], progress=False).latents)


def test_a_region_may_be_painted_by_snb(tiny_a, tiny_b):
    """Combinators nest: an SNB of a model with itself as the only, full-canvas region is that
    model; an SNB of two models in one half of a canvas records its masks for that half only."""
    from multifusion.noise.snb import SNB

    ha, hb = load_models([tiny_a, tiny_b])
    g = ha.guide(PROMPT, batch_size=1)
    noise = initial_noise((4, 8, 8), [torch.Generator().manual_seed(0)])
    nested = Canvas([Region((0, 8, 0, 8), SNB([g, g], [1.0, 1.0]), region_weights(8, 8))], (8, 8))
    ref = ddim(g, ha, noise)
    out = ddim(nested, ha, noise)
    assert torch.equal(out, ref)

    fused = SNB([ha.guide(PROMPT, batch_size=1), hb.guide("a blue square", batch_size=1)], [1.0, 1.0])
    canvas = Canvas(
        [
            Region((0, 8, 0, 8), fused, region_weights(8, 8)),
            Region((0, 8, 4, 16), hb.guide("a forest", batch_size=1), region_weights(8, 12)),
        ],
        (8, 16),
    )
    steps = []
    wide = initial_noise((4, 8, 16), [torch.Generator().manual_seed(0)])
    ddim(canvas, ha, wide, callback=steps.append)
    assert len(steps) == 3 and all(s.record["snb/mask"].shape == (2, 1, 1, 8, 8) for s in steps)
    # Each step: the SNB region's own prediction on its window and the other region's, mixed by
    # their Gaussian weights (8 x 8 and 8 x 12, overlapping in columns 4-7).
    check_steps_mix(
        steps,
        [(fused, (0, 8, 0, 8), region_weight(8, 8)), (hb.guide("a forest", batch_size=1), (0, 8, 4, 16), region_weight(8, 12))],
        (8, 16),
    )


def test_large_reference_images_and_canvases_use_vae_tiling(tiny_a, monkeypatch):
    """Encode and decode switch diffusers' VAE tiling on above 4x the VAE's native area (the
    tiny VAE's native size is 32 px) and restore the flag afterwards."""
    from multifusion.vae import decode, encode

    [h] = load_models([tiny_a])
    vae, seen = h.vae, []
    real_enc, real_dec = vae._encode, vae._decode
    monkeypatch.setattr(vae, "_encode", lambda x, *a, **k: (seen.append(("enc", vae.use_tiling)), real_enc(x, *a, **k))[1])
    monkeypatch.setattr(vae, "_decode", lambda z, *a, **k: (seen.append(("dec", vae.use_tiling)), real_dec(z, *a, **k))[1])
    small, large = torch.zeros(1, 3, 32, 64), torch.zeros(1, 3, 64, 96)  # 2x and 6x the native area
    assert encode(vae, small).shape == (1, 4, 8, 16) and encode(vae, large).shape == (1, 4, 16, 24)
    assert decode(vae, torch.zeros(1, 4, 16, 24)).shape == (1, 3, 64, 96)
    assert seen[0] == ("enc", False) and seen[1] == ("enc", True) and ("dec", True) in seen
    assert vae.use_tiling is False


def test_vae_on_its_own_device_in_float32(tiny_a):
    """runtime.vae_device moves the VAE (float32 on the CPU) while the UNet keeps its dtype; the
    result equals a run whose VAE never moved, because here both are on the CPU."""
    region = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": PROMPT}
    half = run({**mod([tiny_a], {"regions": [region]}), "runtime": {"dtype": "bfloat16"}}, progress=False)
    [h] = load_models([tiny_a], dtype="bfloat16")
    moved = run(
        {**mod([tiny_a], {"regions": [region]}), "runtime": {"dtype": "bfloat16", "vae_device": "cpu"}},
        models=[h],
        progress=False,
    )
    assert h.vae.dtype == torch.float32 and h.unet.dtype == torch.bfloat16
    assert torch.equal(moved.latents, half.latents)
    with pytest.raises(RecipeError, match="runtime.vae_device: 'gpu' is not one of"):
        run({**mod([tiny_a], {"regions": [region]}), "runtime": {"vae_device": "gpu"}}, progress=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_canvas_follows_the_float32_one(tiny_a, dtype):
    tiles = {"prompts": [["a red circle", "a blue square"]], "tile_height": 32, "tile_width": 32, "tile_col_overlap": 16}
    full = run(mod([tiny_a], {"tiles": tiles, "tile_batch_size": 2}), progress=False).latents
    half = run({**mod([tiny_a], {"tiles": tiles, "tile_batch_size": 2}), "runtime": {"dtype": dtype}}, progress=False).latents
    assert half.dtype == torch.float32 and torch.isfinite(half).all()  # the loop keeps latents in float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_a_recipe_region_may_be_painted_by_snb(tiny_a, tiny_b):
    """The recipe form of nesting: a region's `snb` fuses the region's model (the base) with
    others. SNB of a model with itself is that model's region exactly; of two models it differs."""
    box = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": PROMPT, "model": 0}
    alone = run(mod([tiny_a, tiny_b], {"regions": [box]}), progress=False).latents
    same = {**box, "snb": {"models": [{"model": 0, "prompt": PROMPT}], "params": {"gate": "base"}}}
    assert torch.equal(run(mod([tiny_a, tiny_b], {"regions": [same]}), progress=False).latents, alone)
    other = {**box, "snb": {"models": [{"model": 1, "prompt": "a blue square"}], "params": {"k": [1.0, 2.0]}}}
    assert not torch.allclose(run(mod([tiny_a, tiny_b], {"regions": [other]}), progress=False).latents, alone)


@pytest.mark.parametrize(
    "snb, message",
    [
        ({"models": [{"model": "nope", "prompt": "x"}]}, "params.regions[0].snb.models[0].model: no model named 'nope'"),
        ({"models": [{"model": 1, "prompt": "x"}], "params": {"k": [1.0, 1.0, 1.0]}}, "params.k: has 3 entries for 2 models"),
        (
            {"models": [{"model": 1, "prompt": "x"}], "params": {"blur_size": 9}},
            "params.regions[0].snb.params.blur_size: 9 is larger",
        ),
        ({"models": []}, "models"),
    ],
)
def test_bad_snb_regions_are_refused_before_sampling(tiny_a, tiny_b, snb, message):
    box = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": PROMPT, "snb": snb}
    with pytest.raises(RecipeError) as info:
        run(mod([tiny_a, tiny_b], {"regions": [box]}), progress=False)
    assert message in str(info.value)
