"""AFA's aggregation maths on hand-made tensors: stacking, per-pixel softmax weights, the convex
combination, zero initialisation, the aggregation points and parameter counts of UNet
configurations (built on the meta device: no weights), the aggregators' lean forward against
the diffusers modules' own, and their layer count."""

import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion.features.afa import SABW, AFAAggregators, convex_combination, model_weights, stack_models
from multifusion.features.train import AFATrainConfig, AFATrainError, saved_settings
from multifusion.features.walkers import aggregation_channels, default_width, parameter_count
from multifusion.memory import SD15_UNET as SD15


def test_stack_models_is_model_major_on_channels():
    f = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).view(2, 1, 3, 2, 2)  # (N, B, C, H, W)
    s = stack_models(f)
    assert s.shape == (1, 6, 2, 2)
    assert torch.equal(s[0, :3], f[0, 0]) and torch.equal(s[0, 3:], f[1, 0])


def test_model_weights_are_the_softmax_over_models_by_hand():
    """exp(l_n) / sum_m exp(l_m) per pixel: logits (ln 3, 0) weigh the models 3/4 and 1/4, and
    (0, ln 2, ln 5) 1/8, 2/8, 5/8; the larger logit takes the larger weight."""
    logits = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    torch.testing.assert_close(model_weights(logits).flatten(), torch.tensor([0.75, 0.25], dtype=torch.float64))
    three = torch.tensor([[0.0, math.log(2.0), math.log(5.0)], [math.log(5.0), 0.0, math.log(2.0)]], dtype=torch.float64)
    three = three.T.reshape(1, 3, 1, 2)  # two pixels side by side, the models' logits in another order
    torch.testing.assert_close(model_weights(three)[0, :, 0].T, torch.tensor([[1, 2, 5], [5, 1, 2]], dtype=torch.float64) / 8)


def test_convex_combination_by_hand():
    f = torch.stack([torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2) * 4])  # (2, 1, 1, 1, 2)
    w = torch.tensor([[[[0.25, 1.0]], [[0.75, 0.0]]]])  # (1, 2, 1, 2)
    assert torch.equal(convex_combination(f, w), torch.tensor([[[[3.0, 0.0]]]]))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.0, 30.0),
)
def test_every_aggregation_is_a_convex_combination_per_pixel(n, b, c, h, w, seed, scale):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, b, c, h, w, generator=g, dtype=torch.float64)
    weights = model_weights(torch.randn(b, n, h, w, generator=g, dtype=torch.float64) * scale)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(b, h, w, dtype=torch.float64))
    out = convex_combination(features, weights)
    assert out.shape == (b, c, h, w)
    tol = 1e-12
    assert (out >= features.min(0).values - tol).all() and (out <= features.max(0).values + tol).all()
    manual = sum(weights[:, k, None] * features[k] for k in range(n))
    assert torch.allclose(out, manual)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_copies_of_one_feature_aggregate_to_it_exactly(n):
    f = torch.randn(1, 2, 3, 5, 5)
    assert torch.equal(convex_combination(f.expand(n, -1, -1, -1, -1), model_weights(torch.zeros(2, n, 5, 5))), f[0])


def test_zero_initialised_aggregator_averages():
    torch.manual_seed(0)
    agg = SABW(channels=4, n_models=3, width=8, heads=1, temb_channels=16, cross_attention_dim=6, norm_groups=4)
    assert torch.count_nonzero(agg.conv_out.weight) == 0 and agg.conv_out.bias is None
    logits = agg(torch.randn(3, 2, 4, 5, 5), torch.randn(2, 16), torch.randn(2, 7, 6))
    assert torch.equal(logits, torch.zeros(2, 3, 5, 5))
    assert torch.allclose(model_weights(logits), torch.full((2, 3, 5, 5), 1 / 3))


def test_aggregators_refuse_one_model_and_bad_widths():
    with pytest.raises(ValueError, match="at least 2"):
        AFAAggregators([4], n_models=1, width=8, heads=1, norm_groups=4)
    with pytest.raises(ValueError, match="multiple"):
        AFAAggregators([4], n_models=2, width=10, heads=4, norm_groups=5)


def _meta_unet(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sd15_has_25_aggregation_points_and_the_output_last():
    ch = aggregation_channels(_meta_unet(**SD15))
    assert len(ch) == 1 + 11 + 1 + 11 + 1
    assert ch[0] == 320 and ch[12] == 1280 and ch[-1] == 4


@pytest.mark.parametrize("levels,layers", [(2, 1), (3, 1), (4, 1), (3, 2), (4, 2)])
def test_aggregation_points_for_2_3_4_levels(levels, layers):
    cfg = dict(
        block_out_channels=(8, 16, 16, 16)[:levels],
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=layers,
        norm_num_groups=4,
        cross_attention_dim=8,
    )
    ch = aggregation_channels(_meta_unet(**cfg))
    # conv_in + down (layers per level + a downsampler except the last) + mid + up (layers + 1 per level, the last
    # one meeting after the output head, which is the final point)
    assert len(ch) == 1 + (levels * layers + levels - 1) + 1 + levels * (layers + 1)


def test_parameter_counts_from_config_alone():
    """Regression pin: these are the numbers the code gave when docs/afa.md was written (SD-1.5's
    UNet count is the published one). The aggregator count is checked against the architecture's
    formula in `test_aggregator_parameter_count_follows_the_architecture`."""
    agg, unet = parameter_count(SD15, 2, 128)
    assert unet == 859_520_964  # SD-1.5's UNet
    assert agg == 30_082_944  # 3.5 % of it at the paper's d = 128 (docs/afa.md)
    assert default_width(SD15, 2) == 128


def sabw_parameters(c: int, n: int, d: int, t: int, x: int, layers: int = 1) -> int:
    """Parameters of one SABW point, counted by hand from the architecture in features/afa.py
    (diffusers' ResnetBlock2D and Transformer2DModel at their defaults), for feature width c,
    n models, width d, time-embedding width t and text width x:

      conv_in 1x1 (n c -> d, bias)                           n c d + d
      ResnetBlock2D d -> d: norm1 2d, conv1 3x3 9d^2 + d, time_emb_proj t d + d,
                            norm2 2d, conv2 3x3 9d^2 + d (no shortcut: in = out)   18 d^2 + t d + 7 d
      Transformer2DModel, one block (inner width = heads x head dim = d):
        norm 2d, proj_in 1x1 d^2 + d, proj_out 1x1 d^2 + d                        2 d^2 + 4 d
        norm1, norm2, norm3 (LayerNorm) 6d
        attn1: q, k, v d^2 each (no bias), out d^2 + d                              4 d^2 + d
        attn2: q d^2, k and v x d each, out d^2 + d                                 2 d^2 + 2 x d + d
        feed-forward GEGLU: d -> 2 (4 d) with bias, then 4 d -> d with bias        12 d^2 + 9 d
      conv_out 1x1 (d -> n, no bias)                         n d

    in all 38 d^2 + (n c + n + t + 2 x + 29) d for one transformer layer; each further layer
    (norm1-3, attn1, attn2, feed-forward) adds 18 d^2 + (2 x + 17) d. Heads and groups do not
    change the count."""
    resnet = 18 * d * d + t * d + 7 * d
    block = 6 * d + (4 * d * d + d) + (2 * d * d + 2 * x * d + d) + (12 * d * d + 9 * d)
    transformer = (2 * d * d + 4 * d) + layers * block
    return (n * c * d + d) + resnet + transformer + n * d


def test_aggregator_parameter_count_follows_the_architecture():
    # SD-1.5's 25 aggregation points, listed from its architecture (not from aggregation_channels):
    # conv_in 320; down: 2 layers + a downsampler at 320, 640, 1280, then 2 layers at 1280; the mid
    # block 1280; up: 3 layers at 1280, 1280, 640, 320, the last one meeting after the output head
    # (4 latent channels).
    channels = (
        [320] + [320] * 3 + [640] * 3 + [1280] * 3 + [1280] * 2 + [1280] + [1280] * 3 + [1280] * 3 + [640] * 3 + [320] * 2 + [4]
    )
    assert len(channels) == 25
    expected = sum(sabw_parameters(c, 2, 128, 1280, 768) for c in channels)
    assert parameter_count(SD15, 2, 128)[0] == expected


@settings(max_examples=12, deadline=None)
@given(
    c=st.integers(1, 12),
    n=st.integers(2, 4),
    d=st.sampled_from([8, 16, 24]),
    t=st.integers(1, 40),
    x=st.integers(1, 20),
    heads=st.sampled_from([1, 2, 4]),
    groups=st.sampled_from([1, 2, 4, 8]),
    layers=st.sampled_from([1, 2, 3]),
)
def test_one_point_has_the_counted_parameters(c, n, d, t, x, heads, groups, layers):
    with torch.device("meta"):
        point = SABW(c, n, d, heads, t, x, groups, layers)
    assert len(point.transformer.transformer_blocks) == layers
    assert sum(p.numel() for p in point.parameters()) == sabw_parameters(c, n, d, t, x, layers)


def _modules_forward(point: SABW, features, temb, context):
    """The aggregator as the diffusers modules compute it (their own forwards): the reference
    SABW.forward's leaner path must equal."""
    h = point.conv_in(stack_models(features))
    h = point.resnet(h, temb)
    h = point.transformer(h, encoder_hidden_states=context, return_dict=False)[0]
    return point.conv_out(h)


@pytest.mark.parametrize(
    "n,width,heads,layers,size",
    [(2, 8, 1, 1, (5, 7)), (3, 8, 2, 1, (4, 4)), (2, 8, 4, 2, (6, 3)), (2, 40, 2, 2, (3, 5)), (2, 12, 3, 1, (4, 3))],
)
def test_sabw_equals_its_diffusers_modules_forward_and_gradients(n, width, heads, layers, size):
    """Random parameters (every one non-zero, so no path hides), random inputs: the logits and
    the gradients of every parameter agree with the diffusers modules' forward to float rounding,
    for heads padded to `HEAD_DIM` (8, 4, 2 and 4 wide) and not (20 wide)."""
    g = torch.Generator().manual_seed(n + heads + layers + width)
    point = SABW(
        channels=6, n_models=n, width=width, heads=heads, temb_channels=16, cross_attention_dim=12, norm_groups=4, layers=layers
    )
    with torch.no_grad():
        for p in point.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    features, temb, context = (
        torch.randn(n, 3, 6, *size, generator=g),
        torch.randn(3, 16, generator=g),
        torch.randn(3, 9, 12, generator=g),
    )
    grads = []
    for forward in (_modules_forward, SABW.forward):
        point.zero_grad()
        out = forward(point, features, temb, context)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in point.parameters()]))
    (ref, ref_grads), (new, new_grads) = grads
    assert ref.abs().max() > 0.1  # the logits are not trivially zero
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_shipped_aggregators_give_their_modules_outputs():
    """zoo:afa-slices at every point, on random features of the zoo's shapes (16 x 16 latents, a
    CFG batch of 4): each point alone and each point's part of the call prepared for all points
    at once (as the ensemble runs them)."""
    from multifusion.loading import zoo_root

    agg = AFAAggregators.from_pretrained(zoo_root() / "afa-slices").eval()
    g = torch.Generator().manual_seed(0)
    temb, context = (
        torch.randn(4, agg.config.temb_channels, generator=g),
        torch.randn(4, 77, agg.config.cross_attention_dim, generator=g),
    )
    sides = [16, 16, 8, 8, 4, 4, 4, 4, 8, 8, 16, 16, 16]
    with torch.no_grad():
        prepared = agg.prepare(temb, context)
        for i, (point, c, side) in enumerate(zip(agg.points, agg.config.channels, sides, strict=True)):
            features = torch.randn(2, 4, c, side, side, generator=g)
            ref = _modules_forward(point, features, temb, context)
            torch.testing.assert_close(point(features, temb, context), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(point.logits(features, prepared[i]), ref, rtol=1e-5, atol=1e-5)


def test_prepared_points_of_two_layers_match_each_point_alone():
    """`AFAAggregators.prepare` slices every point's layers out of one product: with 2 layers and
    random parameters each point's prepared logits equal that point's own forward."""
    g = torch.Generator().manual_seed(3)
    agg = AFAAggregators([3, 5, 4], n_models=2, width=8, heads=2, temb_channels=6, cross_attention_dim=7, norm_groups=4, layers=2)
    with torch.no_grad():
        for p in agg.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        temb, context = torch.randn(2, 6, generator=g), torch.randn(2, 5, 7, generator=g)
        prepared = agg.prepare(temb, context)
        for i, (point, c) in enumerate(zip(agg.points, agg.config.channels)):
            features = torch.randn(2, 2, c, 4, 3, generator=g)
            ref = _modules_forward(point, features, temb, context)
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(point.logits(features, prepared[i]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_layers_are_saved_and_loaded_back(tmp_path, layers):
    """The layer count is in the config: loading rebuilds the trained shape, with every parameter."""
    agg = AFAAggregators(
        [4, 6], n_models=2, width=8, heads=1, temb_channels=6, cross_attention_dim=5, norm_groups=4, layers=layers
    )
    with torch.no_grad():
        for p in agg.parameters():
            p.normal_()
    agg.save_pretrained(tmp_path)
    back = AFAAggregators.from_pretrained(tmp_path)
    assert back.config.layers == layers
    assert all(len(p.transformer.transformer_blocks) == layers for p in back.points)
    mine, theirs = agg.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_shipped_aggregators_have_one_layer():
    from multifusion.loading import zoo_root

    agg = AFAAggregators.from_pretrained(zoo_root() / "afa-slices")
    assert agg.config.layers == 1 and len(agg.points[0].transformer.transformer_blocks) == 1


@pytest.mark.parametrize("layers", [0, -1, True, 1.5, "2"])
def test_bad_layer_counts_are_refused_naming_the_field(layers):
    with pytest.raises(ValueError, match=r"layers=.* must be a positive int"):
        AFAAggregators([4], n_models=2, width=8, heads=1, norm_groups=4, layers=layers)
    with pytest.raises(AFATrainError, match=r"layers=.*\(--layers\) must be a positive int"):
        AFATrainConfig(layers=layers)


def test_runs_saved_before_the_layers_setting_resume_as_one_layer():
    saved = {k: v for k, v in asdict(AFATrainConfig()).items() if k not in ("steps", "layers")}
    assert saved_settings({"config": saved}) == {k: v for k, v in asdict(AFATrainConfig()).items() if k != "steps"}
    assert saved_settings({"config": saved}) != {k: v for k, v in asdict(AFATrainConfig(layers=2)).items() if k != "steps"}
