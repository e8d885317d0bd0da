import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.families.sd import v_to_eps
from multifusion.handles import Conditioning, GuidedPrediction, Offloader
from multifusion.schedulers import alpha_bar_at


def _schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@given(st.floats(0.001, 0.999), st.integers(0, 10_000))
@settings(max_examples=50, deadline=None)
def test_v_to_eps_inverts_the_v_parameterisation(a, seed):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a = torch.tensor(a)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(v_to_eps(v, x_t, a), eps, atol=1e-5)


def test_alpha_bar_exact_on_integers_and_between_neighbours_otherwise():
    ac = _schedule()
    t = torch.tensor([0, 10, 999])
    assert torch.equal(alpha_bar_at(ac, t), ac[t])
    mid = alpha_bar_at(ac, torch.tensor(10.5))
    assert ac[11] < mid < ac[10]


def test_offloader_keeps_one_module_on_the_device():
    moves = []
    off = Offloader("cuda", move=lambda m, d: moves.append((m, str(d))))
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    off.activate(a)
    off.activate(a)  # already there: no move
    off.activate(b)
    assert moves == [(a, "cuda"), (a, "cpu"), (b, "cuda")]
    assert off.active is b


def test_guidance_response_is_scale_times_difference():
    u, c = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    p = GuidedPrediction(u + 3 * (c - u), u, c, 3.0)
    assert torch.equal(p.response, torch.full_like(c, 3.0))
    with pytest.raises(ValueError, match="need_uncond"):
        _ = GuidedPrediction(c, None, c, 1.0).response


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4))
@settings(max_examples=30, deadline=None)
def test_conditionings_concatenate_and_slice_back_along_the_batch(sizes):
    parts = [Conditioning(torch.randn(b, 3, 5), {"pooled": torch.randn(b, 7)}) for b in sizes]
    whole = Conditioning.cat(parts)
    assert len(whole) == sum(sizes)
    start = 0
    for p in parts:
        back = whole[start : start + len(p)]
        assert torch.equal(back.embeds, p.embeds) and torch.equal(back.extra["pooled"], p.extra["pooled"])
        start += len(p)


def test_conditioning_refuses_mismatched_batches_and_extras():
    with pytest.raises(ValueError, match="'pooled' has batch 3"):
        Conditioning(torch.zeros(2, 3, 5), {"pooled": torch.zeros(3, 7)})
    with pytest.raises(ValueError, match="different extras"):
        Conditioning.cat([Conditioning(torch.zeros(1, 3, 5)), Conditioning(torch.zeros(1, 3, 5), {"pooled": torch.zeros(1, 7)})])
