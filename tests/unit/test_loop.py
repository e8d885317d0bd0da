import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from hypothesis import given
from hypothesis import strategies as st

from multifusion.families.flowmatch import FlowMatchSampler, vp_alphas_cumprod
from multifusion.loop import Trajectory, initial_noise, sample
from multifusion.schedulers import alpha_bar_at, in_window, timestep_fraction


def _config():
    return dict(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)


def test_noise_per_image_does_not_depend_on_batch():
    batch = initial_noise((4, 3, 5), [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = initial_noise((4, 3, 5), [torch.Generator().manual_seed(8)])
    assert batch.shape == (3, 4, 3, 5) and torch.equal(batch[1:2], alone)


def test_timestep_fraction_runs_from_noise_to_clean():
    assert timestep_fraction(999, 1000) == 0.0 and timestep_fraction(0, 1000) == 1.0


def _toy_eps(x, t, record=None):
    # A deterministic, state-free stand-in for a denoiser.
    return 0.1 * x + 0.001 * float(t)


def _ddim():
    return DDIMScheduler.from_config(_config())


def _dpm():
    return DPMSolverMultistepScheduler.from_config(_config())


def test_trajectories_have_their_own_scheduler_state():
    """Two identical trajectories through a multistep scheduler must each equal one alone:
    a shared scheduler would mix their histories."""
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    [one] = sample([Trajectory(_toy_eps, _dpm(), noise)], num_inference_steps=6, progress=False)
    two = sample(
        [Trajectory(_toy_eps, _dpm(), noise), Trajectory(_toy_eps, _dpm(), noise)], num_inference_steps=6, progress=False
    )
    assert torch.equal(two[0], one) and torch.equal(two[1], one)


def test_one_scheduler_object_cannot_serve_two_trajectories():
    noise, shared = torch.zeros(1, 4, 2, 2), _dpm()
    with pytest.raises(ValueError, match="shares its scheduler"):
        sample([Trajectory(_toy_eps, shared, noise), Trajectory(_toy_eps, shared, noise)], num_inference_steps=2)


def test_meet_and_callback_see_every_step():
    seen, met = [], []

    def meet(step):
        met.append(step.step)
        assert step.t_next[0] == (step.schedulers[0].timesteps[step.step + 1] if step.step < 3 else None)
        mean = (step.latents[0] + step.latents[1]) / 2
        return [mean, mean]

    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    out = sample(
        [Trajectory(_toy_eps, _ddim(), noise), Trajectory(_toy_eps, _ddim(), -noise)],
        num_inference_steps=4,
        meet=meet,
        callback=lambda info: seen.append((info.step, len(info.latents))),
        progress=False,
    )
    assert met == [0, 1, 2, 3] and seen == [(0, 2), (1, 2), (2, 2), (3, 2)]
    assert torch.equal(out[0], out[1])


def test_step_x0_is_the_ddim_prediction():
    """Step.x0 from the model input and eps equals DDIM's own pred_original_sample (unclipped)."""
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    got = []

    def meet(step):
        s = DDIMScheduler.from_config(_config(), clip_sample=False)
        s.set_timesteps(5)
        x = step.model_input[0]
        ref = s.step(step.eps[0], step.t[0], x).pred_original_sample
        got.append(torch.allclose(step.x0(0), ref, atol=1e-5))
        return step.latents

    sample([Trajectory(_toy_eps, _ddim(), noise)], num_inference_steps=5, meet=meet, progress=False)
    assert got == [True] * 5


def _positions_seen(scheduler, steps=5):
    seen = []

    def meet(step):
        seen.append((step.fraction[0], step.sigma[0], step.t[0]))
        return step.latents

    sample([Trajectory(_toy_eps, scheduler, torch.zeros(1, 4, 2, 2))], num_inference_steps=steps, meet=meet, progress=False)
    return seen


@pytest.mark.parametrize("scheduler", [_ddim, _dpm, lambda: EulerDiscreteScheduler.from_config(_config())])
def test_step_carries_the_fraction_and_noise_level_of_its_timestep(scheduler):
    """Step.fraction is what a method computed from t and its model's table; Step.sigma the
    noise level of alpha_bar(t) (Euler's timesteps are fractional: interpolated)."""
    acp = _ddim().alphas_cumprod
    seen = _positions_seen(scheduler())
    for fraction, sigma, t in seen:
        a = alpha_bar_at(acp, t)
        assert fraction == timestep_fraction(t, len(acp)) and sigma == float(((1 - a) / a).sqrt())
    assert [f for f, _, _ in seen] == sorted(f for f, _, _ in seen) and [s for _, s, _ in seen] == sorted(
        (s for _, s, _ in seen), reverse=True
    )


def test_a_flow_step_carries_its_exact_sigma():
    """Flow matching: the fraction on the flow axis t = 0..N as a flow handle's table counts it,
    the noise level s / (1 - s) of the scheduler's own sigma (inf at the first step, pure noise)."""
    s = FlowMatchSampler({"num_train_timesteps": 1000, "shift": 3.0})
    seen = _positions_seen(s, steps=4)
    assert seen[0][1] == float("inf") and seen[0][0] == 0.0
    for i, (fraction, sigma, t) in enumerate(seen):
        assert fraction == timestep_fraction(t, len(vp_alphas_cumprod(1000)))
        if i:
            assert sigma == float(s.sigmas[i]) / (1 - float(s.sigmas[i]))


def test_a_scheduler_that_cannot_place_its_timesteps_is_refused():
    class NoSchedule:
        timesteps = torch.tensor([999, 0])

        def set_timesteps(self, n, device=None):
            pass

    with pytest.raises(ValueError, match="NoSchedule has neither alphas_cumprod"):
        sample([Trajectory(_toy_eps, NoSchedule(), torch.zeros(1, 4, 2, 2))], num_inference_steps=2, progress=False)


def test_meet_can_stop_a_trajectory():
    calls = []

    def counted(x, t, record=None):
        calls.append(float(t))
        return _toy_eps(x, t)

    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    out = sample(
        [Trajectory(_toy_eps, _ddim(), noise), Trajectory(counted, _ddim(), noise)],
        num_inference_steps=5,
        meet=lambda step: [step.latents[0], None if step.step >= 1 else step.latents[1]],
        progress=False,
    )
    assert out[1] is None and len(calls) == 2  # evaluated at steps 0 and 1 only
    [alone] = sample([Trajectory(_toy_eps, _ddim(), noise)], num_inference_steps=5, progress=False)
    assert torch.equal(out[0], alone)


def test_trajectories_need_a_scheduler_and_noise():
    with pytest.raises(ValueError, match="trajectory 0 has no initial noise"):
        sample([Trajectory(_toy_eps, _ddim())], num_inference_steps=2)
    with pytest.raises(ValueError, match="at least one trajectory"):
        sample([], num_inference_steps=2)


@given(st.floats(0.0, 1.0, exclude_max=True), st.floats(0.0, 1.0))
def test_a_window_and_its_complement_never_both_hold(edge, fraction):
    assert in_window(fraction, (0.0, edge)) != in_window(fraction, (edge, 1.0))
    assert in_window(1.0, (edge, 1.0)) and in_window(0.0, (0.0, 1.0))


def test_vae_encode_and_decode_build_no_autograd_graph(tiny_a):
    """Decoding a large canvas must not keep activations for a backward pass."""
    from multifusion.loading import load_models
    from multifusion.vae import decode, encode

    [h] = load_models([tiny_a])
    h.vae.requires_grad_(True)  # as a VAE handed in by a training script would be
    latents = encode(h.vae, torch.zeros(1, 3, 32, 32))
    images = decode(h.vae, latents)
    assert not latents.requires_grad and not images.requires_grad and latents.grad_fn is None and images.grad_fn is None
