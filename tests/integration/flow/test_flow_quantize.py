"""Quantized SD3 and FLUX (`models[i].quantize` with the T5 encoder): `single` equals diffusers'
pipeline loaded with the same quantization config, the transformer's through diffusers' config
class and T5's through transformers'."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")

from diffusers import FluxPipeline, StableDiffusion3Pipeline  # noqa: E402

from multifusion import RecipeError, load_models, run, single  # noqa: E402
from multifusion.families.flux import unpack  # noqa: E402

PROMPT = "a red circle in a snowy field"
BOTH = {"weights": "int8", "components": ["denoiser", "t5"]}


def int8_config(t5: str):
    import diffusers
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    return diffusers.PipelineQuantizationConfig(
        quant_mapping={
            "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
            t5: transformers.TorchAoConfig(Int8WeightOnlyConfig()),
        }
    )


def pipeline_latents(cls, path, t5, seeds, **kw):
    pipe = cls.from_pretrained(path, quantization_config=int8_config(t5), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        num_inference_steps=4,
        height=16,
        width=16,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
        **kw,
    ).images
    f = pipe.vae_scale_factor
    return unpack(out, 16 // f, 16 // f) if cls is FluxPipeline else out


@pytest.mark.parametrize(
    "fixture, cls, t5, guidance",
    [("flux_a", FluxPipeline, "text_encoder_2", 3.5), ("sd3_a", StableDiffusion3Pipeline, "text_encoder_3", 4.5)],
)
def test_quantized_single_equals_the_pipeline_with_the_same_config(request, fixture, cls, t5, guidance):
    path = request.getfixturevalue(fixture)
    [q] = load_models([path], quantize=[BOTH])
    assert q.quantized_components() == ["unet", t5]
    ours = single(
        q, PROMPT, guidance_scale=guidance, num_inference_steps=4, seed=1, num_images=2, height=16, width=16, progress=False
    ).latents
    theirs = pipeline_latents(cls, path, t5, [1, 2], guidance_scale=guidance)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    [full] = load_models([path])
    unquantized = single(
        full, PROMPT, guidance_scale=guidance, num_inference_steps=4, seed=1, num_images=2, height=16, width=16, progress=False
    ).latents
    assert (unquantized - ours).abs().max() > 100 * 1e-5  # the quantization is real


def test_t5_of_a_model_without_one_is_refused_before_loading(flow_dir):
    recipe = {
        "method": "single",
        "models": [{"model": str(flow_dir / "sd3_no_t5"), "prompt": "x", "quantize": BOTH}],
        "sampling": {"num_inference_steps": 2, "height": 16, "width": 16},
    }
    with pytest.raises(RecipeError, match=r"models\[0\]\.quantize\.components: this model \(its T5 encoder is absent\)"):
        run(recipe, progress=False)


def write_gguf(folder: str, path, qtype: str = "Q8_0") -> int:
    """The transformer of the pipeline `folder` written as a GGUF file in diffusers' key layout:
    every 2-D weight whose rows split into blocks of 32 in `qtype`, the rest in float32. Returns
    how many tensors were quantized."""
    import gguf
    from diffusers import FluxTransformer2DModel

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    quantized = 0
    for name, t in FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict().items():
        a = t.float().numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
            quantized += 1
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def test_a_gguf_denoiser_equals_diffusers_loading_the_same_file(flux_a, tmp_path):
    pytest.importorskip("gguf", reason="the quant extra (gguf) is not installed")
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    path = tmp_path / "flux-Q8_0.gguf"
    assert write_gguf(flux_a, path) > 10
    [q] = load_models([flux_a], quantize=[{"backend": "gguf", "file": str(path)}])
    assert q.quantized_components() == ["unet"]
    kw = dict(guidance_scale=3.5, num_inference_steps=4, seed=1, num_images=2, height=16, width=16, progress=False)
    ours = single(q, PROMPT, **kw).latents
    transformer = FluxTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=flux_a, subfolder="transformer"
    )
    pipe = FluxPipeline.from_pretrained(flux_a, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(
        PROMPT,
        num_inference_steps=4,
        height=16,
        width=16,
        num_images_per_prompt=2,
        guidance_scale=3.5,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        output_type="latent",
    ).images
    f = pipe.vae_scale_factor
    torch.testing.assert_close(ours, unpack(packed, 16 // f, 16 // f), atol=1e-5, rtol=1e-5)
    full = single(load_models([flux_a])[0], PROMPT, **kw).latents
    gap = (full - ours).abs().max()
    assert 1e-4 < gap < 0.05 * full.abs().max()  # Q8_0: real, and small


@pytest.mark.parametrize(
    "spec, field, says",
    [
        ({"backend": "gguf"}, "file", "name it"),
        ({"backend": "gguf", "file": "m.gguf", "weights": "int8"}, "weights", "holds its own format"),
        ({"backend": "gguf", "file": "m.gguf", "components": ["denoiser", "t5"]}, "components", "denoiser only"),
        ({"backend": "gguf", "file": "m.safetensors"}, "file", "not a .gguf file"),
        ({"backend": "torchao", "file": "m.gguf"}, "file", "gguf backend's"),
        ({"backend": "gguf", "file": "missing.gguf"}, "file", "does not exist"),
    ],
)
def test_a_bad_gguf_spec_is_refused_naming_the_field(flux_a, spec, field, says):
    from multifusion import MultifusionError

    recipe = {
        "method": "single",
        "models": [{"model": flux_a, "prompt": "x", "quantize": spec}],
        "sampling": {"num_inference_steps": 2, "height": 16, "width": 16},
    }
    with pytest.raises(MultifusionError, match=rf"models\[0\]\.quantize\.{field}: .*{says}"):
        run(recipe, progress=False)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method, params", [("average", {"weights": [0.6, 0.4]}), ("snb", {}), ("amdm", {"w": 0.7})])
def test_methods_run_on_two_quantized_flow_models(flow_dir, family, method, params):
    """Two quantized models (transformer and T5 in int8) fuse to finite latents, off the
    full-precision fusion's (the quantization reaches every method)."""
    import multifusion as mf

    paths = [str(flow_dir / f"{family}_a"), str(flow_dir / f"{family}_b")]
    kw = dict(num_inference_steps=3, seed=2, height=16, width=16, guidance_scale=3.5, progress=False, **params)
    got = mf.fuse(method, load_models(paths, quantize=[BOTH, BOTH]), [PROMPT, "a blue square"], **kw).latents
    want = mf.fuse(method, load_models(paths), [PROMPT, "a blue square"], **kw).latents
    assert torch.isfinite(got).all() and (got - want).abs().max() > 1e-5
