"""`single` on an SDXL model reproduces diffusers' StableDiffusionXLPipeline latents: two text
encoders, pooled embeddings, micro-conditioning time ids, zeroed empty negatives."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from multifusion import load_models, single
from multifusion.families.sdxl import SDXLHandle
from multifusion.schedulers import scheduler_class

PROMPT = "a red circle in a snowy field"


def _pipeline_latents(path, scheduler, seeds, *, steps=5, **kwargs):
    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    pipe.scheduler = scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        num_images_per_prompt=len(seeds),
        output_type="latent",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        **kwargs,
    ).images


def _ours(handle, scheduler, seed, n, *, steps=5, **kwargs):
    return single(
        handle, PROMPT, num_inference_steps=steps, scheduler=scheduler, seed=seed, num_images=n, progress=False, **kwargs
    ).latents


def test_sdxl_folder_loads_as_an_sdxl_handle(tiny_sdxl_dir):
    [h] = load_models([str(tiny_sdxl_dir / "a")])
    assert isinstance(h, SDXLHandle) and h.force_zeros_for_empty_prompt
    cond = h.encode_prompt([PROMPT, "a blue square"])
    assert cond.embeds.shape == (2, 16, 16 + 24) and cond.extra["text_embeds"].shape == (2, 16)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++", "unipc", "euler_a"])
def test_single_equals_sdxl_pipeline(tiny_sdxl_dir, scheduler):
    path = str(tiny_sdxl_dir / "a")
    [h] = load_models([path])
    ours = _ours(h, scheduler, 11, 2, guidance_scale=5.0)
    theirs = _pipeline_latents(path, scheduler, [11, 12], guidance_scale=5.0)
    assert torch.equal(ours, theirs)


def test_single_equals_sdxl_pipeline_non_square_with_negative_prompt(tiny_sdxl_dir):
    path = str(tiny_sdxl_dir / "a")
    [h] = load_models([path])
    ours = _ours(h, "dpm++", 3, 2, height=32, width=48, negative_prompt="a blue square", guidance_scale=4.0)
    theirs = _pipeline_latents(path, "dpm++", [3, 4], height=32, width=48, negative_prompt="a blue square", guidance_scale=4.0)
    assert ours.shape == (2, 4, 8, 12)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_single_at_guidance_one_equals_sdxl_pipeline(tiny_sdxl_dir, scheduler):
    path = str(tiny_sdxl_dir / "a")
    [h] = load_models([path])
    assert torch.equal(
        _ours(h, scheduler, 0, 1, guidance_scale=1.0, width=48),
        _pipeline_latents(path, scheduler, [0], guidance_scale=1.0, width=48),
    )


def test_empty_negative_prompt_is_zeros_only_where_the_pipeline_forces_it(tiny_sdxl_dir):
    """force_zeros_for_empty_prompt: our default "" negative is the pipeline's None (zeros);
    without it, "" is encoded, as the pipeline does."""
    forced, keep = load_models([str(tiny_sdxl_dir / "a"), str(tiny_sdxl_dir / "keep")], share=False)
    g = forced.guide([PROMPT, PROMPT], negative_prompt="")
    assert not g.negative.embeds.any() and not g.negative.extra["text_embeds"].any()
    g = keep.guide([PROMPT], negative_prompt="")
    assert g.negative.embeds.abs().sum() > 0
    mixed = forced.guide([PROMPT, PROMPT], negative_prompt=["", "a blue square"])
    assert not mixed.negative.embeds[0].any() and torch.equal(
        mixed.negative[1:].embeds, forced.encode_prompt(["a blue square"]).embeds
    )
    path = str(tiny_sdxl_dir / "keep")
    assert torch.equal(
        _ours(keep, "euler", 5, 1, guidance_scale=3.0),
        _pipeline_latents(path, "euler", [5], guidance_scale=3.0, negative_prompt=""),
    )


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++", "unipc"])
def test_single_equals_sdxl_pipeline_for_v_prediction(tiny_sdxl_dir, scheduler):
    path = str(tiny_sdxl_dir / "v")
    [h] = load_models([path])
    ours = _ours(h, scheduler, 7, 2, guidance_scale=6.0)
    theirs = _pipeline_latents(path, scheduler, [7, 8], guidance_scale=6.0)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
