"""region-attention on tiny SD3 and FLUX transformers: one region over the canvas is `single` bit
for bit, the base alone where the regions do not apply, each region's image tokens attend its
own prompt in the joint blocks (FLUX's rotary positions taken at the tokens' own rows), and
regions off the patch grid refused before sampling."""

import pytest
import torch

from multifusion import RecipeError, load_models, single
from multifusion.api import run
from multifusion.features.regional import Layout, Regions, installed, text_attention

PROMPT, OTHER = "a red circle in a snowy field", "a blue square"
KW = dict(num_inference_steps=3, seed=4, num_images=2, progress=False, height=16, width=24)


def recipe(model, params, **sampling):
    return {
        "method": "region-attention",
        "models": [{"model": model}],
        "params": params,
        "sampling": {"num_inference_steps": 3, "seed": 4, "num_images": 2, "height": 16, "width": 24, **sampling},
    }


def box(r0, r1, c0, c1, prompt=PROMPT):
    return {"row_init": r0, "row_end": r1, "col_init": c0, "col_end": c1, "prompt": prompt}


@pytest.fixture(scope="module")
def handles(flow_dir):
    return {f: (str(flow_dir / f"{f}_a"), load_models([str(flow_dir / f"{f}_a")])[0]) for f in ("sd3", "flux")}


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("with_base", [True, False])
def test_one_region_over_the_canvas_is_single(handles, family, with_base):
    """Tolerance none: the model's own processor on the same tokens, a lerp between equal tensors."""
    path, h = handles[family]
    params = {"regions": [box(0, 16, 0, 24)], **({"base_prompt": PROMPT, "base_ratio": 0.4} if with_base else {})}
    out = run(recipe(path, params), models=[h], progress=False).latents
    assert torch.equal(out, single(h, PROMPT, **KW).latents)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_regions_change_the_picture_and_ratio_one_is_the_base(handles, family):
    path, h = handles[family]
    ref = single(h, PROMPT, **KW).latents
    regions = [box(0, 16, 0, 12, OTHER), box(0, 16, 12, 24, "a green triangle")]
    same = run(recipe(path, {"regions": regions, "base_prompt": PROMPT, "base_ratio": 1.0}), models=[h], progress=False)
    assert torch.equal(same.latents, ref)
    out = run(recipe(path, {"regions": regions, "base_prompt": PROMPT}), models=[h], progress=False).latents
    assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_each_regions_image_tokens_attend_its_prompt_in_the_joint_blocks(handles, family):
    """In the first joint block, no base, two regions (left and right halves of a 4x4 token grid):
    each region's image and text outputs are the model's own processor run on that region's image
    tokens and its prompt alone (for FLUX with the rotary rows of those tokens)."""
    _, h = handles[family]
    layers = text_attention(h.unet)
    module, kind = layers["transformer_blocks.0.attn"]
    assert kind == "joint"
    seen = {}

    def grab(mod, args, kwargs, out):
        seen.update(args=args, kwargs=kwargs, out=out)

    left, right = h.encode_prompt([PROMPT]), h.encode_prompt([OTHER])
    n = left.embeds.shape[1]
    both = type(left)(torch.cat([left.embeds, right.embeds], dim=1), left.extra)
    if family == "flux":
        both = type(both)(both.embeds, {**both.extra, "guidance": torch.full((1,), 3.5)})
    regions = Regions([(0, 8, 0, 4), (0, 8, 4, 8)], (8, 8), None, Layout((n, n), False))
    hook = module.register_forward_hook(grab, with_kwargs=True)
    try:
        with installed(layers, regions):
            h.eps(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(700.0), both)
    finally:
        hook.remove()
    image = seen["kwargs"].get("hidden_states", seen["args"][0] if seen["args"] else None)
    text = seen["kwargs"]["encoder_hidden_states"]
    rope = seen["kwargs"].get("image_rotary_emb")
    out_img, out_txt = seen["out"]
    cols = torch.arange(4).repeat(4)
    for k, (idx, s) in enumerate([((cols < 2).nonzero()[:, 0], slice(0, n)), ((cols >= 2).nonzero()[:, 0], slice(n, 2 * n))]):
        extra = {}
        if rope is not None:
            rows = torch.cat([torch.arange(s.start, s.stop), 2 * n + idx])
            extra["image_rotary_emb"] = tuple(r[rows] for r in rope)
        with torch.no_grad():
            own_img, own_txt = module.processor(module, image[:, idx], text[:, s], **extra)
        assert torch.equal(out_img[:, idx], own_img), k
        assert torch.equal(out_txt[:, s], own_txt), k


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_regions_off_the_patch_grid_are_refused_before_loading(flow_dir, family, monkeypatch):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = recipe(str(flow_dir / f"{family}_a"), {"regions": [box(0, 16, 0, 10), box(0, 16, 10, 24, OTHER)]})
    with pytest.raises(RecipeError, match=r"params.regions\[0\].col_end: 10 px is not on the 4-pixel patch grid"):
        run(bad, progress=False)


def test_regions_off_the_patch_grid_are_refused_after_loading_when_configs_are_not_local(handles, monkeypatch):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "read_facts", lambda ref: None)
    path, h = handles["flux"]
    bad = recipe(path, {"regions": [box(0, 16, 0, 10), box(0, 16, 10, 24, OTHER)]})
    with pytest.raises(RecipeError, match=r"params.regions\[0\].col_end: 10 px is not on the 4-pixel patch grid"):
        run(bad, models=[h], progress=False)


def test_flux_single_stream_block_runs_each_region_as_its_own_sequence(handles):
    """FLUX's single-stream block sees [text; image] as one sequence: with a base prompt and two
    regions, each region's text and image rows are the model's processor on [its prompt; its image
    tokens] (its rotary rows), and the base text rows the processor on [base prompt; every token]."""
    _, h = handles["flux"]
    layers = text_attention(h.unet)
    module, kind = layers["single_transformer_blocks.0.attn"]
    assert kind == "single"
    seen = {}

    def grab(mod, args, kwargs, out):
        seen.update(kwargs=kwargs, out=out)

    parts = [h.encode_prompt([text]) for text in (PROMPT, OTHER, "a green triangle")]
    n = parts[0].embeds.shape[1]
    both = type(parts[0])(torch.cat([p.embeds for p in parts], dim=1), {**parts[0].extra, "guidance": torch.full((1,), 3.5)})
    regions = Regions([(0, 8, 0, 4), (0, 8, 4, 8)], (8, 8), 0.3, Layout((n, n, n), True))
    hook = module.register_forward_hook(grab, with_kwargs=True)
    try:
        with installed(layers, regions):
            h.eps(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(600.0), both)
    finally:
        hook.remove()
    seq, rope, out = seen["kwargs"]["hidden_states"], seen["kwargs"]["image_rotary_emb"], seen["out"]
    assert seq.shape[1] == 3 * n + 16
    cols = torch.arange(4).repeat(4)
    with torch.no_grad():
        rows = torch.cat([torch.arange(n), 3 * n + torch.arange(16)])
        base = module.processor(module, seq[:, rows], None, None, tuple(r[rows] for r in rope))
        assert torch.equal(out[:, :n], base[:, :n])
        for k, idx in enumerate([(cols < 2).nonzero()[:, 0], (cols >= 2).nonzero()[:, 0]]):
            s = slice((k + 1) * n, (k + 2) * n)
            rows = torch.cat([torch.arange(s.start, s.stop), 3 * n + idx])
            own = module.processor(module, seq[:, rows], None, None, tuple(r[rows] for r in rope))
            assert torch.equal(out[:, s], own[:, :n]), k
            want = torch.lerp(base[:, n:][:, idx], own[:, n:], torch.tensor(0.7))
            torch.testing.assert_close(out[:, 3 * n + idx], want, rtol=1e-6, atol=1e-7)
