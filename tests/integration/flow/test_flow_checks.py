"""What a recipe asks of flow models that they cannot do, refused naming the field: true CFG on a
model other than FLUX, `eta` (the flow Euler step is deterministic), AMDM across different flow
schedules, and Mixture-of-Diffusers regions off the patch grid; before loading where the configs
are local, after loading (before sampling) otherwise."""

import pytest
import torch

from multifusion import average, load_models, run
from multifusion.errors import IncompatibleModelsError, RecipeError
from multifusion.recipe import parse_recipe
from multifusion.validate import validate

PROMPT, OTHER = "a red circle in a snowy field", "a blue square"
SAMPLING = {"num_inference_steps": 2, "height": 16, "width": 16}


@pytest.fixture
def no_loading(monkeypatch):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def configs_not_local(monkeypatch):
    """As for Hub ids: nothing can be checked before loading."""
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "read_facts", lambda ref: None)


@pytest.fixture(scope="module")
def sd3_shift2(tmp_path_factory):
    """An SD3 fine-tune of sd3_a's base (same encoders and VAE) whose scheduler shifts by 2, not 3."""
    from multifusion.testing import build_tiny_sd3_pipeline

    return str(
        build_tiny_sd3_pipeline(tmp_path_factory.mktemp("shift") / "sd3_shift2", seed=1, text_seed=0, vae_seed=0, shift=2.0)
    )


def _recipe(models, method="single", sampling=None, **extra):
    return {
        "method": method,
        "prompt": PROMPT,
        "models": [m if isinstance(m, dict) else {"model": m} for m in models],
        "sampling": {**SAMPLING, **(sampling or {})},
        **extra,
    }


def test_true_cfg_scale_is_refused_for_other_families_before_loading(sd3_a, tiny_a, no_loading):
    for model in (sd3_a, tiny_a):
        with pytest.raises(RecipeError, match=r"models\[0\].true_cfg_scale: true CFG is FLUX's .* drop true_cfg_scale"):
            run(_recipe([{"model": model, "true_cfg_scale": 3.0}]), progress=False)


def test_true_cfg_scale_is_refused_for_sd3_after_loading_when_configs_are_not_local(sd3_a, configs_not_local):
    with pytest.raises(RecipeError, match=r"models\[0\].true_cfg_scale: true CFG is FLUX's .*; a Stable Diffusion 3 model"):
        run(_recipe([{"model": sd3_a, "true_cfg_scale": 3.0}]), progress=False)


def test_true_cfg_scale_below_one_is_refused():
    with pytest.raises(RecipeError, match=r"models\[0\].true_cfg_scale"):
        parse_recipe(_recipe([{"model": "zoo:general", "true_cfg_scale": 0.5}]))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_eta_is_refused_for_flow_models_before_loading(flow_dir, family, no_loading):
    with pytest.raises(
        RecipeError,
        match=r"sampling.eta: 0.5 but models\[0\] is a .* model, sampled by the flow-matching Euler "
        r"step, which has no eta .*drop sampling.eta",
    ):
        run(_recipe([str(flow_dir / f"{family}_a")], sampling={"eta": 0.5}), progress=False)


def test_eta_is_refused_after_loading_when_configs_are_not_local(flux_a, configs_not_local):
    with pytest.raises(RecipeError, match=r"sampling.eta: 1.0 but models\[0\] is a FLUX.1 model"):
        run(_recipe([flux_a], sampling={"eta": 1.0}), progress=False)


def test_amdm_refuses_flow_schedules_that_differ_before_loading(sd3_a, sd3_shift2, no_loading):
    with pytest.raises(
        IncompatibleModelsError,
        match=r"models\[1\].model: its schedule differs from models\[0\]'s "
        r"\(shift 3.0 vs 2.0 in scheduler_config.json\), so with method 'amdm'",
    ):
        validate(parse_recipe(_recipe([sd3_a, sd3_shift2], method="amdm")))


def test_amdm_refuses_flow_schedules_that_differ_after_loading(sd3_a, sd3_shift2, configs_not_local):
    with pytest.raises(IncompatibleModelsError, match=r"models\[1\].model: its schedule differs .*shift 3.0 vs 2.0"):
        run(_recipe([sd3_a, sd3_shift2], method="amdm"), progress=False)


def test_one_trajectory_methods_take_models_of_different_shifts(sd3_a, sd3_shift2):
    """`average` runs one trajectory on the first model's schedule; each model is asked at the
    same (x_s, t), which means the same thing whatever the shift of its scheduler config."""
    a, b = load_models([sd3_a, sd3_shift2])
    out = average([a, b], [PROMPT, OTHER], num_inference_steps=2, height=16, width=16, progress=False).latents
    assert torch.isfinite(out).all()


def _mod(flow_dir, col_end):
    region = {"row_init": 0, "row_end": 16, "col_init": 0, "col_end": col_end, "prompt": PROMPT}
    return _recipe(
        [str(flow_dir / "flux_a")],
        method="mod",
        sampling={"width": 24},
        params={"regions": [region], "background": {"prompt": OTHER}},
    )


def test_mod_regions_off_the_patch_grid_are_refused_before_loading(flow_dir, no_loading):
    with pytest.raises(
        RecipeError, match=r"params.regions\[0\].col_end: 22 px is not on the 4-pixel patch grid of FLUX.1 models"
    ):
        validate(parse_recipe(_mod(flow_dir, 22)))
    validate(parse_recipe(_mod(flow_dir, 20)))


def test_mod_regions_off_the_patch_grid_are_refused_after_loading_when_configs_are_not_local(flow_dir, configs_not_local):
    with pytest.raises(RecipeError, match=r"params.regions\[0\].col_end: 22 px is not on the 4-pixel patch grid"):
        run(_mod(flow_dir, 22), progress=False)
