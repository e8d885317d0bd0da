"""Flow-matching maths: the conversions between velocity, eps and x0, why combiners are exact in
velocity, the shift of the sigmas, FLUX's packing, and the sampler adapter."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.errors import RecipeError
from multifusion.families.flowmatch import (
    FlowMatchSampler,
    eps_to_velocity,
    resolution_shift,
    velocity_to_eps,
    velocity_to_x0,
    vp_alphas_cumprod,
    x0_to_velocity,
)
from multifusion.families.flux import image_ids, pack, unpack
from multifusion.handles import cfg
from multifusion.noise.average import weighted_average
from multifusion.schedulers import check_flow_sampler, make_scheduler

seeds = st.integers(0, 2**31 - 1)
inner_sigma = st.floats(0.01, 0.99)


def _t(seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(n)]


@settings(max_examples=50, deadline=None)
@given(seeds, inner_sigma)
def test_conversions_round_trip_and_agree_with_the_process(seed, s):
    x0, e, v_any = _t(seed)
    x_t, v = (1 - s) * x0 + s * e, e - x0
    assert torch.allclose(velocity_to_eps(v, x_t, s), e, atol=1e-12)
    assert torch.allclose(velocity_to_x0(v, x_t, s), x0, atol=1e-12)
    assert torch.allclose(eps_to_velocity(velocity_to_eps(v_any, x_t, s), x_t, s), v_any, atol=1e-9)
    assert torch.allclose(x0_to_velocity(velocity_to_x0(v_any, x_t, s), x_t, s), v_any, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(seeds, st.floats(0.0, 1.0), st.lists(st.floats(0.01, 10.0), min_size=3, max_size=3), st.floats(0.0, 12.0))
def test_average_and_cfg_in_velocity_are_the_same_as_in_eps(seed, s, weights, scale):
    """eps = x_t + (1 - s) v is affine with coefficients shared by every model at one (x_t, s), so
    normalised weighted sums (average, Mixture-of-Diffusers weights) and CFG commute with it."""
    x_t, *_ = _t(seed, 1)
    vs = _t(seed + 1)
    to_eps = [velocity_to_eps(v, x_t, s) for v in vs]
    assert torch.allclose(velocity_to_eps(weighted_average(vs, weights), x_t, s), weighted_average(to_eps, weights), atol=1e-9)
    assert torch.allclose(velocity_to_eps(cfg(vs[0], vs[1], scale), x_t, s), cfg(to_eps[0], to_eps[1], scale), atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(seeds, inner_sigma, st.floats(0.0, 1.0))
def test_the_flow_euler_step_is_ddim_in_flow_coordinates(seed, s, frac):
    """x + (s' - s) v = (1 - s') x0 + s' e with the x0 and e the velocity implies: DDIM at eta 0."""
    x_t, v, _ = _t(seed)
    s_next = s * frac
    euler = x_t + (s_next - s) * v
    ddim = (1 - s_next) * velocity_to_x0(v, x_t, s) + s_next * velocity_to_eps(v, x_t, s)
    assert torch.allclose(euler, ddim, atol=1e-12)


def test_eps_carries_no_velocity_at_pure_noise():
    x = torch.randn(1, 4, 2, 2)
    assert torch.equal(velocity_to_eps(torch.randn(1, 4, 2, 2), x, 1.0), x)  # any v gives the same eps
    with pytest.raises(ValueError, match="sigma < 1"):
        eps_to_velocity(x, x, 1.0)
    with pytest.raises(ValueError, match="sigma > 0"):
        x0_to_velocity(x, x, 0.0)


def test_resolution_shift_matches_the_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert resolution_shift(256) == pytest.approx(0.5) and resolution_shift(4096) == pytest.approx(1.15)
    for n in (16, 1024, 4096, 16384):
        assert resolution_shift(n, 256, 4096, 0.5, 1.16) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.16), abs=1e-12)


def test_vp_table_has_the_flow_signal_to_noise_ratio():
    a = vp_alphas_cumprod(1000)
    assert a.shape == (1001,) and a[0] == 1 and a[-1] == 0
    s = torch.arange(1, 1000, dtype=torch.float64) / 1000
    assert torch.allclose(a[1:-1] / (1 - a[1:-1]), ((1 - s) / s) ** 2)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_pack_unpack_round_trip_and_match_flux(seed, hp, wp, c):
    from diffusers import FluxPipeline

    x = torch.randn(2, c, 2 * hp, 2 * wp, generator=torch.Generator().manual_seed(seed))
    p = pack(x)
    assert p.shape == (2, hp * wp, 4 * c)
    assert torch.equal(unpack(p, 2 * hp, 2 * wp), x)
    assert torch.equal(p, FluxPipeline._pack_latents(x, 2, c, 2 * hp, 2 * wp))
    assert torch.equal(image_ids(hp, wp), FluxPipeline._prepare_latent_image_ids(1, hp, wp, "cpu", torch.float32))


def test_pack_refuses_odd_latents():
    with pytest.raises(ValueError, match="2x2 patches"):
        pack(torch.zeros(1, 16, 3, 4))


def test_sampler_follows_each_pipeline_and_needs_the_size_for_dynamic_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    s = FlowMatchSampler(sd3)
    s.set_timesteps(4)
    ref = FlowMatchEulerDiscreteScheduler.from_config(sd3)
    ref.set_timesteps(4)
    assert torch.equal(s.timesteps, ref.timesteps) and torch.equal(s.sigmas, ref.sigmas)
    assert s.init_noise_sigma == 1.0 and s.scale_model_input(ref.sigmas, 0) is ref.sigmas

    flux = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="latent_hw"):
        FlowMatchSampler(flux, pipeline_sigmas=True).set_timesteps(4)
    s = FlowMatchSampler(flux, latent_hw=(64, 64), pipeline_sigmas=True)
    s.set_timesteps(4)
    ref = FlowMatchEulerDiscreteScheduler.from_config(flux)
    ref.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=resolution_shift(32 * 32))
    assert torch.allclose(s.sigmas, ref.sigmas)

    x, v = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    assert torch.equal(s.predicted_x0(x, v, 1), x - s.sigmas[1] * v)
    x0, n = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    sig = s.sigmas[2]
    assert torch.allclose(s.add_noise(x0, n, s.timesteps[2]), (1 - sig) * x0 + sig * n)


def test_flow_sampler_names():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from multifusion.families import FluxHandle, SD3Handle

    flux = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    for family in (FluxHandle, SD3Handle):  # the family checks the step count: any, for the flow samplers
        for name in ("ddim", "euler", "flow_euler", "FlowMatchEulerDiscreteScheduler"):
            check_flow_sampler(name)
            family.check_steps(name, flux, 7)
        with pytest.raises(RecipeError, match="sampling.scheduler: 'dpm\\+\\+' has no flow-matching form"):
            family.check_steps("dpm++", flux, 7)
    with pytest.raises(RecipeError, match="samples flow-matching models"):
        make_scheduler("flow_euler", {"num_train_timesteps": 1000})
