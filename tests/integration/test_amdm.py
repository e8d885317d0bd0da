"""AMDM on tiny models: degenerate cases equal `single`, scheduler independence, who is called
when, what a meeting computes, the step pictures, and bad input."""

import handmade
import pytest
import torch

import multifusion as mf
from multifusion import IncompatibleModelsError, RecipeError, load_models
from multifusion.latents import amdm as maths

PROMPTS = ["a blue square", "a red circle"]
KW = dict(num_inference_steps=30, seed=1, num_images=2, progress=False)


@pytest.fixture(scope="module")
def pair(tiny_a, tiny_b):
    return load_models([tiny_a, tiny_b], names=["layout", "palette"])


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "unipc", "pndm", "euler", "euler_a", "heun"])
def test_all_weight_on_the_specified_model_is_single(pair, scheduler):
    """w = 1 and correction = 0: the aggregate is the specified model's own step, exactly, under every
    scheduler (an ancestral one included: the other trajectory draws from its own streams)."""
    ha, hb = pair
    ref = mf.single(hb, PROMPTS[1], scheduler=scheduler, **KW).latents
    out = mf.amdm([ha, hb], PROMPTS, specified="palette", w=1.0, correction=0.0, scheduler=scheduler, **KW).latents
    assert torch.equal(out, ref)


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "pndm"])
def test_multistep_schedulers_are_not_shared(pair, scheduler):
    """A window at the very end keeps the other model running through every step beside the
    specified one; with w = 1 and correction = 0 the specified model must still equal `single` exactly,
    which fails if the trajectories share one stateful scheduler object (as the authors' do)."""
    ha, hb = pair
    ref = mf.single(ha, PROMPTS[0], scheduler=scheduler, **KW).latents
    out = mf.amdm([ha, hb], PROMPTS, w=1.0, correction=0.0, window=(0.95, 1.0), scheduler=scheduler, **KW).latents
    assert torch.equal(out, ref)


def test_past_the_window_only_the_specified_model_runs(pair, monkeypatch):
    ha, hb = pair
    calls = {"layout": 0, "palette": 0}
    for h in pair:
        real = h.eps
        monkeypatch.setattr(
            h, "eps", lambda x, t, e, _real=real, _name=h.name: (calls.__setitem__(_name, calls[_name] + 1), _real(x, t, e))[1]
        )
    mf.amdm([ha, hb], PROMPTS, steps=(1, 3), **KW)
    assert calls == {"layout": 30, "palette": 4}  # the other model: steps 0 to 3, then never again


def test_a_meeting_aggregates_and_corrects_as_the_maths_says(pair):
    """The latents the loop continues from after a meeting are amdm_update of the stepped
    latents (mu_k = x'_k), recomputed here from what the step record exposes."""
    ha, hb = pair
    seen = []

    def spy(step):
        if "amdm/x0" in step.record:
            seen.append(step.step)

    out = mf.amdm([ha, hb], PROMPTS, steps=(0, 1), w=0.6, correction=[0.3, 0.5], callback=spy, **KW)
    assert seen == [0, 1]
    ref = mf.single(ha, PROMPTS[0], **KW).latents
    assert not torch.allclose(out.latents, ref, atol=1e-3)  # the meeting changed the image

    # One meeting recomputed from the record of the step that meets.
    from multifusion.api import Run
    from multifusion.loop import initial_noise, sample
    from multifusion.method import Batch

    run = Run(
        {
            "method": "amdm",
            "params": {"steps": [0, 1], "w": 0.6, "correction": [0.3, 0.5]},
            "sampling": {"num_inference_steps": 30, "seed": 1},
            "models": [
                {"model": ha.source, "name": "layout", "prompt": PROMPTS[0]},
                {"model": hb.source, "name": "palette", "prompt": PROMPTS[1]},
            ],
        },
        models=[ha, hb],
    )
    plan = run.method.plan(run.prepared, Batch([1], [0], initial_noise(run.latent_shape, [torch.Generator().manual_seed(1)])))
    checked = []

    def meet(step):
        got = plan.meet(step)
        if step.step == 0:
            want = maths.amdm_update(step.latents, step.latents, maths.vp_weights(0.6, 2), [0.3, 0.5], relative=True)
            checked.append(all(torch.equal(g, w) for g, w in zip(got, want)))
        if step.step == 2:
            checked.append(got[1] is None)  # past its window the other model stops
        return got

    sample(plan.trajectories, num_inference_steps=30, meet=meet, progress=False)
    assert checked == [True, True]


def test_three_models_meet_by_the_nested_weights_written_out(tiny_dir):
    """Three different models, the second one specified: at each meeting every trajectory
    continues from m - eta_k (m - x'_k) with m = 0.6 x'_b + 0.64 x'_a + 0.48 x'_c, the nested
    weights of levels (0.6, 0.8) written out (w_1; sqrt(1 - w_1^2) w_2; sqrt(1 - w_1^2)
    sqrt(1 - w_2^2)), and x'_k each model's own DDIM step, both recomputed here by hand from the
    step record; a two-model or self-fusion test cannot see the third weight."""
    models = load_models([str(tiny_dir / k) for k in "abc"], names=["a", "b", "c"])
    steps = []
    mf.amdm(
        models,
        ["a blue square", "a red circle", "a green star"],
        specified="b",
        w=[0.6, 0.8],
        correction=[0.3, 0.5, 0.2],
        steps=(0, 1),
        num_inference_steps=4,
        seed=3,
        num_images=2,
        scheduler="ddim",
        callback=steps.append,
        progress=False,
    )
    c = {1: 0.6, 0: 0.8 * 0.8, 2: 0.8 * 0.6}  # model index -> weight; squares sum to 1
    etas = [0.3, 0.5, 0.2]
    for step in steps[:2]:  # the two meetings; after the second only the specified model runs on
        stepped = []
        for k in range(3):
            a = step.schedulers[k].alphas_cumprod
            stepped.append(
                handmade.ddim_step(
                    step.model_input[k],
                    step.eps[k],
                    float(a[step.t[k]]),
                    float(a[step.t_next[k]]),
                    clip=step.schedulers[k].config.clip_sample,
                )
            )
        m = sum(c[k] * stepped[k] for k in range(3))
        alive = [k for k in range(3) if step.latents[k] is not None]
        assert alive == ([0, 1, 2] if step.step == 0 else [1])
        for k in alive:
            # float32 scheduler arithmetic against float64 by hand, on latents of size ~1
            torch.testing.assert_close(step.latents[k].double(), m - etas[k] * (m - stepped[k]), rtol=1e-5, atol=1e-5)
        assert min((stepped[i] - stepped[j]).abs().mean() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3  # three distinct models
    assert [s.latents[0] is None for s in steps] == [False, True, True, True]


def test_the_aggregation_strip_is_written(pair, tmp_path, tiny_a, tiny_b):
    from PIL import Image

    recipe = {
        "method": "amdm",
        "params": {"steps": [0, 2]},
        "sampling": {"num_inference_steps": 6, "seed": 0},
        "models": [
            {"model": tiny_a, "name": "layout", "prompt": PROMPTS[0]},
            {"model": tiny_b, "name": "palette", "prompt": PROMPTS[1]},
        ],
    }
    written = mf.generate_to_folder(recipe, tmp_path, stem="agg", models=list(pair), export_masks=True, progress=False)
    strip = tmp_path / "agg-s0-amdm.png"
    assert strip in written and (tmp_path / "agg-s0.png") in written
    with Image.open(strip) as im:
        # 3 meeting steps across; rows: aggregate + 2 models x (before, after), each 32 px x 2
        assert im.height == 14 + 5 * 64 and im.width > 3 * 64


@pytest.mark.parametrize(
    "params, message",
    [
        ({"w": 1.5}, "params.w: must lie in [0, 1]"),
        ({"w": [0.5, 0.5]}, "params.w: has 2 level weights for 2 models"),
        ({"correction": -1.0}, "params.correction: must be finite and >= 0"),
        ({"correction": [0.1, 0.2, 0.3]}, "params.correction: has 3 entries for 2 models"),
        ({"correction": 2.0}, "params.correction: with correction_mode 'relative'"),
        ({"correction_mode": "absolute"}, "params.correction: give its length"),
        ({"steps": [1, 40]}, "params.steps: step 40 is past the last of 30 steps"),
        ({"steps": [3, 1]}, "params.steps: must be [first, last]"),
        ({"steps": [1, 3], "window": [0, 0.2]}, "not both"),
        ({"window": [0.5, 0.2]}, "params.window: must be [start, end]"),
        ({"specified": "nobody"}, "params.specified: no model named 'nobody'"),
        ({"specified": 2}, "params.specified: index 2 but the recipe has 2 model(s)"),
        ({"aggregation": "mean"}, "params.aggregation"),
        ({"preset": "papers"}, "params.preset: Input should be 'paper' (got 'papers')"),
        ({"correction_mode": "scaled"}, "params.correction: give its length in latent units with correction_mode 'scaled'"),
    ],
)
def test_bad_params_are_refused_before_loading(tiny_a, tiny_b, params, message, monkeypatch):
    import multifusion.api as api

    monkeypatch.setattr(api, "load_recipe_models", lambda r: pytest.fail("models were loaded"))
    recipe = {
        "method": "amdm",
        "params": params,
        "sampling": {"num_inference_steps": 30},
        "models": [{"model": tiny_a, "name": "layout", "prompt": "x"}, {"model": tiny_b, "name": "palette", "prompt": "y"}],
    }
    with pytest.raises(RecipeError) as info:
        mf.run(recipe, progress=False)
    assert message in str(info.value)


def test_a_window_holding_no_step_is_an_error_but_the_default_holds_the_first(pair):
    with pytest.raises(RecipeError, match=r"params.window: \[0.0, 0.1\] holds none of the 6 steps"):
        mf.amdm(list(pair), PROMPTS, window=(0.0, 0.1), num_inference_steps=6, progress=False)
    met = []
    mf.amdm(
        list(pair),
        PROMPTS,
        num_inference_steps=6,
        callback=lambda s: met.append(s.step) if "amdm/x0" in s.record else None,
        progress=False,
    )
    assert met == [0]


def test_models_of_another_latent_space_are_refused_before_loading(tiny_a, tiny_dir, monkeypatch):
    import multifusion.api as api

    monkeypatch.setattr(api, "load_recipe_models", lambda r: pytest.fail("models were loaded"))
    with pytest.raises(
        IncompatibleModelsError, match=r"models\[1\].model: their VAEs encode different latent spaces \(latent channels 8 vs 4\)"
    ):
        mf.amdm([tiny_a, str(tiny_dir / "wide")], PROMPTS, progress=False)


def test_the_paper_preset_is_its_explicit_params(pair):
    """`preset: paper` samples exactly what its settings written out do (w 0.5, steps [1, 3],
    eta 55 for the specified model and 45 for the other, in SD latent units), here with the
    second model specified; a field given beside the preset replaces its value."""
    ha, hb = pair
    explicit = dict(w=0.5, steps=(1, 3), correction=[45.0, 55.0], correction_mode="scaled", specified=1)
    ref = mf.amdm([ha, hb], PROMPTS, **explicit, **KW).latents
    assert torch.equal(mf.amdm([ha, hb], PROMPTS, preset="paper", specified=1, **KW).latents, ref)
    other_w = mf.amdm([ha, hb], PROMPTS, **{**explicit, "w": 0.3}, **KW).latents
    assert torch.equal(mf.amdm([ha, hb], PROMPTS, preset="paper", specified=1, w=0.3, **KW).latents, other_w)
    assert not torch.equal(other_w, ref)
    from multifusion.registry import get_method

    parse = get_method("amdm").parse_params  # a run shorter than the preset's window: its steps end at the last one
    assert [parse({"preset": "paper"}, n_models=2, num_inference_steps=n).steps for n in (1, 2, 4)] == [(0, 0), (1, 1), (1, 3)]


def test_a_scaled_correction_is_the_absolute_one_times_the_latent_size_ratio(pair):
    """`scaled` reads eta on 4x64x64 SD latents: on the tiny models' latents it is the absolute
    step eta * sqrt(latent size / 16384)."""
    ha, hb = pair
    run = mf.amdm([ha, hb], PROMPTS, steps=(0, 2), correction=[20.0, 10.0], correction_mode="scaled", **KW)
    ratio = (run.latents[0].numel() / (4 * 64 * 64)) ** 0.5
    absolute = mf.amdm([ha, hb], PROMPTS, steps=(0, 2), correction=[20.0 * ratio, 10.0 * ratio], correction_mode="absolute", **KW)
    assert ratio != 1.0
    torch.testing.assert_close(run.latents, absolute.latents, rtol=0, atol=1e-6)
