"""LoRAs on tiny SDXL, SD3 and FLUX pipelines, through the same code as Stable Diffusion's
(`multifusion.lora`): `single` with two LoRAs (on the denoiser and the CLIP text encoders) equals
diffusers' pipeline with `load_lora_weights` + `set_adapters`; `average` over (base, base + LoRA)
equals `average` over (base, the LoRA fused into a full copy)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from multifusion import load_models, single
from multifusion.api import run
from multifusion.families.flux import unpack
from multifusion.schedulers import scheduler_class

PROMPT = "a red circle in a snowy field"
STEPS = 4


def _build(family: str, folder):
    from multifusion.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

    return {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}[family](
        folder, seed=0
    )


SIZE = {"sdxl": None, "sd3": 16, "flux": 16}  # None: the model's native size


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def family(request, tmp_path_factory):
    from multifusion.testing.lora import write_fused, write_random_lora

    name = request.param
    root = tmp_path_factory.mktemp(f"lora_{name}")
    base = _build(name, root / "base")
    te = write_random_lora(base, root / "te", seed=1, text_encoders=True)
    den = write_random_lora(base, root / "den", seed=2)
    fused = write_fused(base, te, root / "fused", scale=0.7)
    return {"name": name, "base": str(base), "te": te, "den": den, "fused": str(fused)}


def _size(fam) -> dict:
    side = SIZE[fam["name"]]
    return {} if side is None else {"height": side, "width": side}


def _diffusers_latents(fam, applied, seeds) -> torch.Tensor:
    pipe = DiffusionPipeline.from_pretrained(fam["base"])
    for k, (file, _) in enumerate(applied):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=f"l{k}")
    pipe.set_adapters([f"l{k}" for k in range(len(applied))], adapter_weights=[s for _, s in applied])
    pipe.set_progress_bar_config(disable=True)
    if fam["name"] == "sdxl":  # flow models keep their own flow Euler scheduler, as `flow_euler` does
        pipe.scheduler = scheduler_class("ddim").from_config(pipe.scheduler.config)
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
        **_size(fam),
    ).images
    if fam["name"] == "flux":
        f = pipe.vae_scale_factor
        out = unpack(out, 16 // f, 16 // f)
    return out


def test_single_with_two_loras_equals_diffusers(family):
    """1e-5 as `single` against each family's plain pipeline (docs/sdxl.md, docs/flow.md)."""
    applied = [(family["te"], 0.7), (family["den"], 1.3)]
    base, h = load_models([family["base"]] * 2, loras=[[], [{"path": str(f), "scale": s} for f, s in applied]])
    scheduler = {} if family["name"] == "sdxl" else {"scheduler": "flow_euler"}
    kw = dict(num_inference_steps=STEPS, guidance_scale=4.0, seed=5, num_images=2, progress=False, **scheduler, **_size(family))
    ours = single(h, PROMPT, **kw).latents
    torch.testing.assert_close(ours, _diffusers_latents(family, applied, [5, 6]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, single(base, PROMPT, **kw).latents, atol=1e-3)


def test_average_over_base_and_lora_equals_over_the_fused_model(family):
    def recipe(second: dict) -> dict:
        return {
            "method": "average",
            "params": {"weights": [0.5, 0.5]},
            "prompt": PROMPT,
            "models": [{"model": family["base"], "name": "base"}, {**second, "name": "lora"}],
            "sampling": {
                "num_inference_steps": STEPS,
                "seed": 1,
                **({} if family["name"] == "sdxl" else {"scheduler": "flow_euler"}),
                **_size(family),
            },
        }

    ours = run(recipe({"model": family["base"], "loras": [{"path": str(family["te"]), "scale": 0.7}]}), progress=False)
    fused = run(recipe({"model": family["fused"]}), progress=False)
    torch.testing.assert_close(ours.latents, fused.latents, atol=1e-4, rtol=1e-4)
