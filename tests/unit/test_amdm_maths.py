import math

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.latents.amdm import (
    aggregate,
    amdm_update,
    manifold_correct,
    posterior_mean,
    slerp_aggregate,
    vp_weights,
)

unit = st.floats(0.0, 1.0)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _bits(x):
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _per_image_norm(x):
    return x.flatten(1).norm(dim=1)


def _sd_ddim():
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# ---- weights ----------------------------------------------------------------------------------


@given(unit, st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_vp_weights_from_one_float_preserve_variance(w, n):
    c = vp_weights(w, n)
    assert len(c) == n and all(0.0 <= ck <= 1.0 for ck in c)
    assert math.isclose(sum(ck * ck for ck in c), 1.0, abs_tol=1e-12)
    if n > 1:
        assert c[0] == w and max(c[1:]) - min(c[1:]) < 1e-12  # the others share the rest equally


@given(st.lists(unit, min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_vp_weights_from_levels_nest(levels):
    c = vp_weights(levels, len(levels) + 1)
    assert math.isclose(sum(ck * ck for ck in c), 1.0, abs_tol=1e-12)
    assert c[0] == levels[0]


def test_vp_weights_degenerate_and_paper_cases():
    assert vp_weights(0.3, 1) == [1.0] and vp_weights([], 1) == [1.0]
    assert vp_weights(0.5, 2) == [0.5, math.sqrt(0.75)]
    assert vp_weights(1.0, 4) == [1.0, 0.0, 0.0, 0.0]
    assert vp_weights(0.0, 2) == [0.0, 1.0]


@pytest.mark.parametrize(("w1", "w2", "authors_sum"), [(0.3, 0.3, 0.9181), (0.47, 0.5, 0.834325)])
def test_authors_three_model_weights_lose_variance_and_ours_do_not(w1, w2, authors_sum):
    # interactmigcip.py mixes w1 w2 x_interact + sqrt(1-w1^2) w2 x_migc + sqrt(1-w1^2) sqrt(1-w2^2) x_ip
    # (function defaults 0.3, 0.3; UI defaults 0.47, 0.5).
    authors = [w1 * w2, math.sqrt(1 - w1**2) * w2, math.sqrt(1 - w1**2) * math.sqrt(1 - w2**2)]
    assert math.isclose(sum(c * c for c in authors), 1 - w1**2 * (1 - w2**2), rel_tol=1e-12)
    assert math.isclose(sum(c * c for c in authors), authors_sum, rel_tol=1e-9)
    ours = vp_weights([w1, w2], 3)
    assert math.isclose(sum(c * c for c in ours), 1.0, rel_tol=1e-12)
    # Theirs is the nested form with an extra factor w2 on the specified model.
    assert ours[1:] == pytest.approx(authors[1:], rel=1e-12) and ours[0] * w2 == pytest.approx(authors[0])
    x = _randn(3, 4, 4, 64, 64, seed=1)
    assert aggregate(x, authors).std().item() == pytest.approx(math.sqrt(authors_sum), abs=0.01)
    assert aggregate(x, ours).std().item() == pytest.approx(1.0, abs=0.01)


# ---- exact degenerate cases ---------------------------------------------------------------------


@pytest.mark.parametrize("combine", [aggregate, slerp_aggregate])
def test_all_weight_on_the_specified_model_returns_its_latent_bit_for_bit(combine):
    xs = _randn(3, 2, 4, 8, 8, seed=2)
    xs[0, 0, 0, 0, 0] = -0.0
    xs[1, 0, 0, 0, 0] = float("nan")  # a latent of weight 0 is not read
    m = combine(xs, vp_weights(1.0, 3))
    assert torch.equal(_bits(m), _bits(xs[0])) and m.data_ptr() != xs[0].data_ptr()


def test_eta_zero_returns_the_mixture_bit_for_bit():
    m, mu = _randn(2, 4, 8, 8, seed=3), _randn(2, 4, 8, 8, seed=4)
    for relative in (False, True):
        assert torch.equal(_bits(manifold_correct(m, mu, 0.0, relative=relative)), _bits(m))
    assert torch.equal(manifold_correct(m, mu, 1.0, relative=True), mu)


@pytest.mark.parametrize("slerp", [False, True])
def test_w_one_keeps_the_specified_trajectory_whatever_eta(slerp):
    # Deterministic steps: mu_k = x'_k. With w = 1, m = x'_spec = mu_spec, so its correction is
    # the m == mu guard and the specified model continues from its own step exactly.
    stepped = [_randn(2, 4, 8, 8, seed=s) for s in (5, 6)]
    out = amdm_update(stepped, stepped, vp_weights(1.0, 2), [55.0, 45.0], slerp=slerp)
    assert torch.equal(_bits(out[0]), _bits(stepped[0]))
    assert torch.allclose(_per_image_norm(out[1] - stepped[0]), torch.full((2,), 45.0))


def test_m_equal_to_mu_is_left_alone_without_nan():
    m = _randn(2, 4, 8, 8, seed=7)
    mu = m.clone()
    mu[1] += 1.0
    x = manifold_correct(m, mu, 3.0)
    assert not x.isnan().any()
    assert torch.equal(_bits(x[0]), _bits(m[0]))
    assert _per_image_norm(x - m)[1].item() == pytest.approx(3.0, rel=1e-5)


# ---- statistics ---------------------------------------------------------------------------------


@given(st.integers(1, 4), unit, st.lists(unit, min_size=3, max_size=3), st.booleans(), st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None, derandomize=True)
def test_aggregate_of_independent_unit_gaussians_keeps_unit_variance(n, w, levels, use_levels, seed):
    # 4 images x 4 x 128 x 128 = 262,144 values: the sample variance has std sqrt(2 / 262144) =
    # 0.0028 and the mean 0.002, so the tolerances below are ten standard errors; the examples
    # are derandomized and every draw is seeded, so the test is deterministic as well.
    c = vp_weights(levels[: n - 1], n) if use_levels else vp_weights(w, n)
    xs = _randn(n, 4, 4, 128, 128, seed=seed)
    for combine in (aggregate, slerp_aggregate):
        m = combine(xs, c)
        assert m.shape == (4, 4, 128, 128)
        assert abs(m.var().item() - 1.0) < 0.03 and abs(m.mean().item()) < 0.02


def test_slerp_is_the_linear_form_on_orthogonal_latents_of_equal_norm():
    # Disjoint supports: exactly orthogonal, and scaled to one norm per image.
    xs = torch.zeros(3, 2, 4, 6, 6, dtype=torch.float64)
    for k in range(3):
        xs[k, :, k] = _randn(2, 6, 6, seed=10 + k, dtype=torch.float64)
    xs = xs / xs.flatten(2).norm(dim=2)[..., None, None, None]
    for c in (vp_weights(0.5, 2), vp_weights(0.3, 2)):
        assert torch.allclose(slerp_aggregate(xs[:2], c), aggregate(xs[:2], c), atol=1e-12)
    c = vp_weights([0.4, 0.7], 3)
    assert torch.allclose(slerp_aggregate(xs, c), aggregate(xs, c), atol=1e-12)


def test_slerp_keeps_the_norm_of_correlated_latents_and_linear_does_not():
    a = _randn(2, 4, 8, 8, seed=11, dtype=torch.float64)
    b = 0.8 * a + 0.6 * _randn(2, 4, 8, 8, seed=12, dtype=torch.float64)
    b = b * (_per_image_norm(a) / _per_image_norm(b)).view(-1, 1, 1, 1)
    c = vp_weights(0.5, 2)
    assert torch.allclose(_per_image_norm(slerp_aggregate([a, b], c)), _per_image_norm(a), rtol=1e-10)
    assert (_per_image_norm(aggregate([a, b], c)) > 1.2 * _per_image_norm(a)).all()
    # Identical latents: slerp returns them (up to rounding), the linear form scales them by sum c.
    assert torch.allclose(slerp_aggregate([a, a], c), a, atol=1e-12)


# ---- the correction -----------------------------------------------------------------------------


def _three_scales(seed):
    """m and mu (3, 4, 8, 8) in float64, image i scaled by 0.1, 1 and 30."""
    scales = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64).view(-1, 1, 1, 1)
    return [_randn(3, 4, 8, 8, seed=seed + k, dtype=torch.float64) * scales for k in (0, 1)]


@given(st.floats(0.0, 0.9), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_correction_moves_exactly_eta_toward_mu_per_image(frac, seed):
    m, mu = _three_scales(seed)
    dist = _per_image_norm(m - mu)
    eta = frac * dist.min().item()  # short of mu for every image
    x = manifold_correct(m, mu, eta)
    assert torch.allclose(_per_image_norm(x - m), torch.full((3,), eta, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(_per_image_norm(x - mu), dist - eta, atol=1e-9)  # on the segment m -> mu


@given(st.floats(0.0, 1.0), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_relative_correction_moves_the_stated_fraction(frac, seed):
    m, mu = _three_scales(seed)
    dist = _per_image_norm(m - mu)
    x = manifold_correct(m, mu, frac, relative=True)
    assert torch.allclose(_per_image_norm(x - m), frac * dist, rtol=1e-9, atol=1e-12)
    assert torch.allclose(_per_image_norm(x - mu), (1 - frac) * dist, rtol=1e-9, atol=1e-12)


def test_a_step_longer_than_the_distance_passes_mu():
    m, mu = torch.zeros(1, 1, 1, 2), torch.tensor([[[[3.0, 4.0]]]])
    assert torch.allclose(manifold_correct(m, mu, 7.0), torch.tensor([[[[4.2, 5.6]]]]))


def test_the_norm_is_per_image_so_batch_companions_do_not_matter():
    m, mu = _randn(3, 4, 8, 8, seed=20), _randn(3, 4, 8, 8, seed=21)
    m[2] *= 100.0
    together = manifold_correct(m, mu, 2.0)
    for i in range(3):
        assert torch.allclose(together[i : i + 1], manifold_correct(m[i : i + 1], mu[i : i + 1], 2.0))


# ---- posterior mean -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 50])
def test_posterior_mean_is_the_ddim_step_and_at_eta_one_the_ddpm_mean(steps):
    sched = _sd_ddim()
    sched.set_timesteps(steps)
    t, t_next = sched.timesteps[1], sched.timesteps[2]
    a_t, a_next = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t_next].item()
    x_t, eps = _randn(2, 4, 16, 16, seed=30), _randn(2, 4, 16, 16, seed=31)
    # eta = 0: the step itself, so under DDIM mu_k = x'_k.
    stepped = sched.step(eps, t, x_t, eta=0.0).prev_sample
    assert torch.allclose(posterior_mean(x_t, eps, a_t, a_next), stepped, atol=1e-5)
    # eta = 1 without its noise: DDPM's posterior mean with the stride's alpha.
    mean = sched.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    alpha = a_t / a_next
    ddpm = (x_t - (1 - alpha) / math.sqrt(1 - a_t) * eps) / math.sqrt(alpha)
    ours = posterior_mean(x_t, eps, a_t, a_next, ddim_eta=1.0)
    assert torch.allclose(ours, mean, atol=1e-5) and torch.allclose(ours, ddpm, atol=1e-5)


# ---- agreement with the authors' two-model formula ---------------------------------------------


def _authors_pair(x_spec, x_other, mu_spec, mu_other, omega, p_spec, p_other):
    """The authors' aggregation and correction of two models as read in their code (written
    here from that reading): one mixture, then for each model a step of length p toward its
    mu, normalised by the norm of the whole tensor (batch included)."""
    mixed = omega * x_spec + math.sqrt(1.0 - omega * omega) * x_other
    pairs = ((mu_spec, p_spec), (mu_other, p_other))
    return [mixed - p * (mixed - mu) / torch.linalg.vector_norm(mixed - mu) for mu, p in pairs]


def _ddim_pair(batch, steps=10, i=1):
    """Two models' x_t, eps and DDIM step at loop index i of an SD schedule, 4x64x64 latents."""
    sched = _sd_ddim()
    sched.set_timesteps(steps)
    t, t_next = sched.timesteps[i], sched.timesteps[i + 1]
    a_t, a_next = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t_next].item()
    xs = [_randn(batch, 4, 64, 64, seed=40 + k) for k in range(2)]
    eps = [_randn(batch, 4, 64, 64, seed=50 + k) for k in range(2)]
    stepped = [sched.step(e, t, x, eta=0.0).prev_sample for x, e in zip(xs, eps)]
    means = [posterior_mean(x, e, a_t, a_next) for x, e in zip(xs, eps)]
    return stepped, means


@pytest.mark.parametrize("omega", [0.5, 0.45])
def test_ours_matches_the_authors_pair_under_ddim_for_one_image(omega):
    stepped, means = _ddim_pair(batch=1)
    theirs = _authors_pair(*stepped, *stepped, omega, 55.0, 45.0)
    for mu in (stepped, means):  # mu_k = x'_k, or the same mean from posterior_mean
        ours = amdm_update(stepped, mu, vp_weights(omega, 2), [55.0, 45.0])
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-4)
    # The relative form with the equivalent fractions lands on the same points.
    m = aggregate(stepped, vp_weights(omega, 2))
    fracs = [55.0 / _per_image_norm(m - stepped[0]).item(), 45.0 / _per_image_norm(m - stepped[1]).item()]
    for a, b in zip(amdm_update(stepped, stepped, vp_weights(omega, 2), fracs, relative=True), theirs):
        assert torch.allclose(a, b, atol=1e-4)


def test_over_a_batch_the_authors_norm_differs_from_ours():
    stepped, _ = _ddim_pair(batch=2)
    stepped = [x * torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1) for x in stepped]
    theirs = _authors_pair(*stepped, *stepped, 0.5, 55.0, 45.0)
    ours = amdm_update(stepped, stepped, vp_weights(0.5, 2), [55.0, 45.0])
    m = aggregate(stepped, vp_weights(0.5, 2))
    assert torch.allclose(_per_image_norm(ours[0] - m), torch.full((2,), 55.0))
    moved = _per_image_norm(theirs[0] - m)
    assert moved.sum() < 55.0 * 1.5 and moved[1] > 2.5 * moved[0]  # shared, and unevenly


# ---- bad input ----------------------------------------------------------------------------------

_x = torch.zeros(1, 4, 8, 8)
_y = torch.ones(1, 4, 8, 8)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: vp_weights(1.5, 2), "w"),
        (lambda: vp_weights(-0.1, 2), "w"),
        (lambda: vp_weights([0.5, float("nan")], 3), "w"),
        (lambda: vp_weights([0.5], 3), "w"),
        (lambda: vp_weights(0.5, 0), "n"),
        (lambda: aggregate([_x, _y], [0.5]), "weights"),
        (lambda: aggregate([_x, _y], [0.5, 1.2]), "weights"),
        (lambda: aggregate([_x, _y], [-0.5, 0.5]), "weights"),
        (lambda: aggregate([_x, _y], [0.0, 0.0]), "weights"),
        (lambda: aggregate([_x, torch.zeros(1, 4, 8, 9)], [0.5, 0.5]), "latents"),
        (lambda: aggregate([], []), "latents"),
        (lambda: slerp_aggregate([_x, _y], [0.5, 0.5]), "weights"),
        (lambda: slerp_aggregate([_x, _y], [0.5]), "weights"),
        (lambda: manifold_correct(_x, _y, -1.0), "eta"),
        (lambda: manifold_correct(_x, _y, float("nan")), "eta"),
        (lambda: manifold_correct(_x, _y, float("inf")), "eta"),
        (lambda: manifold_correct(_x, _y, 1.5, relative=True), "eta"),
        (lambda: manifold_correct(_x, torch.zeros(2, 4, 8, 8), 1.0), "mu"),
        (lambda: posterior_mean(_x, torch.zeros(1, 4, 8, 9), 0.5, 0.6), "eps"),
        (lambda: posterior_mean(_x, _y, 1.0, 1.0), "alpha_bar_t"),
        (lambda: posterior_mean(_x, _y, 0.5, 0.4), "alpha_bar_next"),
        (lambda: posterior_mean(_x, _y, 0.5, 0.6, ddim_eta=1.5), "ddim_eta"),
        (lambda: amdm_update([_x, _y], [_x], [0.5, 0.5], 1.0), "mu"),
        (lambda: amdm_update([_x, _y], [_x, _y], vp_weights(0.5, 2), [1.0]), "eta"),
        (lambda: amdm_update([_x, _y], [_x, _y], vp_weights(0.5, 2), [1.0, -1.0]), "eta"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"(^|[^\w']){name}\b"):
        call()


def test_amdm_update_shapes():
    stepped = _randn(3, 2, 4, 8, 8, seed=60)
    out = amdm_update(stepped, stepped, vp_weights(0.5, 3), 0.3, relative=True)
    assert len(out) == 3 and all(x.shape == (2, 4, 8, 8) for x in out)
