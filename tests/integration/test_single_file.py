"""Single-file checkpoints in the original (LDM) layout load like their diffusers folder."""

import pytest
import torch
from safetensors.torch import load_file

from multifusion import ModelLoadError, load_models, single
from multifusion.testing.ldm import save_as_single_file, to_ldm_state_dict


@pytest.fixture(scope="module")
def tiny_a_file(tiny_a, tmp_path_factory):
    return str(save_as_single_file(tiny_a, tmp_path_factory.mktemp("single") / "a.safetensors"))


def test_file_has_the_original_layout(tiny_a_file):
    sd = load_file(tiny_a_file)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in sd)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in sd, key
    q = sd["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)


def test_single_file_loads_like_the_folder(tiny_a, tiny_a_file):
    [from_file] = load_models([tiny_a_file], configs=[tiny_a])
    [from_folder] = load_models([tiny_a])
    for kind in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_file, kind).state_dict(), getattr(from_folder, kind).state_dict()
        assert a.keys() == b.keys(), kind
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{kind}: {k}"
    x = single(from_file, "a red circle", num_inference_steps=4, seed=0, progress=False).latents
    y = single(from_folder, "a red circle", num_inference_steps=4, seed=0, progress=False).latents
    assert torch.allclose(x, y, atol=1e-5)


def test_single_file_without_config_says_so(tiny_a_file):
    with pytest.raises(ModelLoadError, match="config"):
        load_models([tiny_a_file])


def test_mapping_follows_the_config_of_an_sd1_shaped_model():
    """SD-1.x's real arrangement (4 blocks, 2 layers each, attention in all but the lowest
    resolution), at toy widths: diffusers' own LDM reader inverts the mapping exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=2,
        norm_num_groups=4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    ldm = to_ldm_state_dict(unet, vae, text)
    # Key names of the real SD-1.5 file (its marker key, downsamplers, upsamplers after attention or not).
    for key in (
        "output_blocks.11.0.skip_connection.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.9.0.op.bias",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.bias",
        "middle_block.2.out_layers.3.weight",
    ):
        assert "model.diffusion_model." + key in ldm, key
    for model, back in (
        (unet, convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(ldm, dict(vae.config))),
    ):
        sd = model.state_dict()
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)
