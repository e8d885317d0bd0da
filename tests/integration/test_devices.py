"""A device per model (`models[i].device`, `load_models(devices=...)`): the plumbing on the CPU, the
refusals before loading, and no component shared between two devices."""

from __future__ import annotations

import pytest
import torch

import multifusion as mf
from multifusion import RecipeError, load_models

PROMPTS = ["a red circle in a snowy field", "a blue square"]
SAMPLING = {"num_inference_steps": 3, "seed": 1, "num_images": 2}


def recipe(models, method="average", **extra):
    return {"method": method, "models": models, "sampling": SAMPLING, **extra}


def test_each_model_on_its_own_device_samples_as_on_the_runtime_device(tiny_a, tiny_b):
    placed = recipe(
        [{"model": tiny_a, "prompt": PROMPTS[0], "device": "cpu"}, {"model": tiny_b, "prompt": PROMPTS[1], "device": "cpu"}]
    )
    default = recipe([{"model": tiny_a, "prompt": PROMPTS[0]}, {"model": tiny_b, "prompt": PROMPTS[1]}])
    run = mf.Run(placed)
    assert [h.device for h in run.handles] == [torch.device("cpu")] * 2
    assert torch.equal(mf.run(placed, progress=False).latents, mf.run(default, progress=False).latents)


def test_load_models_places_each_model(tiny_a, tiny_b):
    ha, hb = load_models([tiny_a, tiny_b], devices=["cpu", None], device="cpu")
    assert ha.device == hb.device == torch.device("cpu")
    assert ha.text_encoder is hb.text_encoder  # one device: identical parts still held once


def test_models_on_different_devices_share_nothing(tiny_a, tiny_b):
    """`meta` stands in for a second accelerator: the text encoder and VAE that fine-tunes of one
    base share are held once per device, never one module on two devices."""
    ha, hb, hc = load_models([tiny_a, tiny_b, tiny_b], devices=["cpu", "meta", "meta"])
    assert ha.text_encoder is not hb.text_encoder and ha.vae is not hb.vae
    assert next(hb.unet.parameters()).device.type == "meta" and next(ha.unet.parameters()).device.type == "cpu"
    assert hb.unet is hc.unet  # the same checkpoint on the same device loads once


def test_offload_keeps_one_module_per_device(tiny_a, tiny_b):
    ha, hb, hc = load_models([tiny_a, tiny_b, tiny_b], offload=True, devices=["cpu", "meta", "meta"])
    assert ha.offloader is not hb.offloader and hb.offloader is hc.offloader
    assert (ha.offloader.device, hb.offloader.device) == (torch.device("cpu"), torch.device("meta"))


def test_a_device_list_of_the_wrong_length_is_refused(tiny_a, tiny_b):
    with pytest.raises(RecipeError, match="devices: 1 values for 2 models; give one per model"):
        load_models([tiny_a, tiny_b], devices=["cpu"])


def test_a_device_this_machine_lacks_is_named_before_loading(tiny_a):
    bad = recipe([{"model": tiny_a, "prompt": "x"}, {"model": tiny_a, "prompt": "y", "device": "cuda:99"}])
    with pytest.raises(RecipeError, match=r"models\[1\]\.device: 'cuda:99' but this machine has"):
        mf.run(bad, progress=False)


def test_a_device_of_no_known_kind_is_refused(tiny_a):
    with pytest.raises(RecipeError, match=r"models\[0\]\.device: 'tpu:0' is not one of cpu, cuda"):
        mf.run(recipe([{"model": tiny_a, "prompt": "x", "device": "tpu:0"}], method="single"), progress=False)


@pytest.mark.parametrize("method", ["merge", "afa"])
def test_methods_meeting_inside_one_module_need_one_device(tiny_a, tiny_b, method):
    bad = recipe([{"model": tiny_a, "prompt": "x"}, {"model": tiny_b, "prompt": "y", "device": "cuda:1"}], method=method)
    with pytest.raises(RecipeError, match=rf"models\[1\]\.device: 'cuda:1' but models\[0\] runs on 'cpu'; method '{method}'"):
        mf.run(bad, progress=False)


def test_an_image_recipe_leaves_its_models_devices_behind(tmp_path):
    """Where a model ran is the machine's business: `--from-image` drops models[i].device and says so."""
    from PIL import Image

    from multifusion.io import save_png
    from multifusion.provenance import image_metadata, recipe_from_image
    from multifusion.recipe import parse_recipe

    made = parse_recipe(recipe([{"model": "zoo:general", "prompt": "x", "device": "cuda:1"}], method="single"))
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", image_metadata(made.to_json(), 1))
    data, ignored = recipe_from_image(path)
    assert "device" not in data["models"][0] and data["models"][0]["model"] == "zoo:general"
    assert ignored == ["models[0].device"]


def test_fuse_places_named_models_and_checks_the_list(tiny_a, tiny_b):
    got = mf.average([tiny_a, tiny_b], PROMPTS, devices=["cpu", "cpu"], progress=False, **SAMPLING).latents
    assert torch.equal(got, mf.average([tiny_a, tiny_b], PROMPTS, progress=False, **SAMPLING).latents)
    with pytest.raises(RecipeError, match="devices: 3 values for 2 models"):
        mf.average([tiny_a, tiny_b], PROMPTS, devices=["cpu"] * 3, progress=False)
    with pytest.raises(RecipeError, match="devices: loaded models run where they were loaded"):
        mf.average(load_models([tiny_a, tiny_b]), PROMPTS, devices=["cpu", "cpu"], progress=False)
