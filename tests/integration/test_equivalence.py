"""`single` reproduces diffusers' StableDiffusionPipeline; `average` degenerates to `single`."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from multifusion import average, load_models, single
from multifusion.schedulers import scheduler_class

PROMPT = "a red circle in a snowy field"
SCHEDULERS = ["ddim", "dpm++", "euler", "pndm", "lms", "euler_a", "heun", "unipc"]


def _pipeline_latents(path, scheduler, seeds, eta=0.0, guidance_scale=7.5, negative_prompt=None):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=6,
        num_images_per_prompt=len(seeds),
        eta=eta,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_single_equals_diffusers_pipeline(tiny_a, scheduler):
    [h] = load_models([tiny_a])
    ours = single(h, PROMPT, num_inference_steps=6, scheduler=scheduler, seed=11, num_images=2, progress=False).latents
    theirs = _pipeline_latents(tiny_a, scheduler, [11, 12])
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_single_equals_pipeline_with_eta_negative_prompt_and_v_prediction(tiny_dir):
    path = str(tiny_dir / "v")
    [h] = load_models([path])
    ours = single(
        h,
        PROMPT,
        negative_prompt="a blue square",
        guidance_scale=4.0,
        eta=0.7,
        num_inference_steps=6,
        scheduler="ddim",
        seed=3,
        num_images=2,
        progress=False,
    ).latents
    theirs = _pipeline_latents(path, "ddim", [3, 4], eta=0.7, guidance_scale=4.0, negative_prompt="a blue square")
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_single_at_guidance_one_runs_the_conditional_branch_only(tiny_a):
    """diffusers skips the unconditional branch at scale <= 1; at exactly 1 we agree with it."""
    [h] = load_models([tiny_a])
    ours = single(h, PROMPT, guidance_scale=1.0, num_inference_steps=6, seed=0, progress=False).latents
    assert torch.allclose(ours, _pipeline_latents(tiny_a, "ddim", [0], guidance_scale=1.0), atol=1e-5)


def test_guidance_zero_is_the_unconditional_model(tiny_a):
    [h] = load_models([tiny_a])
    kw = dict(num_inference_steps=4, seed=0, progress=False)
    a = single(h, PROMPT, guidance_scale=0.0, **kw).latents
    b = single(h, "a blue square", guidance_scale=0.0, **kw).latents
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler_a"])
def test_average_of_one_model_and_of_identical_models_is_single(tiny_a, scheduler):
    [h] = load_models([tiny_a])
    kw = dict(num_inference_steps=5, scheduler=scheduler, seed=4, num_images=2, progress=False)
    ref = single(h, PROMPT, **kw).latents
    assert torch.equal(average([h], [PROMPT], **kw).latents, ref)
    assert torch.equal(average([h, h], [PROMPT, PROMPT], weights=[0.5, 0.5], **kw).latents, ref)
    assert torch.equal(average([h, h], [PROMPT, PROMPT], weights=[1.0, 0.0], **kw).latents, ref)


def test_average_of_two_models_lies_between_and_is_batch_invariant(tiny_a, tiny_b):
    ha, hb = load_models([tiny_a, tiny_b])
    kw = dict(num_inference_steps=4, seed=0, progress=False)
    both = average([ha, hb], [PROMPT, "a blue square"], weights=[0.5, 0.5], num_images=3, **kw).latents
    one = average([ha, hb], [PROMPT, "a blue square"], weights=[0.5, 0.5], num_images=1, **{**kw, "seed": 1}).latents
    assert torch.allclose(both[1:2], one, atol=1e-5)
    a = single(ha, PROMPT, num_images=3, **kw).latents
    b = single(hb, "a blue square", num_images=3, **kw).latents
    assert not torch.allclose(both, a, atol=1e-3) and not torch.allclose(both, b, atol=1e-3)
