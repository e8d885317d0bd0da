import pytest
import torch

from multifusion import IncompatibleModelsError, average, load_models, single
from multifusion.loading import held_bytes, share_components


def test_identical_components_are_held_once(tiny_dir):
    paths = [str(tiny_dir / n) for n in ("a", "b", "c")]
    shared = load_models(paths)
    separate = load_models(paths, share=False)
    assert shared[0].text_encoder is shared[1].text_encoder is shared[2].text_encoder
    assert shared[0].vae is shared[1].vae is shared[2].vae
    assert shared[0].unet is not shared[1].unet
    assert held_bytes(shared) < held_bytes(separate)
    assert share_components(separate) == {"text_encoder": 2, "vae": 2, "unet": 0}
    assert held_bytes(separate) == held_bytes(shared)


def test_different_components_are_not_shared(tiny_dir):
    a, v = load_models([str(tiny_dir / "a"), str(tiny_dir / "v")])
    assert a.text_encoder is not v.text_encoder and a.vae is not v.vae


def test_same_checkpoint_twice_loads_once(tiny_a):
    a1, a2 = load_models([tiny_a, tiny_a], names=["one", "two"])
    assert a1.unet is a2.unet and (a1.name, a2.name) == ("one", "two")


def test_models_with_other_latent_spaces_cannot_meet(tiny_dir):
    a, wide = load_models([str(tiny_dir / "a"), str(tiny_dir / "wide")])
    with pytest.raises(IncompatibleModelsError, match="latent channels"):
        average([a, wide], ["x", "y"], num_inference_steps=2, progress=False)


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.05), ("float16", 0.01)])
def test_low_precision_weights(tiny_a, dtype, tolerance):
    """Half-precision weights sample (a build without the kernels fails here, never skips) and
    follow the float32 run: latents within `tolerance` of its largest value (bfloat16 keeps 8
    mantissa bits, float16 11; both far from the size of a wrong result)."""
    [h] = load_models([tiny_a], dtype=dtype)
    assert next(h.unet.parameters()).dtype == getattr(torch, dtype)
    out = single(h, "a red circle", num_inference_steps=3, progress=False).latents
    full = single(load_models([tiny_a])[0], "a red circle", num_inference_steps=3, progress=False).latents
    assert out.dtype == torch.float32  # the loop keeps latents in float32 whatever the weights
    assert (out - full).abs().max() < tolerance * full.abs().max()


def test_offload_moves_only_the_running_module(tiny_a, tiny_b):
    """With offload, text encoders run first, then the UNets take turns, then the VAE."""
    ha, hb = load_models([tiny_a, tiny_b], offload=True)
    assert ha.offloader is hb.offloader
    order = []
    activate = ha.offloader.activate

    def recording(module):
        if module is not ha.offloader.active:
            order.append(type(module).__name__)
        activate(module)

    ha.offloader.activate = recording
    ref = average([ha, hb], ["x", "y"], num_inference_steps=2, progress=False).latents
    # Text encoder (shared by a and b: one move), then a, b, a, b, then the VAE.
    assert order == ["CLIPTextModel"] + ["UNet2DConditionModel"] * 4 + ["AutoencoderKL"]
    plain = average(load_models([tiny_a, tiny_b]), ["x", "y"], num_inference_steps=2, progress=False).latents
    assert torch.equal(ref, plain)


def test_hub_id_goes_to_diffusers_and_fails_clearly_offline(monkeypatch):
    from multifusion import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load 'nobody-here/no-such-model'"):
        load_models(["nobody-here/no-such-model"])


def test_a_folder_with_only_pickle_weights_is_refused_unless_allowed(tiny_a, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from multifusion import PickleRefusedError

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_a, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet), unet.with_suffix(".bin"))
    unet.unlink()
    with pytest.raises(PickleRefusedError, match=r"no \.safetensors weights.*allow_pickle"):
        load_models([str(folder)])
    [h] = load_models([str(folder)], allow_pickle=True)
    [ref] = load_models([tiny_a])
    assert all(torch.equal(p, q) for p, q in zip(h.unet.state_dict().values(), ref.unet.state_dict().values()))
