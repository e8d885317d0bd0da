"""The zoo's LoRAs: trained on the shipped general through the one loop, resumable, and read back
by diffusers' own LoRA loader as the model that was trained (small data sets, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from multifusion import lora as lora_module
from multifusion.errors import ModelLoadError
from multifusion.loading import zoo_root
from multifusion.training import CHECKPOINT, load_checkpoint
from multifusion.zoo import render
from multifusion.zoo.loras import LORAS, TARGETS, install_loras, run_folder, train_lora, train_loras
from multifusion.zoo.train import TrainConfig, ZooTrainError

SMALL = TrainConfig(dataset_size=16, batch_size=4, checkpoint_every=2, log_every=1, warmup=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """LoRA `striped` trained 4 steps straight, and 2 steps then resumed to 4."""
    torch.set_num_threads(1)
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    train_lora(straight, "striped", steps=4, progress=False, config=SMALL)
    train_lora(resumed, "striped", steps=2, progress=False, config=SMALL)
    summary = train_lora(resumed, "striped", steps=4, progress=False, config=SMALL)
    return straight, resumed, summary


def test_a_resumed_lora_equals_an_uninterrupted_one(runs):
    straight, resumed, summary = runs
    a, b = (load_checkpoint(r / run_folder("striped") / CHECKPOINT) for r in (straight, resumed))
    assert a.step == b.step == summary["steps"] == 4
    for module in ("model", "ema"):
        assert a.modules[module].keys() == b.modules[module].keys()
        assert all(torch.equal(a.modules[module][k], b.modules[module][k]) for k in a.modules[module])


def test_only_the_adapters_train_and_the_base_stays_the_shipped_general(runs):
    straight, _, summary = runs
    shipped = load_file(zoo_root() / "general" / "unet" / "diffusion_pytorch_model.safetensors")
    state = load_checkpoint(straight / run_folder("striped") / CHECKPOINT).modules["model"]
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == shipped.keys()
    assert all(torch.equal(base[k].half(), shipped[k]) for k in shipped)
    ups = [v for k, v in state.items() if "lora_B" in k]
    assert ups and any(v.abs().max() > 0 for v in ups)  # B starts at zero and has moved
    assert summary["init_from"]["model"] == "general"
    assert {k.split(".")[-2] for k in state if "lora_A" in k} == {"default"}


def test_diffusers_loads_the_exported_lora_as_the_trained_model(runs):
    """The file, loaded by `load_lora_weights` into zoo:general, gives the EMA adapted UNet's output."""
    from diffusers import StableDiffusionPipeline

    from multifusion.zoo.loras import adapt
    from multifusion.zoo.models import SIZES, build_unet

    straight, _, _ = runs
    file = straight / run_folder("striped") / "striped.safetensors"
    keys = load_file(file).keys()
    assert all(k.startswith("unet.") for k in keys)
    assert {t for t in TARGETS if any(f".{t}.lora_A" in k for k in keys)} == set(TARGETS)
    ema = adapt(build_unet(SIZES["zoo"], 0, 64), LORAS["striped"], 0)
    ema.load_state_dict(load_checkpoint(straight / run_folder("striped") / CHECKPOINT).modules["ema"])
    pipe = StableDiffusionPipeline.from_pretrained(zoo_root() / "general", safety_checker=None, requires_safety_checker=False)
    pipe.unet.float()
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 32, 64, generator=g), torch.tensor([500, 20])
    with torch.no_grad():
        before = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(file), adapter_name="striped")
        after = pipe.unet(x, t, ctx).sample
        want = ema.eval()(x, t, ctx).sample
    assert (after - want).abs().max() < 1e-5
    assert (after - before).abs().max() > 1e-4  # the LoRA changes the model


def test_installed_loras_are_fp16_with_their_record_and_named_zoo_name(runs, tmp_path, monkeypatch):
    straight, _, _ = runs
    assert install_loras(straight, ["striped", "dotted"], dest=tmp_path) == ["striped"]  # dotted was not trained there
    trained = load_file(straight / run_folder("striped") / "striped.safetensors")
    shipped = load_file(tmp_path / "striped.safetensors")
    assert shipped.keys() == trained.keys() and all(v.dtype == torch.float16 for v in shipped.values())
    assert json.loads((tmp_path / "striped.json").read_text())["lora"]["data"] == "striped"
    monkeypatch.setattr(lora_module, "zoo_lora_root", lambda: tmp_path)
    assert lora_module.lora_file("zoo:striped") == tmp_path / "striped.safetensors"
    with pytest.raises(ModelLoadError, match="unknown zoo LoRA 'zoo:stripes'.*did you mean 'zoo:striped'"):
        lora_module.lora_file("zoo:stripes")


def test_bad_names_and_steps_are_refused(tmp_path):
    with pytest.raises(ZooTrainError, match="unknown zoo LoRA 'strped'.*did you mean 'striped'"):
        train_loras(tmp_path, ["strped"])
    with pytest.raises(ZooTrainError, match="steps=-1"):
        train_loras(tmp_path, ["striped"], steps=-1)


def test_each_lora_learns_one_distribution_the_general_never_saw():
    for plan in LORAS.values():
        assert plan.parent == "general" and plan.data in render.DISTRIBUTIONS
    one = [render.DISTRIBUTIONS[t].example(render.example_rng(t, 0, i)).scene for t in ("striped", "dotted") for i in range(8)]
    assert {o.texture for s in one[:8] for o in s.objects} == {"striped"}
    assert {o.texture for s in one[8:] for o in s.objects} == {"dotted"}
