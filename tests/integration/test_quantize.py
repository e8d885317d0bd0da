"""Quantized weights (`models[i].quantize`, `multifusion.quantize`): a quantized model is exactly the
pipeline diffusers loads with the same quantization config, every method runs on quantized
models, and bad specs are refused naming the field. torchao's int8 runs on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")

import multifusion as mf  # noqa: E402
from multifusion import ModelLoadError, RecipeError, load_models  # noqa: E402
from multifusion.loading import held_bytes  # noqa: E402

PROMPTS = ["a red circle in a snowy field", "a blue square"]
KW = dict(num_inference_steps=4, seed=3, num_images=2, progress=False)
INT8 = {"backend": "torchao", "weights": "int8"}


def diffusers_int8_latents(path, seeds, steps=4):
    """StableDiffusionPipeline loaded with diffusers' own int8 config for its UNet, built here by
    hand (not through multifusion.quantize)."""
    from diffusers import DDIMScheduler, PipelineQuantizationConfig, StableDiffusionPipeline, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = PipelineQuantizationConfig(quant_mapping={"unet": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, quantization_config=config, dtype=torch.float32
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS[0],
        num_inference_steps=steps,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images


def test_quantized_single_equals_diffusers_with_the_same_config(tiny_a):
    [q] = load_models([tiny_a], quantize=[INT8])
    [full] = load_models([tiny_a])
    assert q.quantized_components() == ["unet"] and full.quantized_components() == []
    ours = mf.single(q, PROMPTS[0], scheduler="ddim", **KW).latents
    theirs = diffusers_int8_latents(tiny_a, [3, 4])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # float32 on the CPU, the same kernels
    # ... and the quantization is real: the full-precision model lands measurably elsewhere.
    unquantized = mf.single(full, PROMPTS[0], scheduler="ddim", **KW).latents
    assert (unquantized - ours).abs().max() > 100 * 1e-5


def test_a_recipe_loads_its_model_quantized(tiny_a):
    recipe = {
        "method": "single",
        "models": [{"model": tiny_a, "prompt": PROMPTS[0], "quantize": {"weights": "int8"}}],
        "sampling": {"num_inference_steps": 4, "seed": 3, "num_images": 2, "scheduler": "ddim"},
    }
    got = mf.run(recipe, progress=False).latents
    torch.testing.assert_close(got, diffusers_int8_latents(tiny_a, [3, 4]), atol=1e-5, rtol=1e-5)


def test_quantized_weights_are_held_smaller_and_shared_parts_stay_shared(tiny_a, tiny_b):
    qa, qb = load_models([tiny_a, tiny_b], quantize=[INT8, INT8])
    fa, fb = load_models([tiny_a, tiny_b])
    assert qa.text_encoder is qb.text_encoder and qa.vae is qb.vae  # full-precision parts: still held once
    assert qa.unet is not qb.unet
    linear = sum(m.weight.numel() for m in fa.unet.modules() if isinstance(m, torch.nn.Linear))
    # int8 values (1 byte) plus one float32 scale per output row, in place of 4 bytes per weight
    assert held_bytes([fa, fb]) - held_bytes([qa, qb]) > 2 * 2.5 * linear


REGIONS = {
    "regions": [
        {"row_init": 0, "row_end": 1, "col_init": 0, "col_end": 0.5, "units": "fraction", "prompt": PROMPTS[0], "model": "a"},
        {"row_init": 0, "row_end": 1, "col_init": 0.5, "col_end": 1, "units": "fraction", "prompt": PROMPTS[1], "model": "b"},
    ]
}


@pytest.mark.parametrize(
    "method, params, continuous",
    [
        ("average", {"weights": [0.6, 0.4]}, True),
        ("snb", {}, False),
        ("amdm", {"w": 0.7, "correction": 0.5}, True),
        ("mod", REGIONS, True),
    ],
)
def test_every_noise_and_latent_method_runs_on_quantized_models(tiny_a, tiny_b, method, params, continuous):
    """Each method over two quantized models gives finite latents off the full-precision run's;
    near it (int8 rounding) where the method is continuous in the predictions (SNB's masks pick
    per pixel, so a small change may flip a pixel's pick)."""
    quantized = load_models([tiny_a, tiny_b], names=["a", "b"], quantize=[INT8, INT8])
    full = load_models([tiny_a, tiny_b], names=["a", "b"])
    got = mf.fuse(method, quantized, PROMPTS, **params, **KW).latents
    want = mf.fuse(method, full, PROMPTS, **params, **KW).latents
    assert torch.isfinite(got).all()
    gap = (got - want).abs().max()
    assert gap > 1e-5
    if continuous:
        assert gap < 0.05 * want.abs().max()


def test_snb_of_a_quantized_model_with_itself_is_its_single(tiny_a):
    qa, qa2 = load_models([tiny_a, tiny_a], names=["a", "a2"], quantize=[INT8, INT8])
    assert qa.unet is qa2.unet  # one checkpoint with one spec loads once
    out = mf.snb([qa, qa2], [PROMPTS[0]] * 2, **KW).latents
    torch.testing.assert_close(out, mf.single(qa, PROMPTS[0], **KW).latents, atol=1e-6, rtol=1e-6)


def test_afa_runs_on_quantized_models(tiny_a, tmp_path):
    """AFA of a quantized model with itself, at zero-initialised aggregators, is that model's `single`."""
    from multifusion.features.ensemble import model_hash
    from multifusion.features.walkers import fresh_aggregators

    qa, qa2 = load_models([tiny_a, tiny_a], names=["a", "a2"], quantize=[INT8, INT8])
    folder = tmp_path / "agg"
    fresh_aggregators([qa.unet, qa2.unet], [model_hash(qa), model_hash(qa2)], ["a", "a2"]).save_pretrained(folder)
    out = mf.afa([qa, qa2], PROMPTS[0], aggregator=str(folder), **KW).latents
    assert torch.equal(out, mf.single(qa, PROMPTS[0], **KW).latents)


def recipe(model, quantize, method="single", n=1):
    return {
        "method": method,
        "models": [{"model": model, "prompt": "x", "quantize": quantize}] * n,
        "sampling": {"num_inference_steps": 2},
    }


@pytest.mark.parametrize(
    "quantize, field, says",
    [
        ({"weights": "int3"}, r"models\[0\]\.quantize\.weights", "not a torchao format"),
        ({"backend": "bitsandbytes", "weights": "int4"}, r"models\[0\]\.quantize\.weights", "int8, nf4, fp4"),
        ({"backend": "gptq"}, r"models\[0\]\.quantize\.backend", "torchao"),
        ({"components": ["t5"]}, r"models\[0\]\.quantize\.components", "no T5 encoder"),
        ({"components": ["denoiser", "denoiser"]}, r"models\[0\]\.quantize\.components", "twice"),
        ({"components": ["vae"]}, r"models\[0\]\.quantize\.components\[0\]", "denoiser"),
        ({"weights": "int8", "bits": 8}, r"models\[0\]\.quantize\.bits", "unknown field"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(tiny_a, quantize, field, says):
    with pytest.raises(RecipeError, match=f"{field}: .*{says}"):
        mf.run(recipe(tiny_a, quantize), progress=False)


def test_the_closest_format_is_suggested(tiny_a):
    with pytest.raises(RecipeError, match="did you mean 'int8'"):
        mf.run(recipe(tiny_a, {"weights": "imt8"}), progress=False)


def test_a_merge_refuses_quantized_models_before_loading(tiny_a, tiny_b):
    with pytest.raises(RecipeError, match=r"models\[0\]\.quantize: method 'merge' merges .*full-precision"):
        mf.run(recipe(tiny_a, INT8, method="merge", n=2), progress=False)
    handles = load_models([tiny_a, tiny_b], quantize=[INT8, None])  # loaded quantized: the recipe says so
    with pytest.raises(RecipeError, match=r"models\[0\]\.quantize: method 'merge' merges"):
        mf.fuse("merge", handles, PROMPTS, **KW)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    handles = load_models([tiny_a, tiny_b])
    quantize_(handles[1].unet, Int8WeightOnlyConfig())  # quantized in place: refused when the merge prepares
    with pytest.raises(RecipeError, match=r"models\[1\]: method 'merge' merges full-precision weights, .*unet"):
        mf.fuse("merge", handles, PROMPTS, **KW)


def test_a_run_of_quantized_handles_records_their_spec(tiny_a):
    [q] = load_models([tiny_a], quantize=[INT8])
    result = mf.single(q, PROMPTS[0], **KW)
    assert result.recipe.models[0].quantize.model_dump(exclude_none=True) == {
        "backend": "torchao",
        "weights": "int8",
        "components": ["denoiser"],
    }
    again = mf.run(result.recipe, progress=False).latents  # the recorded recipe remakes the quantized model
    assert torch.equal(again, result.latents)


def test_a_missing_backend_is_named_with_the_install(tiny_a, monkeypatch):
    from multifusion import quantize

    monkeypatch.setitem(quantize.PACKAGES, "torchao", "no_such_quantization_package")
    with pytest.raises(ModelLoadError, match=r"models\[0\]\.quantize\.backend: .*multifusion\[quant\]"):
        mf.run(recipe(tiny_a, INT8), progress=False)
    with pytest.raises(ModelLoadError, match=r"models\[1\]\.quantize\.backend"):
        load_models([tiny_a, tiny_a], quantize=[None, INT8])


def test_a_single_file_cannot_load_quantized(tmp_path, tiny_a):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"  # refused before loading: any well-formed file will do
    save_file({"x": torch.zeros(1)}, str(path))
    bad = recipe(str(path), INT8)
    bad["models"][0]["config"] = tiny_a
    with pytest.raises(RecipeError, match=r"models\[0\]\.quantize: .*single-file .*save it as a folder"):
        mf.run(bad, progress=False)


def test_quantize_list_of_the_wrong_length_is_refused(tiny_a):
    with pytest.raises(RecipeError, match="quantize: 2 values for 1 models"):
        load_models([tiny_a], quantize=[INT8, INT8])
