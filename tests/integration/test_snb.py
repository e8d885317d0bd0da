"""SNB on tiny models: degenerate cases, the fusion window, records, bad input."""

import pytest
import torch

from multifusion import IncompatibleModelsError, RecipeError, load_models, single, snb
from multifusion.loop import Step

PROMPT = "a red circle in a snowy field"
KW = dict(num_inference_steps=5, seed=2, num_images=2, progress=False)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler_a"])
@pytest.mark.parametrize("blur", ["box", "gaussian", "none"])
def test_snb_of_a_model_with_itself_is_single(tiny_a, scheduler, blur):
    [h] = load_models([tiny_a])
    ref = single(h, PROMPT, scheduler=scheduler, **KW).latents
    assert torch.equal(snb([h, h], [PROMPT, PROMPT], blur=blur, scheduler=scheduler, **KW).latents, ref)
    assert torch.equal(snb([h, h, h], PROMPT, scheduler=scheduler, **KW).latents, ref)
    # The soft mask weighs identical predictions by 1/3 each: equal up to rounding.
    assert torch.allclose(snb([h, h, h], PROMPT, temperature=0.5, scheduler=scheduler, **KW).latents, ref, atol=1e-4)
    for gate in ("base", "region"):
        assert torch.equal(snb([h, h], PROMPT, gate=gate, scheduler=scheduler, **KW).latents, ref)


def _count_calls(handle):
    calls = []
    eps = handle.eps

    def counting(x, t, embeds):
        calls.append(float(t))
        return eps(x, t, embeds)

    handle.eps = counting
    return calls


def test_before_the_window_only_the_base_model_runs(tiny_a, tiny_b):
    ha, hb = load_models([tiny_a, tiny_b])
    calls_a, calls_b = _count_calls(ha), _count_calls(hb)
    # 10 DDIM steps: t = 901, 801, ..., 1; fuse late, for t <= 400.
    out = snb([ha, hb], [PROMPT, "a blue square"], fusion_timestep=400, num_inference_steps=10, progress=False).latents
    assert len(calls_a) == 10 and calls_b == [301.0, 201.0, 101.0, 1.0]
    calls_a.clear(), calls_b.clear()
    snb([ha, hb], [PROMPT, "a blue square"], fusion_timestep=400, fusion="early", num_inference_steps=10, progress=False)
    assert len(calls_a) == 10 and all(t > 400 for t in calls_b) and len(calls_b) == 6
    assert torch.isfinite(out).all()


def test_snb_differs_from_both_models_and_records_masks(tiny_a, tiny_b):
    ha, hb = load_models([tiny_a, tiny_b])
    steps: list[Step] = []
    from multifusion.api import run

    recipe = {
        "method": "snb",
        "params": {"k": [1.0, 2.0]},
        "models": [{"model": tiny_a, "prompt": PROMPT}, {"model": tiny_b, "prompt": "a blue square"}],
        "sampling": {"num_inference_steps": 4, "num_images": 2},
    }
    fused = run(recipe, models=[ha, hb], callback=steps.append, progress=False).latents
    a = single(ha, PROMPT, num_inference_steps=4, num_images=2, progress=False).latents
    assert not torch.allclose(fused, a)
    mask = steps[0].record["snb/mask"]
    assert mask.shape == (2, 2, 1, 8, 8) and torch.equal(mask.sum(0), torch.ones(2, 1, 8, 8))
    assert 0 < mask[1].mean() < 1  # both models paint some pixels


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_a_fused_step_is_the_recorded_mask_applied_to_each_models_own_prediction(tiny_a, tiny_b, temperature):
    """Two different models (their own UNets, prompts, guidance scales and k): at every step the
    fused prediction is mask_0 eps_a + mask_1 eps_b, recomputed here from the step's input and
    each model's own guided prediction, and the recorded maps are the spatial softmax of each
    model's own salience with its own k. A model fused with itself cannot show a mask applied to
    the wrong model; two models whose masks both win pixels can."""
    from multifusion.api import run
    from multifusion.noise.snb import salience, spatial_softmax

    ha, hb = load_models([tiny_a, tiny_b])
    prompts, scales, ks = [PROMPT, "a blue square"], [7.5, 4.0], [1.0, 3.0]
    recipe = {
        "method": "snb",
        "params": {"k": ks, "blur": "gaussian", "temperature": temperature},
        "models": [
            {"model": tiny_a, "prompt": prompts[0], "guidance_scale": scales[0]},
            {"model": tiny_b, "prompt": prompts[1], "guidance_scale": scales[1]},
        ],
        "sampling": {"num_inference_steps": 4, "num_images": 2, "seed": 5},
    }
    steps: list[Step] = []
    run(recipe, models=[ha, hb], callback=steps.append, progress=False)
    own = [h.guide(p, guidance_scale=s, batch_size=2) for h, p, s in zip((ha, hb), prompts, scales)]
    assert len(steps) == 4
    for step in steps:
        x, t = step.model_input[0], step.t[0]
        preds = [g.predict(x, t, need_uncond=True) for g in own]
        maps = torch.stack([spatial_softmax(salience(p.response, "gaussian", 4, 1.0), k) for p, k in zip(preds, ks)])
        torch.testing.assert_close(step.record["snb/maps"], maps, rtol=0, atol=0)  # the same float32 operations: exact
        mask = step.record["snb/mask"]
        want = mask[0] * preds[0].eps + mask[1] * preds[1].eps
        torch.testing.assert_close(step.eps[0], want, rtol=1e-6, atol=1e-6)
        # Non-degenerate, so an error would show: both models own part of each image and
        # predict clearly differently there.
        share = mask[1].mean(dim=(1, 2, 3))
        assert ((0.05 < share) & (share < 0.95)).all(), share
        assert (preds[0].eps - preds[1].eps).abs().mean() > 0.05
    if temperature is None:
        assert all(torch.equal(s.record["snb/mask"], s.record["snb/mask"].round()) for s in steps)  # the paper's hard mask


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 0}, "params.k: must all be > 0"),
        ({"k": [1.0, -1.0]}, "params.k: must all be > 0"),
        ({"k": [1.0, 1.0, 1.0]}, "params.k: has 3 entries for 2 models"),
        ({"window": [0.5, 1.2]}, "params.window: must be [start, end]"),
        ({"window": [0.8, 0.2]}, "params.window: must be [start, end]"),
        ({"blur": "median"}, "params.blur"),
        ({"gate": "expert"}, "params.gate"),
        ({"blur_size": 9}, "params.blur_size: 9 is larger than the latent (8x8)"),
        ({"blur": "gaussian", "blur_sigma": 3}, "params.blur_sigma"),
    ],
)
def test_bad_params(tiny_a, tiny_b, params, message):
    from multifusion.api import run

    recipe = {
        "method": "snb",
        "params": params,
        "sampling": {"num_inference_steps": 2},
        "models": [{"model": tiny_a, "prompt": "x"}, {"model": tiny_b, "prompt": "y"}],
    }
    with pytest.raises(RecipeError) as info:
        run(recipe, progress=False)
    assert message in str(info.value)


def test_snb_needs_two_models_of_one_latent_space(tiny_a, tiny_dir):
    with pytest.raises(RecipeError, match="at least 2 model"):
        snb([tiny_a], PROMPT, num_inference_steps=2, progress=False)
    with pytest.raises(IncompatibleModelsError, match="latent channels"):
        snb([tiny_a, str(tiny_dir / "wide")], PROMPT, num_inference_steps=2, progress=False)


def test_cli_exports_mask_strip_and_gif(tmp_path, tiny_a, tiny_b):
    import yaml
    from PIL import Image

    from multifusion.cli import main

    recipe = tmp_path / "fuse.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "snb",
                "params": {"window": [0.6, 1.0]},
                "models": [
                    {"model": tiny_a, "prompt": PROMPT, "name": "general"},
                    {"model": tiny_b, "prompt": "a blue square", "name": "expert"},
                ],
                "sampling": {"num_inference_steps": 6, "num_images": 2},
            }
        )
    )
    out = tmp_path / "out"
    assert main(["generate", str(recipe), "--out", str(out), "--export-masks", "--no-progress"]) == 0
    strip = Image.open(out / "fuse-s1-masks.png")
    gif = Image.open(out / "fuse-s1-masks.gif")
    # DDIM t = 831, 665, 499, 333, 167, 1: the last three lie in the window: three frames, each a mask and two maps.
    assert gif.n_frames == 3
    assert strip.size[0] == 3 * 8 * 8 and strip.size[1] == 14 + 3 * 8 * 8


def test_late_and_early_windows_split_the_steps_at_t_s(tiny_a, tiny_b):
    # 10 DDIM steps: t = 901, 801, ..., 1; t_s = 301 is one of them: late takes t <= 301, early t > 301.
    ha, hb = load_models([tiny_a, tiny_b])
    calls_b = _count_calls(hb)
    snb([ha, hb], [PROMPT, "a blue square"], fusion_timestep=301, num_inference_steps=10, progress=False)
    late = list(calls_b)
    calls_b.clear()
    snb([ha, hb], [PROMPT, "a blue square"], fusion_timestep=301, fusion="early", num_inference_steps=10, progress=False)
    assert late == [301.0, 201.0, 101.0, 1.0] and calls_b == [901.0, 801.0, 701.0, 601.0, 501.0, 401.0]


def test_snb_at_guidance_one_equals_single(tiny_a):
    [h] = load_models([tiny_a])
    ref = single(h, PROMPT, guidance_scale=1.0, **KW).latents
    # single runs only the conditional batch at scale 1, SNB also the unconditional one for its
    # salience: a UNet batch of 2B rounds differently from one of B, so equal to float tolerance.
    fused = snb([h, h], PROMPT, guidance_scale=1.0, **KW).latents
    assert torch.allclose(fused, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"fusion_timestep": 5000}, "params.fusion_timestep: 5000 is beyond"),
        ({"fusion_timestep": 300, "window": [0.2, 1.0]}, "not both"),
    ],
)
def test_bad_fusion_timestep(tiny_a, tiny_b, params, message):
    from multifusion.api import run

    recipe = {
        "method": "snb",
        "params": params,
        "sampling": {"num_inference_steps": 2},
        "models": [{"model": tiny_a, "prompt": "x"}, {"model": tiny_b, "prompt": "y"}],
    }
    with pytest.raises(RecipeError, match=message):
        run(recipe, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": [1.0, 0.0]}, "k: must all be > 0"),
        ({"window": (0.5, 1.5)}, "window: must be"),
        ({"temperature": 0.0}, "temperature: must be > 0"),
        ({"blur": "median"}, "blur: must be"),
        ({"blur_size": 0}, "blur_size: must be >= 1"),
        ({"gate": "expert"}, "gate: must be 'none'"),
    ],
)
def test_snb_built_directly_checks_its_arguments(tiny_a, kwargs, message):
    from multifusion.noise.snb import SNB

    [h] = load_models([tiny_a])
    g = h.guide(PROMPT)
    with pytest.raises(ValueError, match=message):
        SNB([g, g], **{"k": [1.0, 1.0], **kwargs})
