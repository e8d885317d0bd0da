"""SDXL single-file checkpoints (the way fine-tunes are shared) in the original layout: written
from a diffusers folder, loaded back to the same weights."""

import pytest
import torch
from safetensors.torch import load_file

from multifusion import ModelLoadError, load_models, single
from multifusion.families.sdxl import SDXLHandle
from multifusion.testing.ldm import save_as_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_dir, tmp_path_factory):
    return str(save_as_single_file(tiny_sdxl_dir / "a", tmp_path_factory.mktemp("single_sdxl") / "a.safetensors"))


def test_file_has_the_sdxl_layout(sdxl_file):
    sd = load_file(sdxl_file)
    prefixes = (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    )
    assert all(k.startswith(prefixes) for k in sd)
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias",
    ):
        assert key in sd, key
    assert sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 24, 24)
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (24, 16)  # (width, projection)


def test_sdxl_single_file_loads_back_to_the_same_weights(tiny_sdxl_dir, sdxl_file):
    folder = str(tiny_sdxl_dir / "a")
    [from_file] = load_models([sdxl_file], configs=[folder])
    [from_folder] = load_models([folder])
    assert isinstance(from_file, SDXLHandle)
    for kind in COMPONENTS:
        a, b = getattr(from_file, kind).state_dict(), getattr(from_folder, kind).state_dict()
        assert a.keys() == b.keys(), kind
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{kind}: {k}"
    # Loaded tensors may sit at unaligned offsets of the file's buffer (differently for one file and
    # a folder), and CPU kernels may reduce in another order for unaligned weights (measured:
    # 1.6e-5 after 3 steps); with every weight in a buffer of its own, sampling is bit-identical.
    with torch.no_grad():
        for module in (getattr(h, kind) for h in (from_file, from_folder) for kind in COMPONENTS):
            for p in module.parameters():
                p.data = p.data.clone()
    kw = dict(num_inference_steps=3, seed=0, progress=False, height=32, width=48)
    assert torch.equal(single(from_file, "a red circle", **kw).latents, single(from_folder, "a red circle", **kw).latents)


def test_sdxl_single_file_without_config_says_so(sdxl_file):
    with pytest.raises(ModelLoadError, match="config"):
        load_models([sdxl_file])


def test_mapping_follows_the_config_of_an_sdxl_shaped_model():
    """SDXL base's arrangement (3 levels, 2 layers each, no attention at the first, several
    transformer layers per block, text_time conditioning) at toy widths, and an OpenCLIP-layout
    text encoder: diffusers' own LDM readers invert both mappings exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from multifusion.families.ldm import to_ldm_sdxl_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 8, 16),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),
        norm_num_groups=4,
        cross_attention_dim=20,
        attention_head_dim=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 12,
    )
    vae = AutoencoderKL(block_out_channels=(4,), norm_num_groups=4)
    config = dict(vocab_size=50, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=8, **config))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, projection_dim=12, **config))
    ldm = to_ldm_sdxl_state_dict(unet, vae, text, text_2)
    # Key names of the real SDXL base file: attention from the second level, upsamplers after attention.
    for key in (
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
        "input_blocks.6.0.op.weight",
        "input_blocks.8.1.transformer_blocks.2.ff.net.2.weight",
        "middle_block.1.transformer_blocks.2.norm3.bias",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.bias",
        "output_blocks.8.0.skip_connection.weight",
        "label_emb.0.0.weight",
    ):
        assert "model.diffusion_model." + key in ldm, key
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    sd = unet.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    back = convert_open_clip_checkpoint(text_2, ldm, prefix="conditioner.embedders.1.model.")
    sd = {k: v for k, v in text_2.state_dict().items() if k != "text_model.embeddings.position_ids"}
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- a separate VAE


@pytest.fixture(scope="module")
def fixed_vae(tiny_sdxl_dir, tmp_path_factory):
    """A retrained VAE of the same latent space (as the fp16-fix SDXL VAE is), as a diffusers
    folder and as an original-layout single file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from multifusion.families.ldm import rename, vae_prefixes

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir / "a" / "vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01)
    root = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(root / "fixed", safe_serialization=True)
    mapping = vae_prefixes(dict(vae.config))
    ldm = {
        rename(k, mapping): (v[:, :, None, None] if ".mid_block.attentions." in k and v.ndim == 2 else v).contiguous()
        for k, v in vae.state_dict().items()
    }
    save_file(ldm, str(root / "fixed.safetensors"))
    return vae, root


def _recipe(model, **entry):
    return {
        "method": "single",
        "models": [{"model": model, "prompt": "a red circle", **entry}],
        "sampling": {"num_inference_steps": 2, "height": 32, "width": 32},
    }


@pytest.mark.parametrize("form", ["fixed", "fixed.safetensors"])
def test_a_separate_vae_replaces_the_models_own(tiny_sdxl_dir, fixed_vae, form):
    from multifusion.api import Run

    vae, root = fixed_vae
    folder = str(tiny_sdxl_dir / "a")
    [h] = Run(_recipe(folder, vae=str(root / form))).handles
    want = vae.state_dict()
    assert all(torch.equal(h.vae.state_dict()[k], want[k]) for k in want)
    [own] = load_models([folder])
    assert not torch.equal(own.vae.decoder.conv_out.weight, h.vae.decoder.conv_out.weight)
    # the single-file model takes the VAE's config from its `config:` folder
    [h] = load_models([str(save_as_single_file(folder, root / "model.safetensors"))], configs=[folder], vaes=[str(root / form)])
    assert torch.equal(h.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)


def test_bad_vae_references_are_refused_before_loading(tiny_sdxl_dir, tiny_dir, tmp_path, monkeypatch):
    import multifusion.api as api
    from multifusion import IncompatibleModelsError, PickleRefusedError, RecipeError
    from multifusion.api import Run

    monkeypatch.setattr(api, "load_recipe_models", lambda r: pytest.fail("models were loaded"))
    folder = str(tiny_sdxl_dir / "a")
    with pytest.raises(ModelLoadError, match=r"models\[0\].vae: cannot find VAE"):
        Run(_recipe(folder, vae=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match=r"models\[0\].vae: folder .* is not a diffusers VAE"):
        Run(_recipe(folder, vae=str(tmp_path)))
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(PickleRefusedError, match=r"models\[0\].vae: .* pickle"):
        Run(_recipe(folder, vae=str(tmp_path / "vae.ckpt")))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelLoadError, match=r"models\[0\].vae: .* corrupt"):
        Run(_recipe(folder, vae=str(tmp_path / "cut.safetensors")))
    with pytest.raises(
        IncompatibleModelsError,
        match=r"models\[0\].vae: its scaling_factor is 0.18215, the model's VAE has "
        r"0.13025: it encodes another latent space",
    ):
        Run(_recipe(folder, vae=str(tiny_dir / "a")))  # an SD-1.x pipeline's VAE on an SDXL model
    merged = {**_recipe("merge:m", vae=str(tmp_path)), "merges": {"m": {"models": [folder, folder]}}}
    with pytest.raises(RecipeError, match=r"models\[0\].vae: a merge keeps its first model's VAE; drop `vae`"):
        Run(merged)


def test_a_vae_that_does_not_fit_is_refused_on_loading_too(tiny_sdxl_dir, tiny_dir):
    from multifusion import IncompatibleModelsError

    with pytest.raises(IncompatibleModelsError, match=r"models\[0\].model: VAE .* does not fit .*scaling_factor is 0.18215"):
        load_models([str(tiny_sdxl_dir / "a")], vaes=[str(tiny_dir / "a" / "vae")], fields=["models[0].model"])
