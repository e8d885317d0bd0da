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
