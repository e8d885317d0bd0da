"""`single` reproduces diffusers' StableDiffusion3Pipeline and FluxPipeline latents."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from multifusion import load_models, single
from multifusion.families.flux import unpack

PROMPT = "a red circle in a snowy field"
ATOL = 1e-5  # float32 on the CPU: the same operations in the same order, up to kernel choice


def _sd3_latents(path, seeds, steps=5, **kw):
    absent = {"text_encoder_3": None, "tokenizer_3": None} if path.endswith("no_t5") else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        height=16,
        width=16,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
        **kw,
    ).images


def _flux_latents(path, seeds, steps=5, height=16, width=16, **kw):
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=height,
        width=width,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
        **kw,
    ).images
    f = pipe.vae_scale_factor
    return unpack(packed, height // f, width // f)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_single_sd3_equals_diffusers_pipeline(sd3_a, guidance):
    """SD3's classifier-free guidance (4.5) and its conditional-only pass (1.0)."""
    [h] = load_models([sd3_a])
    ours = single(
        h, PROMPT, guidance_scale=guidance, num_inference_steps=5, seed=3, num_images=2, height=16, width=16, progress=False
    ).latents
    theirs = _sd3_latents(sd3_a, [3, 4], guidance_scale=guidance)
    assert ours.shape == theirs.shape == (2, 16, 8, 8)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL)


def test_single_sd3_with_negative_prompt_and_without_t5(flow_dir):
    path = str(flow_dir / "sd3_no_t5")
    [h] = load_models([path])
    assert h.text_encoder_3 is None
    ours = single(
        h,
        PROMPT,
        negative_prompt="a blue square",
        guidance_scale=3.0,
        num_inference_steps=4,
        seed=0,
        height=16,
        width=16,
        progress=False,
    ).latents
    theirs = _sd3_latents(path, [0], steps=4, guidance_scale=3.0, negative_prompt="a blue square")
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_single_flux_equals_diffusers_pipeline_with_its_guidance_embedding(flux_a, guidance):
    """The distilled guidance is an input of the transformer; the schedule shifts with the
    image's token count (mu from 16 tokens here, 32 on the wider canvas)."""
    [h] = load_models([flux_a])
    ours = single(
        h, PROMPT, guidance_scale=guidance, num_inference_steps=5, seed=5, num_images=2, height=16, width=16, progress=False
    ).latents
    theirs = _flux_latents(flux_a, [5, 6], guidance_scale=guidance)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL)
    wide = single(h, PROMPT, guidance_scale=guidance, num_inference_steps=3, seed=1, height=16, width=32, progress=False).latents
    assert torch.allclose(wide, _flux_latents(flux_a, [1], steps=3, width=32, guidance_scale=guidance), atol=ATOL, rtol=ATOL)


def test_single_flux_with_true_cfg_and_without_guidance_embedding(flow_dir, flux_a):
    """True CFG (a negative prompt and a second pass) is the handle's true_cfg_scale, as
    FluxPipeline's; a model without a guidance embedding (schnell) ignores guidance_scale."""
    import dataclasses

    [h] = load_models([flux_a])
    cfg = dataclasses.replace(h, true_cfg_scale=2.0)
    ours = single(
        cfg,
        PROMPT,
        negative_prompt="a blue square",
        guidance_scale=3.5,
        num_inference_steps=4,
        seed=2,
        height=16,
        width=16,
        progress=False,
    ).latents
    theirs = _flux_latents(flux_a, [2], steps=4, guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt="a blue square")
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL)

    path = str(flow_dir / "flux_schnell")
    [s] = load_models([path])
    ours = single(s, PROMPT, guidance_scale=7.0, num_inference_steps=4, seed=2, height=16, width=16, progress=False).latents
    assert torch.allclose(ours, _flux_latents(path, [2], steps=4, guidance_scale=0.0), atol=ATOL, rtol=ATOL)


def test_true_cfg_from_a_recipe_equals_flux_pipeline(flux_a):
    """`models[i].true_cfg_scale` in a recipe (and `true_cfg_scale=` of the Python API) is
    FluxPipeline's true_cfg_scale with the model's negative prompt."""
    from multifusion import run

    recipe = {
        "method": "single",
        "prompt": PROMPT,
        "models": [{"model": flux_a, "true_cfg_scale": 4.0, "negative_prompt": "a blue square", "guidance_scale": 3.5}],
        "sampling": {"num_inference_steps": 4, "seed": 2, "num_images": 2, "height": 16, "width": 16},
    }
    ours = run(recipe, progress=False).latents
    theirs = _flux_latents(flux_a, [2, 3], steps=4, guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt="a blue square")
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL)
    api = single(
        flux_a,
        PROMPT,
        true_cfg_scale=4.0,
        negative_prompt="a blue square",
        guidance_scale=3.5,
        num_inference_steps=4,
        seed=2,
        num_images=2,
        height=16,
        width=16,
        progress=False,
    ).latents
    assert torch.equal(api, ours)
    plain = _flux_latents(flux_a, [2, 3], steps=4, guidance_scale=3.5)
    assert not torch.allclose(ours, plain, atol=1e-4)  # the second pass changed the result
