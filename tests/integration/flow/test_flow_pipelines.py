"""Pipeline objects of every family (`loading.from_pipeline`): SD3, FLUX and SDXL pipelines handed
over as they are give `single` and `average` the latents of the same models named by path."""

from __future__ import annotations

import pytest
import torch

import multifusion as mf
from multifusion import load_models

PROMPTS = ["a red circle in a snowy field", "a blue square"]


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl"])
def test_pipelines_of_each_family_equal_their_paths(request, family):
    import diffusers

    if family == "sdxl":
        root = request.getfixturevalue("tiny_sdxl_dir")
        paths, cls, size = [str(root / "a"), str(root / "b")], diffusers.StableDiffusionXLPipeline, None
    else:
        root = request.getfixturevalue("flow_dir")
        paths = [str(root / f"{family}_a"), str(root / f"{family}_b")]
        cls = diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline
        size = 16
    first = cls.from_pretrained(paths[0])
    shared = {k: v for k, v in first.components.items() if k.startswith(("text_encoder", "tokenizer", "vae"))}
    second = cls.from_pretrained(paths[1], **shared)
    objects = load_models([first, second])
    assert objects[1].text_encoder is objects[0].text_encoder and objects[1].unet is second.components[objects[1].denoiser_folder]
    kw = dict(num_inference_steps=3, seed=4, num_images=2, progress=False, **({"height": size, "width": size} if size else {}))
    for method, n, extra in (("single", 1, {}), ("average", 2, {"weights": [0.3, 0.7]})):
        got = mf.fuse(method, objects[:n], PROMPTS[:n], **extra, **kw).latents
        want = mf.fuse(method, paths[:n], PROMPTS[:n], **extra, **kw).latents
        assert torch.equal(got, want), method
