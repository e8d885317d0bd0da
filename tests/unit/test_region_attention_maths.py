"""region-attention's maths on hand-made tensors: token shares, the mixing weights, the combine,
and the per-region processor calls against the papers' masked attention written out densely
(Regional Prompter's masked cross-attention; Chen et al.'s joint-attention mask)."""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.errors import IncompatibleModelsError
from multifusion.features.regional import (
    Layout,
    RegionalProcessor,
    Regions,
    TextProjections,
    combine,
    fused_cross,
    installed,
    mix_weights,
    project_text,
    text_attention,
    token_shares,
)


@st.composite
def boxes_on(draw, h: int, w: int, n_max: int = 4):
    out = []
    for _ in range(draw(st.integers(1, n_max))):
        r0 = draw(st.integers(0, h - 1))
        c0 = draw(st.integers(0, w - 1))
        out.append((r0, draw(st.integers(r0 + 1, h)), c0, draw(st.integers(c0 + 1, w))))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.data())
def test_token_shares_are_area_fractions_on_even_grids(a, b, halvings, data):
    """On a grid dividing the latent evenly, a region's shares times the cell area sum to its area,
    each share lies in [0, 1], and at the latent grid itself shares are the box's indicator."""
    s = 2**halvings
    h, w = a * 4 * s, b * 4 * s
    boxes = data.draw(boxes_on(h, w))
    shares = token_shares(boxes, (h, w), (h // s, w // s))
    assert shares.shape == (len(boxes), h // s, w // s)
    assert bool(((shares >= 0) & (shares <= 1)).all())
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        assert math.isclose(float(shares[k].sum()) * s * s, (r1 - r0) * (c1 - c0), rel_tol=1e-6)
    if s == 1:
        for k, (r0, r1, c0, c1) in enumerate(boxes):
            indicator = torch.zeros(h, w)
            indicator[r0:r1, c0:c1] = 1
            assert torch.equal(shares[k], indicator)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.one_of(st.none(), st.floats(0, 1)))
def test_mix_weights_normalise_covered_tokens_and_give_the_base_the_rest(data, ratio):
    boxes = data.draw(boxes_on(6, 6))
    shares = token_shares(boxes, (6, 6), (3, 3)).flatten(1)
    total = shares.sum(0)
    if ratio is None and bool((total <= 0).any()):
        with pytest.raises(ValueError, match="no region"):
            mix_weights(shares, ratio)
        return
    within, weight = mix_weights(shares, ratio)
    covered = total > 0
    torch.testing.assert_close(within.sum(0)[covered], torch.ones(int(covered.sum())))
    assert bool((within[:, ~covered] == 0).all())
    if ratio is None:
        assert torch.equal(weight, torch.ones(9))
    else:
        torch.testing.assert_close(weight, (1 - ratio) * total.clamp(max=1))
        assert bool((weight[~covered] == 0).all())  # uncovered: the base alone


def test_combine_by_hand_and_exact_where_regions_agree_with_the_base():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 3, generator=g)
    out0, out1 = torch.randn(2, 2, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    idx0, idx1 = torch.tensor([0, 1]), torch.tensor([1, 2, 3])
    within = torch.tensor([[1.0, 0.25, 0.0, 0.0], [0.0, 0.75, 1.0, 1.0]])
    weight = torch.tensor([0.8, 0.8, 0.4, 0.0])
    got = combine(base, [(idx0, out0), (idx1, out1)], within, weight)
    regional = torch.stack([out0[:, 0], 0.25 * out0[:, 1] + 0.75 * out1[:, 0], out1[:, 1], out1[:, 2]], dim=1)
    want = base + weight[None, :, None] * (regional - base)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, 3], base[:, 3])  # weight 0: the base, exactly
    # One region everywhere predicting what the base predicts: the base bit for bit, whatever the ratio.
    same = combine(base, [(torch.arange(4), base.clone())], torch.ones(1, 4), torch.full((4,), 0.7))
    assert torch.equal(same, base)


def test_layout_and_grids():
    lay = Layout((77, 77, 77), has_base=True)
    assert lay.total == 231 and lay.base == slice(0, 77) and lay.regions == [slice(77, 154), slice(154, 231)]
    assert Layout((5, 6), has_base=False).regions == [slice(0, 5), slice(5, 11)]
    r = Regions([(0, 5, 0, 3)], (5, 6), 0.2, lay)
    assert r.grid_of(30) == (5, 6) and r.grid_of(9) == (3, 3) and r.grid_of(4) == (2, 2)
    with pytest.raises(ValueError, match="no grid"):
        r.grid_of(7)


# --------------------------------------------------------------------------- against the papers' masks


def _attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(d) + mask) v with one head, (B, Q, D) x (B, K, D); `allowed` (Q, K) bool."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


REGIONS = [(0, 4, 0, 2), (0, 4, 2, 4)]  # two halves of a 4x4 latent, side by side


def _image_regions(n_side=4):
    """(N,) region index of each of the 16 tokens of a 4x4 grid, row-major (left half 0, right 1)."""
    cols = torch.arange(n_side).repeat(n_side)
    return (cols >= 2).long()


def test_cross_attention_equals_regional_prompters_masked_attention():
    """A UNet cross-attention layer (diffusers' own module and processor, one head): regional
    output = each token attends only its region's prompt tokens (a -inf mask on the joined
    prompts), blended with the base prompt's plain attention, base_ratio * base + (1 - r) * regional."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=1, dim_head=8).eval()
    x = torch.randn(2, 16, 8)
    texts = [torch.randn(2, n, 6) for n in (3, 4, 5)]  # base, region 0, region 1
    ratio = 0.3
    regions = Regions(REGIONS, (4, 4), ratio, Layout((3, 4, 5), True))
    with torch.no_grad():
        got = RegionalProcessor(attn.processor, "cross", regions)(attn, x, torch.cat(texts, dim=1))

        q, out = attn.to_q(x), lambda h: attn.to_out[0](h)
        base = out(_attention(q, attn.to_k(texts[0]), attn.to_v(texts[0])))
        joined = torch.cat(texts[1:], dim=1)
        owner = _image_regions()
        token_region = torch.cat([torch.zeros(4), torch.ones(5)]).long()
        allowed = owner[:, None] == token_region[None, :]  # (16, 9): a token sees its region's prompt only
        regional = out(_attention(q, attn.to_k(joined), attn.to_v(joined), allowed))
    torch.testing.assert_close(got, ratio * base + (1 - ratio) * regional, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_base", [True, False])
def test_fused_cross_attention_equals_one_call_per_region(with_base):
    """The shorter path for plain cross-attention layers (`fused_cross`) against the per-region
    calls (taken when the module's processor is another: AttnProcessor here), on overlapping
    regions of a coarse 3x3 level of a 6x6 latent (partial shares), two heads."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    torch.manual_seed(2)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, lengths = torch.randn(2, 9, 8), (5, 5, 5)
    text = torch.randn(2, 15, 6)
    boxes = [(0, 4, 0, 4), (2, 6, 1, 6)]
    layout = Layout(lengths if with_base else lengths[1:], with_base)
    text = text if with_base else text[:, 5:]
    regions = Regions(boxes if with_base else [(0, 6, 0, 3), (0, 6, 2, 6)], (6, 6), 0.3 if with_base else None, layout)
    with torch.no_grad():
        fused = RegionalProcessor(AttnProcessor2_0(), "cross", regions)(attn, x, text)
        apart = RegionalProcessor(AttnProcessor(), "cross", regions)(attn, x, text)
    torch.testing.assert_close(fused, apart, rtol=1e-5, atol=1e-6)


def test_joint_attention_equals_chen_et_al_mask():
    """A joint-attention layer (SD3's module and processor, one head): Chen et al.'s regional mask
    over [image; region 0 text; region 1 text] (image k <-> image k, text k <-> image k,
    text k <-> text k), and the base pass (image and base text, unmasked); image outputs blended
    by the base ratio, each text stream taken from its own pass."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    torch.manual_seed(1)
    attn = Attention(
        query_dim=8,
        cross_attention_dim=None,
        added_kv_proj_dim=8,
        dim_head=8,
        heads=1,
        out_dim=8,
        context_pre_only=False,
        processor=JointAttnProcessor2_0(),
    ).eval()
    x = torch.randn(2, 16, 8)
    lengths = (3, 4, 5)
    texts = [torch.randn(2, n, 8) for n in lengths]
    ratio = 0.25
    regions = Regions(REGIONS, (4, 4), ratio, Layout(lengths, True))
    with torch.no_grad():
        got_img, got_txt = RegionalProcessor(attn.processor, "joint", regions)(attn, x, torch.cat(texts, dim=1))

        def qkv(h, added):
            if added:
                return attn.add_q_proj(h), attn.add_k_proj(h), attn.add_v_proj(h)
            return attn.to_q(h), attn.to_k(h), attn.to_v(h)

        def joint(parts, allowed=None):
            qs, ks, vs = zip(*[qkv(h, added) for h, added in parts])
            return _attention(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1), allowed)

        base = joint([(x, False), (texts[0], True)])
        owner = _image_regions()
        seq = torch.cat([owner, torch.zeros(4).long(), torch.ones(5).long()])  # region of each row of [image; t0; t1]
        allowed = seq[:, None] == seq[None, :]
        regional = joint([(x, False), (texts[1], True), (texts[2], True)], allowed)
        want_img = attn.to_out[0](ratio * base[:, :16] + (1 - ratio) * regional[:, :16])
        want_txt = attn.to_add_out(torch.cat([base[:, 16:], regional[:, 16:]], dim=1))
    torch.testing.assert_close(got_img, want_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_txt, want_txt, rtol=1e-5, atol=1e-6)


def test_processors_are_restored_even_after_an_error():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    layers = text_attention(unet)
    assert layers and all(name.endswith("attn2") and kind == "cross" for name, (_, kind) in layers.items())
    before = dict(unet.attn_processors)
    regions = Regions([(0, 8, 0, 8)], (8, 8), None, Layout((3,), False))
    with pytest.raises(RuntimeError, match="inside"):
        with installed(layers, regions):
            assert all(isinstance(m.processor, RegionalProcessor) for m, _ in layers.values())
            raise RuntimeError("inside")
    assert unet.attn_processors == before


def test_a_denoiser_of_no_known_kind_is_refused_with_the_alternative():
    with pytest.raises(IncompatibleModelsError, match="use `mod`"):
        text_attention(torch.nn.Linear(2, 2))


def _cross(seed: int = 3):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()


def _counting(attn) -> list[int]:
    """How many times attn.to_k runs, counted by a forward hook."""
    calls = [0]
    attn.to_k.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


CACHE_STEPS = st.lists(st.sampled_from(["same", "copy", "other", "in_place", "replace", "grad"]), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(CACHE_STEPS)
def test_kept_text_projections_equal_fresh_ones_whatever_changes_between_calls(steps):
    """`TextProjections` across a run's calls: whatever happens between two calls (the same text
    tensor, an equal copy, other text, the key weights changed in place or replaced, gradients on),
    what it gives equals projecting afresh (`project_text`) bit for bit, and it projects again
    only when the text or the weights changed or gradients are recorded."""
    attn, layout = _cross(), Layout((5, 5, 5), True)
    calls = _counting(attn)
    cache, text = TextProjections(), torch.randn(2, 15, 6)
    with torch.no_grad():
        cache.get(attn, text, layout)
    for step in steps:
        before = calls[0]
        grad = step == "grad"
        with torch.set_grad_enabled(grad), torch.no_grad() if not grad else contextlib.nullcontext():
            if step == "copy":
                text = text.clone()
            elif step == "other":
                text = torch.randn(2, 15, 6)
            elif step == "in_place":
                with torch.no_grad():
                    attn.to_k.weight.mul_(1.5)
            elif step == "replace":
                attn.to_k.weight = torch.nn.Parameter(torch.randn_like(attn.to_k.weight))
            got = cache.get(attn, text, layout)
            want = project_text(attn, text, layout)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        projected = calls[0] - before - 1  # `want` projected once
        assert projected == (0 if step in ("same", "copy") else 1), step


def test_kept_text_projections_stay_within_their_memory_budget():
    """With room for one layer's projections, the first layer seen keeps them and the second
    projects at every call, both giving what projecting afresh gives."""
    layers, layout, text = [_cross(0), _cross(1)], Layout((5, 5, 5), True), torch.randn(2, 15, 6)
    calls = [_counting(attn) for attn in layers]
    with torch.no_grad():
        one = sum(t.numel() * t.element_size() for t in project_text(layers[0], text, layout) if t is not None)
        cache = TextProjections(max_bytes=one)
        for _ in range(3):
            for attn in layers:
                got, want = cache.get(attn, text, layout), project_text(attn, text, layout)
                assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert [c[0] for c in calls] == [1 + 1 + 3, 3 + 3]  # layer 0: the size probe, kept once, fresh x 3


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_kept_text_projections_follow_lora_adapters():
    """A peft LoRA on the projections (LoRA Switch, K-LoRA switch adapters between calls): the
    store never keeps them, so fused_cross follows each adapter as projecting afresh does."""
    from peft import LoraConfig, inject_adapter_in_model

    attn = _cross()
    for name in ("a", "b"):
        inject_adapter_in_model(
            LoraConfig(r=2, target_modules=["to_k", "to_v"], init_lora_weights=False), attn, adapter_name=name
        )
    layout = Layout((5, 5, 5), True)
    regions = Regions([(0, 4, 0, 2), (0, 4, 2, 4)], (4, 4), 0.3, layout)
    x, text, cache = torch.randn(2, 16, 8), torch.randn(2, 15, 6), TextProjections()
    outs = {}
    with torch.no_grad():
        for name in ("a", "b", "a"):
            for module in (attn.to_k, attn.to_v):
                module.set_adapter(name)
            got = fused_cross(attn, x, text, layout, regions, cache)
            assert torch.equal(got, fused_cross(attn, x, text, layout, regions, None))
            outs.setdefault(name, got)
    assert not torch.equal(outs["a"], outs["b"])  # the adapters differ, so a kept projection would show
