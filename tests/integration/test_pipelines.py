"""Pipelines from Python: diffusers pipeline objects handed over as they are (`loading.from_pipeline`)
give every method the same images as the same models named by path, hold no copy of any weight,
and anything else is refused naming the model."""

from __future__ import annotations

import pytest
import torch

import multifusion as mf
from multifusion import IncompatibleModelsError, ModelLoadError, RecipeError, load_models
from multifusion.loading import held_bytes, zoo_root

PROMPTS = ["a red circle in a snowy field", "a red striped circle"]
KW = dict(num_inference_steps=3, seed=2, num_images=2, progress=False)


def zoo_pipeline(name: str, **components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(zoo_root() / name), dtype=torch.float32, safety_checker=None, requires_safety_checker=False, **components
    )


@pytest.fixture(scope="module")
def pipes():
    general = zoo_pipeline("general")
    # A fine-tune holding its base's text encoder and VAE objects, as a script that built it from the base would.
    expert = zoo_pipeline("expert", text_encoder=general.text_encoder, vae=general.vae, tokenizer=general.tokenizer)
    return general, expert


HALVES = {
    "regions": [
        {"row_init": 0, "row_end": 1, "col_init": 0, "col_end": 0.5, "units": "fraction", "prompt": PROMPTS[0], "model": "g"},
        {"row_init": 0, "row_end": 1, "col_init": 0.5, "col_end": 1, "units": "fraction", "prompt": PROMPTS[1], "model": "e"},
    ]
}

METHODS = [
    ("single", {}, 1),
    ("average", {"weights": [0.6, 0.4]}, 2),
    ("snb", {}, 2),
    ("amdm", {"w": 0.7, "correction": 0.5}, 2),
    ("mod", HALVES, 2),
]


@pytest.mark.parametrize("method, params, n", METHODS, ids=[m for m, _, _ in METHODS])
def test_a_method_on_pipeline_objects_equals_it_on_the_paths(pipes, method, params, n):
    """The same latents, bit for bit, whether the zoo models come as pipeline objects or as names."""
    objects = load_models(list(pipes[:n]), names=["g", "e"][:n])
    paths = load_models(["zoo:general", "zoo:expert"][:n], names=["g", "e"][:n])
    got = mf.fuse(method, objects, PROMPTS[:n], **params, **KW).latents
    want = mf.fuse(method, paths, PROMPTS[:n], **params, **KW).latents
    assert torch.equal(got, want)
    assert not torch.equal(got, torch.zeros_like(got))


def test_fuse_takes_pipeline_objects_directly(pipes):
    got = mf.average(list(pipes), PROMPTS, weights=[0.6, 0.4], **KW).latents
    want = mf.average(["zoo:general", "zoo:expert"], PROMPTS, weights=[0.6, 0.4], **KW).latents
    assert torch.equal(got, want)


def test_no_weight_is_copied(pipes):
    """The handle's modules are the pipeline's objects: every tensor at the same address."""
    general, expert = pipes
    hg, he = load_models([general, expert])
    for handle, pipe in ((hg, general), (he, expert)):
        assert handle.unet is pipe.unet and handle.vae is pipe.vae and handle.text_encoder is pipe.text_encoder
        ptrs = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
        assert ptrs == {n: p.data_ptr() for n, p in handle.unet.named_parameters()}
    # The expert's text encoder and VAE are the general's objects: held once.
    assert he.text_encoder is hg.text_encoder and he.vae is hg.vae
    unets = sum(p.numel() * p.element_size() for p in expert.unet.parameters()) + sum(
        b.numel() * b.element_size() for b in expert.unet.buffers()
    )
    assert held_bytes([hg, he]) == held_bytes([hg]) + unets


def test_the_pipeline_still_runs_after_a_fusion(pipes):
    """Handing a pipeline over leaves it as it was: its own call gives the same image after."""
    general, _ = pipes

    def own():
        gen = torch.Generator().manual_seed(0)
        return general(PROMPTS[0], num_inference_steps=2, height=64, width=64, generator=gen, output_type="latent").images

    before = own()
    mf.single(general, PROMPTS[0], **KW)
    assert torch.equal(own(), before)


def test_a_wrong_object_is_refused_naming_the_model(pipes):
    with pytest.raises(ModelLoadError, match=r"models\[1\]: got a builtins.dict, not a diffusers pipeline"):
        load_models([pipes[0], {"unet": None}])
    with pytest.raises(ModelLoadError, match=r"models\[0\]: got a builtins.int"):
        mf.single(42, "x", **KW)


def test_a_pipeline_of_no_family_is_refused(pipes):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipes[0].components)
    with pytest.raises(IncompatibleModelsError, match=r"models\[0\] is a StableDiffusionImg2ImgPipeline"):
        load_models([img2img])


def test_a_pipeline_without_its_denoiser_is_refused(pipes):
    broken = zoo_pipeline("general")
    broken.unet = None
    with pytest.raises(ModelLoadError, match=r"models\[0\]: this StableDiffusionPipeline has no unet"):
        load_models([broken])


def test_names_and_pipelines_do_not_mix(pipes):
    with pytest.raises(RecipeError, match="not a mix"):
        mf.average([pipes[0], "zoo:expert"], PROMPTS, **KW)


def test_a_recipe_naming_a_pipeline_needs_the_object(pipes):
    [h] = load_models([pipes[0]])
    recipe = {"method": "single", "models": [{"model": h.source, "prompt": "x"}], "sampling": {"num_inference_steps": 2}}
    with pytest.raises(RecipeError, match=r"models\[0\].model: .*pipeline object that was given in Python"):
        mf.run(recipe, progress=False)
    assert mf.run(recipe, models=[h], progress=False).latents.shape == (1, 4, 16, 16)


def test_merges_refuse_pipeline_objects_with_the_fix(pipes):
    with pytest.raises(RecipeError, match=r"models\[0\].model: method 'merge' merges .*save_pretrained"):
        mf.fuse("merge", list(pipes), PROMPTS, **KW)


def test_afa_over_a_pipeline_and_itself_is_its_single(pipes, tmp_path):
    """AFA at zero-initialised aggregators over one pipeline object twice samples as that model."""
    from multifusion.features.ensemble import model_hash
    from multifusion.features.walkers import fresh_aggregators

    a, a2 = load_models([pipes[0], pipes[0]], names=["a", "a2"])
    fresh_aggregators([a.unet, a2.unet], [model_hash(a), model_hash(a2)], ["a", "a2"]).save_pretrained(tmp_path / "agg")
    out = mf.afa([a, a2], PROMPTS[0], aggregator=str(tmp_path / "agg"), **KW).latents
    assert torch.equal(out, mf.single(a, PROMPTS[0], **KW).latents)
