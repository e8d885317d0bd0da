"""average, snb and amdm on two tiny models of each flow family: degenerate cases equal `single`,
real fusions differ from both models; models of different families are refused with the reason."""

import pytest
import torch

from multifusion import amdm, average, load_models, run, single, snb
from multifusion.errors import IncompatibleModelsError
from multifusion.families import check_same_latent_space

PROMPT, OTHER = "a red circle in a snowy field", "a blue square"
KW = dict(num_inference_steps=4, seed=7, num_images=2, height=16, width=16, progress=False)
FAMILIES = ["sd3", "flux"]


@pytest.fixture(params=FAMILIES)
def pair(request, flow_dir):
    return load_models([str(flow_dir / f"{request.param}_a"), str(flow_dir / f"{request.param}_b")])


def test_average_degenerates_to_single_and_fuses(pair):
    a, b = pair
    ref = single(a, PROMPT, guidance_scale=3.5, **KW).latents
    assert torch.equal(average([a], [PROMPT], guidance_scale=3.5, **KW).latents, ref)
    assert torch.equal(average([a, a], [PROMPT, PROMPT], weights=[0.5, 0.5], guidance_scale=3.5, **KW).latents, ref)
    assert torch.equal(average([a, b], [PROMPT, OTHER], weights=[1.0, 0.0], guidance_scale=3.5, **KW).latents, ref)
    both = average([a, b], [PROMPT, OTHER], guidance_scale=3.5, **KW).latents
    other = single(b, OTHER, guidance_scale=3.5, **KW).latents
    assert not torch.allclose(both, ref, atol=1e-3) and not torch.allclose(both, other, atol=1e-3)


def test_snb_of_a_model_with_itself_is_single_and_of_two_models_blends(pair):
    """On FLUX the salience needs the unconditional (negative-prompt) pass that the distilled
    model's `single` never runs; the blended prediction is still the guided one."""
    a, b = pair
    ref = single(a, PROMPT, guidance_scale=3.5, **KW).latents
    same = snb([a, a], [PROMPT, PROMPT], guidance_scale=3.5, blur_size=2, **KW).latents
    assert torch.allclose(same, ref, atol=1e-5)
    masks = []
    fused = snb(
        [a, b],
        [PROMPT, OTHER],
        guidance_scale=3.5,
        blur_size=2,
        k=[5.0, 5.0],
        callback=lambda step: masks.append(step.record["snb/mask"]),
        **KW,
    ).latents
    assert not torch.allclose(fused, ref, atol=1e-3)
    chosen = torch.stack(masks)[:, 1].mean()  # share of pixels taken from the second model
    assert 0 < chosen < 1


def test_snb_on_flux_runs_the_negative_pass(flow_dir):
    """SNB asks every model for its unconditional prediction: for distilled FLUX that is a pass
    with the negative prompt, so the response (hence the mask) changes with it."""
    a, b = load_models([str(flow_dir / "flux_a"), str(flow_dir / "flux_b")])
    kw = dict(KW, num_images=1, blur_size=2, k=[5.0, 5.0], guidance_scale=3.5)

    def masks(negative):
        out = []
        snb([a, b], [PROMPT, OTHER], negative_prompt=negative, callback=lambda s: out.append(s.record["snb/mask"]), **kw)
        return torch.stack(out)

    assert not torch.equal(masks(""), masks("a green star"))


def test_amdm_with_all_weight_on_one_model_is_single_and_otherwise_aggregates(pair):
    a, b = pair
    ref = single(a, PROMPT, guidance_scale=3.5, **KW).latents
    degenerate = amdm([a, b], [PROMPT, OTHER], w=1.0, correction=0.0, guidance_scale=3.5, **KW).latents
    assert torch.equal(degenerate, ref)
    fused = amdm([a, b], [PROMPT, OTHER], guidance_scale=3.5, window=(0.0, 0.5), **KW).latents
    assert fused.shape == ref.shape and not torch.allclose(fused, ref, atol=1e-3)


def test_amdm_records_flow_x0(flow_dir):
    a, b = load_models([str(flow_dir / "flux_a"), str(flow_dir / "flux_b")])
    seen = []

    def callback(step):
        if "amdm/x0" in step.record:
            x0 = step.x0(0)
            assert torch.equal(x0, step.model_input[0] - step.schedulers[0].sigmas[step.step] * step.eps[0])
            seen.append(step.record["amdm/x0_aggregate"])

    amdm([a, b], [PROMPT, OTHER], window=(0.0, 0.5), callback=callback, **KW)
    assert seen and all(torch.isfinite(x).all() for x in seen)


@pytest.mark.parametrize("first, second", [("sd3_a", "flux_a"), ("flux_a", "unet"), ("unet", "sd3_a")])
def test_mixed_families_are_refused_before_loading_with_the_reason(flow_dir, tiny_a, first, second):
    path = {"unet": tiny_a}
    recipe = {
        "method": "average",
        "prompt": PROMPT,
        "models": [{"model": path.get(m, str(flow_dir / m))} for m in (first, second)],
        "sampling": {"num_inference_steps": 2, "height": 16, "width": 16},
    }
    with pytest.raises(
        IncompatibleModelsError, match=r"models\[1\]\.model: a .* model cannot meet models\[0\].*fuse models of one family"
    ):
        run(recipe, progress=False)


def test_mixed_families_are_refused_after_loading(flow_dir, tiny_a):
    sd3, flux, unet = load_models([str(flow_dir / "sd3_a"), str(flow_dir / "flux_a"), tiny_a])
    for a, b in ((sd3, flux), (flux, unet), (unet, sd3)):
        with pytest.raises(IncompatibleModelsError, match="different latent spaces.*fuse models of one family"):
            check_same_latent_space([a, b])
    with pytest.raises(IncompatibleModelsError, match="a FLUX.1 model cannot meet models\\[0\\], a Stable Diffusion 3 model"):
        average([sd3, flux], [PROMPT, PROMPT], **KW)


def test_flow_models_refuse_samplers_without_a_flow_form(flow_dir):
    [a] = load_models([str(flow_dir / "sd3_a")])
    from multifusion.errors import RecipeError

    with pytest.raises(RecipeError, match="sampling.scheduler: 'dpm\\+\\+' has no flow-matching form"):
        single(a, PROMPT, scheduler="dpm++", **KW)
    assert torch.equal(
        single(a, PROMPT, scheduler="flow_euler", **KW).latents, single(a, PROMPT, scheduler="euler", **KW).latents
    )


def test_afa_refuses_flux_models_with_the_reason(flux_a, flux_b):
    """SD3 models are ensembled (tests/integration/flow/test_flow_afa.py); FLUX is refused."""
    from multifusion.api import fuse

    with pytest.raises(IncompatibleModelsError, match="FLUX.1's single-stream blocks"):
        fuse("afa", load_models([flux_a, flux_b]), [PROMPT, OTHER], **KW)
