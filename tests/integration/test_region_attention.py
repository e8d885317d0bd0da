"""region-attention on tiny UNets (SD, SDXL): its degenerate cases equal `single` bit for bit, a
step recomputed from its parts, the model's own processors back after a run, and every refused
input named before sampling."""

import pytest
import torch

from multifusion import IncompatibleModelsError, RecipeError, load_models, single
from multifusion.api import run
from multifusion.features.regional import Layout, Regions, installed, text_attention
from multifusion.handles import Conditioning

PROMPT, OTHER = "a red circle in a snowy field", "a blue square in a desert"
KW = dict(num_inference_steps=4, seed=3, num_images=2, progress=False)


def recipe(model, params, **sampling):
    return {
        "method": "region-attention",
        "models": [{"model": model}],
        "params": params,
        "sampling": {"num_inference_steps": 4, "seed": 3, "num_images": 2, **sampling},
    }


def box(r0, r1, c0, c1, prompt=PROMPT, **more):
    return {"row_init": r0, "row_end": r1, "col_init": c0, "col_end": c1, "prompt": prompt, **more}


@pytest.fixture(scope="module")
def sd(tiny_a):
    return tiny_a, load_models([tiny_a])[0]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    path = str(tiny_sdxl_dir / "a")
    return path, load_models([path])[0]


# Tolerance: none. A region over the whole canvas runs the model's own attention processor on
# the same tokens and the same prompt, and the blend is a lerp between equal tensors, so every
# degenerate case below is `single` bit for bit (torch.equal), under each scheduler.


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpm++"])
@pytest.mark.parametrize("with_base", [True, False])
def test_one_region_over_the_canvas_is_single_sd(sd, scheduler, with_base):
    path, h = sd
    params = {"regions": [box(0, 32, 0, 32)], **({"base_prompt": PROMPT, "base_ratio": 0.3} if with_base else {})}
    out = run(recipe(path, params, scheduler=scheduler), models=[h], progress=False).latents
    assert torch.equal(out, single(h, PROMPT, scheduler=scheduler, **KW).latents)


@pytest.mark.parametrize("with_base", [True, False])
def test_one_region_over_the_canvas_is_single_sdxl(sdxl, with_base):
    path, h = sdxl
    n = h.native_px
    params = {"regions": [box(0, 1, 0, 1, units="fraction")], **({"base_prompt": PROMPT} if with_base else {})}
    out = run(recipe(path, params), models=[h], progress=False).latents
    assert torch.equal(out, single(h, PROMPT, height=n, width=n, **KW).latents)


def test_base_ratio_one_or_a_closed_window_is_the_base_prompt_alone(sd):
    path, h = sd
    ref = single(h, PROMPT, **KW).latents
    regions = [box(0, 32, 0, 16, OTHER), box(0, 32, 16, 32, "a green triangle")]
    for params in ({"base_ratio": 1.0}, {"window": [0.0, 0.0]}):
        out = run(recipe(path, {"regions": regions, "base_prompt": PROMPT, **params}), models=[h], progress=False).latents
        assert torch.equal(out, ref), params
    out = run(recipe(path, {"regions": regions, "base_prompt": PROMPT}), models=[h], progress=False).latents
    assert (out - ref).abs().max() > 1e-2  # the regions do change the picture


def test_each_regions_tokens_attend_its_own_prompt(sd):
    """Two regions splitting an 8x8 latent into halves, no base: in a cross-attention layer of the
    UNet call (the tiny UNet's first, at 4x4), the left tokens' output is the model's own processor
    with the left prompt, the right tokens' with the right prompt, bit for bit."""
    _, h = sd
    layers = text_attention(h.unet)
    module = next(m for name, (m, _) in layers.items() if name.startswith("down_blocks.1"))
    seen = {}

    def grab(mod, args, kwargs, out):
        seen.update(x=args[0], text=kwargs["encoder_hidden_states"], out=out)

    left, right = h.encode_prompt([PROMPT] * 2), h.encode_prompt([OTHER] * 2)
    both = Conditioning(torch.cat([left.embeds, right.embeds], dim=1))
    regions = Regions([(0, 8, 0, 4), (0, 8, 4, 8)], (8, 8), None, Layout((left.embeds.shape[1],) * 2, False))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hook = module.register_forward_hook(grab, with_kwargs=True)
    try:
        with installed(layers, regions):
            h.eps(x, torch.tensor(500), both)
    finally:
        hook.remove()
    assert seen["x"].shape[1] == 16 and seen["text"].shape[1] == 2 * left.embeds.shape[1]
    with torch.no_grad():
        own = [module.processor(module, seen["x"], c.embeds).reshape(2, 4, 4, -1) for c in (left, right)]
    grid = seen["out"].reshape(2, 4, 4, -1)
    assert torch.equal(grid[:, :, :2], own[0][:, :, :2])
    assert torch.equal(grid[:, :, 2:], own[1][:, :, 2:])
    assert not torch.equal(grid[:, :, :2], own[1][:, :, :2])


def test_the_models_processors_are_back_after_a_run(sd):
    path, h = sd
    before = {k: type(v) for k, v in h.unet.attn_processors.items()}
    run(recipe(path, {"regions": [box(0, 32, 0, 16), box(0, 32, 16, 32, OTHER)]}), models=[h], progress=False)
    assert {k: type(v) for k, v in h.unet.attn_processors.items()} == before


def test_uncovered_tokens_take_the_base_and_overlaps_the_mean_of_their_regions(sd):
    """The documented rules, in a cross-attention layer (4x4 tokens of an 8x8 latent), with a base
    prompt at ratio 0.25: two regions overlapping on token column 1, column 3 in no region.
    Column 0: 0.25 base + 0.75 left; column 1: 0.25 base + 0.75 mean(left, right); column 2:
    0.25 base + 0.75 right; column 3: the base alone."""
    _, h = sd
    layers = text_attention(h.unet)
    module = next(m for name, (m, _) in layers.items() if name.startswith("down_blocks.1"))
    seen = {}

    def grab(mod, args, kwargs, out):
        seen.update(x=args[0], out=out)

    base, left, right = (h.encode_prompt([p] * 2) for p in ("a snowy field", PROMPT, OTHER))
    n = base.embeds.shape[1]
    joined = Conditioning(torch.cat([base.embeds, left.embeds, right.embeds], dim=1))
    regions = Regions([(0, 8, 0, 4), (0, 8, 2, 6)], (8, 8), 0.25, Layout((n, n, n), True))
    hook = module.register_forward_hook(grab, with_kwargs=True)
    try:
        with installed(layers, regions):
            h.eps(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(300), joined)
    finally:
        hook.remove()
    with torch.no_grad():
        b, lo, r = (module.processor(module, seen["x"], c.embeds).reshape(2, 4, 4, -1) for c in (base, left, right))
    got = seen["out"].reshape(2, 4, 4, -1)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, :, 0], 0.25 * b[:, :, 0] + 0.75 * lo[:, :, 0], **close)
    torch.testing.assert_close(got[:, :, 1], 0.25 * b[:, :, 1] + 0.75 * (lo[:, :, 1] + r[:, :, 1]) / 2, **close)
    torch.testing.assert_close(got[:, :, 2], 0.25 * b[:, :, 2] + 0.75 * r[:, :, 2], **close)
    assert torch.equal(got[:, :, 3], b[:, :, 3])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"regions": [box(0, 30, 0, 32)]}, "params.regions[0].row_end: 30 is not a multiple of the VAE factor 4"),
        ({"regions": [box(0, 32, 0, 40)]}, "params.regions[0].col_end: 40 lies outside the 32x32 canvas"),
        (
            {"regions": [box(0, 32, 0, 16)]},
            "params.regions: 32 latent pixels of the canvas are covered by no region (pixel rows 0-32, columns 16-32); there is no base_prompt",
        ),
        ({"regions": [box(0, 32, 0, 32, mask_type="constant")]}, "params.regions[0].mask_type: is a Mixture-of-Diffusers"),
        ({"regions": [box(0, 32, 0, 32, model=0)]}, "params.regions[0].model: is a Mixture-of-Diffusers"),
        ({"regions": [box(0, 32, 0, 32)], "base_ratio": 0.5}, "params.base_ratio: blends the base prompt in"),
        ({"regions": [box(0, 32, 0, 32)], "window": [0.2, 1.0]}, "params.window: outside the window only the base prompt"),
        ({"regions": [box(0, 32, 0, 32)], "base_prompt": "x", "window": [0.8, 0.2]}, "params.window: must be [start, end]"),
        ({"regions": [box(0, 32, 0, 32)], "base_prompt": "x", "base_ratio": 1.5}, "params.base_ratio"),
        ({"regions": []}, "params.regions"),
    ],
)
def test_bad_regions_are_refused_before_loading(tiny_a, params, message, monkeypatch):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError) as info:
        run(recipe(tiny_a, params, height=32, width=32), progress=False)
    assert message in str(info.value)


def test_two_models_are_refused(tiny_a, tiny_b):
    r = recipe(tiny_a, {"regions": [box(0, 32, 0, 32)]})
    r["models"].append({"model": tiny_b})
    with pytest.raises(RecipeError, match="region-attention"):
        run(r, progress=False)


def test_a_denoiser_it_does_not_know_is_refused_naming_the_model(sd, monkeypatch):
    import multifusion.features.regional as regional

    path, h = sd
    monkeypatch.setattr(regional, "ATTENTION_KINDS", {k: v for k, v in regional.ATTENTION_KINDS.items() if "UNet" not in k})
    with pytest.raises(IncompatibleModelsError, match=r"models\[0\].*UNet2DConditionModel; use `mod`"):
        run(recipe(path, {"regions": [box(0, 32, 0, 32)]}), models=[h], progress=False)
