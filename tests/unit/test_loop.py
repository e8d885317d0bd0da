import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from multifusion.loop import initial_noise, sample, timestep_fraction


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


def test_trajectories_have_their_own_scheduler_state():
    """Two identical trajectories through a multistep scheduler must each equal one alone:
    a shared scheduler would mix their histories."""
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    one = sample(_toy_eps, DPMSolverMultistepScheduler.from_config(_config()), noise, num_inference_steps=6, progress=False)
    two = sample([_toy_eps, _toy_eps], DPMSolverMultistepScheduler.from_config(_config()), [noise, noise], num_inference_steps=6, progress=False)
    assert torch.equal(two[0], one) and torch.equal(two[1], one)


def test_meet_and_callback_see_every_step():
    seen, met = [], []

    def meet(xs, t, i, schedulers):
        met.append(i)
        mean = (xs[0] + xs[1]) / 2
        return [mean, mean]

    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    out = sample([_toy_eps, _toy_eps], DDIMScheduler.from_config(_config()), [noise, -noise], num_inference_steps=4,
                 meet=meet, callback=lambda info: seen.append((info.step, len(info.latents))), progress=False)
    assert met == [0, 1, 2, 3] and seen == [(0, 2), (1, 2), (2, 2), (3, 2)]
    assert torch.equal(out[0], out[1])


def test_mismatched_trajectories():
    with pytest.raises(ValueError, match="2 denoisers but 1"):
        sample([_toy_eps, _toy_eps], DDIMScheduler.from_config(_config()), [torch.zeros(1, 4, 2, 2)], num_inference_steps=2)


@given(st.floats(0.0, 1.0, exclude_max=True), st.floats(0.0, 1.0))
def test_a_window_and_its_complement_never_both_hold(edge, fraction):
    from multifusion.loop import in_window

    assert in_window(fraction, (0.0, edge)) != in_window(fraction, (edge, 1.0))
    assert in_window(1.0, (edge, 1.0)) and in_window(0.0, (0.0, 1.0))


def test_vae_encode_and_decode_build_no_autograd_graph(tiny_a):
    """Decoding a large canvas must not keep activations for a backward pass."""
    from multifusion.loading import load_models
    from multifusion.loop import decode, encode

    [h] = load_models([tiny_a])
    h.vae.requires_grad_(True)  # as a VAE handed in by a training script would be
    latents = encode(h.vae, torch.zeros(1, 3, 32, 32))
    images = decode(h.vae, latents)
    assert not latents.requires_grad and not images.requires_grad and latents.grad_fn is None and images.grad_fn is None
