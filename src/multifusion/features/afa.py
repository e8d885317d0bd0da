"""AFA's aggregator: a spatial attention that mixes N models' block features per pixel.

Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation" (arXiv 2405.17082,
ICLR 2025), Sec. 3.2, the Spatial-Aware Block-Wise (SABW) feature aggregator; the authors'
release is Tenvence/afa (`models/modules/aggregator.py`).

At one aggregation point the N models' features f_1..f_N (each (B, C, H, W)) are

    stacked on channels       (B, N*C, H, W)
    1x1 conv to width d       (B, d, H, W)
    ResNet block + t-emb      (B, d, H, W)
    transformer block         (B, d, H, W)    self-attention, cross-attention to the text, FF
    1x1 conv to N, no bias    (B, N, H, W)    initialised to ZERO
    softmax over the models   (B, N, H, W)    w_n(p) >= 0, sum_n w_n(p) = 1
    sum_n w_n * f_n           (B, C, H, W)

so an untrained aggregator (logits 0) averages the features, and N copies of one model
aggregate to that model's own feature.

`AFAAggregators` holds one SABW block per aggregation point of an ensemble (see
`ensemble.aggregation_channels`) as a diffusers `ModelMixin`/`ConfigMixin`: `save_pretrained`
writes `config.json` + `diffusion_pytorch_model.safetensors`, and the config names the models it
was trained with (content hashes, in order) and the UNet configuration they share.

Deviations from the authors' code:
- the aggregators of one ensemble are one module (one file and one config), not a folder each;
- GroupNorm group count and head count are config fields (the authors fix 32 groups, which
  the zoo's narrow width d cannot divide);
- the config records the models (by content hash) and their order, and the UNet configuration;
  loading with other models is an error (the authors' folder holds copies of the models instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

# --------------------------------------------------------------------------- pure maths


def stack_models(features: torch.Tensor) -> torch.Tensor:
    """(N, B, C, H, W) features of N models -> (B, N*C, H, W), model-major on channels
    (channels [n*C, (n+1)*C) are model n's), as the authors' reshape stacks them."""
    n, b, c, h, w = features.shape
    return features.permute(1, 0, 2, 3, 4).reshape(b, n * c, h, w)


def model_weights(logits: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) logits -> (B, N, H, W) per-pixel weights over the N models: a softmax over
    dim 1, so every weight lies in [0, 1] and the weights of one pixel sum to 1."""
    return torch.softmax(logits, dim=1)


def convex_combination(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_n weights[:, n] * features[n]: features (N, B, C, H, W), weights (B, N, H, W) with
    each pixel's weights summing to 1 -> (B, C, H, W). With N copies of one feature map it returns
    that map: exactly under equal weights (zero logits) for N = 1, 2, 4, to float rounding otherwise
    (w f + (1 - w) f need not round to f)."""
    w = weights.permute(1, 0, 2, 3).unsqueeze(2).to(features.dtype)  # (N, B, 1, H, W)
    return (features * w).sum(dim=0)


# --------------------------------------------------------------------------- one aggregation point


class SABW(nn.Module):
    """The aggregator of one aggregation point (module docstring): features (N, B, C, H, W),
    temb (B, T), context (B, L, D) -> logits (B, N, H, W)."""

    def __init__(
        self,
        channels: int,
        n_models: int,
        width: int,
        heads: int,
        temb_channels: int,
        cross_attention_dim: int,
        norm_groups: int,
        layers: int = 1,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(n_models * channels, width, kernel_size=1)
        self.resnet = ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb_channels, groups=norm_groups)
        self.transformer = Transformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=width,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=norm_groups,
            num_layers=layers,
        )
        self.conv_out = nn.Conv2d(width, n_models, kernel_size=1, bias=False)
        nn.init.zeros_(self.conv_out.weight)  # untrained = feature averaging (paper Sec. 3.2)

    def forward(self, features: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.logits(features, prepare([self], temb, context)[0])

    def logits(self, features: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """`forward` with this point's part of a call prepared beforehand (`prepare`)."""
        h = self.conv_in(stack_models(features))  # (B, d, H, W)
        h = _resnet(self.resnet, h, prepared.time)
        h = _transformer(self.transformer, h, prepared.layers)
        return self.conv_out(h)  # (B, N, H, W)


# The aggregators run 13-25 times per denoiser call on feature maps of width d (10 on the zoo),
# where every operation is small and the per-operation cost weighs (the profile in
# docs/afa.md). The functions below compute what `ResnetBlock2D.forward` and
# `Transformer2DModel.forward` compute for the configuration SABW builds (GroupNorm + SiLU,
# default time-embedding norm, no shortcut, no dropout; continuous input with a 1x1-conv
# projection, layer-norm blocks, bias-free q/k/v, GEGLU) from the same parameters, in fewer and
# faster operations:
# - what depends only on the time embedding, the text and the parameters (the ResNet's time
#   term, the cross-attention keys and values, the attention projections in the layout below) is
#   made once per denoiser call for every point together (`prepare`), a few operations on the
#   points' stacked parameters instead of a few per point;
# - fused attention (`scaled_dot_product_attention`) on 4-d inputs, the tokens kept in (B, HW, d),
#   self-attention's q, k, v from one product;
# - heads narrower than `HEAD_DIM` are padded with zeros to it (zero rows in the q, k, v
#   projections, zero columns in the output projection): q.k and the weighted sum of v are
#   unchanged (zeros add nothing; the scale stays 1/sqrt(d/heads)), and PyTorch's CPU attention
#   runs 1.5-2.6x faster at a head of 16 than at 10 (docs/afa.md#performance).
# The diffusers modules stay the parameters' home, so saved aggregators load unchanged; tests
# compare both paths (logits and gradients).

HEAD_DIM = 16
"""Heads narrower than this are zero-padded to it for the attention kernels (comment above)."""


@dataclass(frozen=True)
class Layer:
    """One transformer layer's attention projections for a call, heads zero-padded from h = d /
    heads to h' (`HEAD_DIM`): `qkv` (3 heads h', d) self-attention's q, k, v rows; `out1`, `out2`
    (d, heads h') the output projections; `q2` (heads h', d) the cross-attention query; `keys`,
    `values` (B, heads, L, h') the cross-attention keys and values of the text."""

    qkv: torch.Tensor
    out1: torch.Tensor
    q2: torch.Tensor
    out2: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Prepared:
    """One aggregation point's part of a denoiser call (`prepare`): `time` the ResNet block's
    time term (B, d, 1, 1), `layers` one `Layer` per transformer layer."""

    time: torch.Tensor
    layers: list[Layer]


def _pad_heads(w: torch.Tensor, groups: int, head: int, dim: int) -> torch.Tensor:
    """w (..., groups * h, ...) -> (..., groups * head, ...) on axis `dim` (groups: heads, or
    q, k, v times heads): each group's h entries followed by head - h zeros."""
    h = w.shape[dim] // groups
    if h == head:
        return w
    pad = [0, 0] * (w.dim() - 1 - dim) + [0, head - h]  # F.pad lists the last axis first
    return F.pad(w.unflatten(dim, (groups, h)), pad).flatten(dim, dim + 1)


def prepare(points: Sequence[SABW], temb: torch.Tensor, context: torch.Tensor) -> list[Prepared]:
    """Each point's `Prepared` for temb (B, T) and context (B, L, D): the time terms of all
    points as one product, the cross-attention keys and values of every layer of every point as
    another, the padded projections from the points' stacked parameters. The points share width,
    heads, layers and condition widths (as the points of one `AFAAggregators` do)."""
    blocks = [block for p in points for block in p.transformer.transformer_blocks]  # point-major
    width, heads = blocks[0].attn1.query_dim, blocks[0].attn1.heads
    head = max(width // heads, HEAD_DIM)

    def stacked(get, dim: int, groups: int = heads) -> torch.Tensor:  # (P layers, ...), heads padded on axis `dim`
        return _pad_heads(torch.stack([get(b) for b in blocks]), groups, head, dim)

    qkv = stacked(lambda b: torch.cat([b.attn1.to_q.weight, b.attn1.to_k.weight, b.attn1.to_v.weight]), 1, 3 * heads)
    out1 = stacked(lambda b: b.attn1.to_out[0].weight, 2)
    q2 = stacked(lambda b: b.attn2.to_q.weight, 1)
    out2 = stacked(lambda b: b.attn2.to_out[0].weight, 2)
    kv = stacked(lambda b: torch.cat([b.attn2.to_k.weight, b.attn2.to_v.weight]), 1, 2 * heads)  # (P layers, 2 heads h', D)
    n, (b, length) = len(blocks), context.shape[:2]
    kv = F.linear(context, kv.flatten(0, 1)).view(b, length, n, 2, heads, head).permute(2, 3, 0, 4, 1, 5).contiguous()
    layers = [
        Layer(w, o1, q, o2, k, v)
        for w, o1, q, o2, (k, v) in zip(qkv.unbind(0), out1.unbind(0), q2.unbind(0), out2.unbind(0), kv.unbind(0))
    ]
    projs = [p.resnet.time_emb_proj for p in points]
    time = F.linear(F.silu(temb), torch.cat([m.weight for m in projs]), torch.cat([m.bias for m in projs]))
    per_point = len(blocks) // len(points)
    return [
        Prepared(t, layers[i * per_point : (i + 1) * per_point])
        for i, t in enumerate(time.unflatten(1, (len(points), -1))[..., None, None].unbind(1))  # each (B, d, 1, 1)
    ]


def _resnet(block: ResnetBlock2D, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """`block(h, temb)` for SABW's ResnetBlock2D: h (B, d, H, W), its time term (B, d, 1, 1)
    (`prepare`) -> (B, d, H, W)."""
    n1, n2 = block.norm1, block.norm2
    r = F.silu(F.group_norm(h, n1.num_groups, n1.weight, n1.bias, n1.eps))
    r = F.conv2d(r, block.conv1.weight, block.conv1.bias, padding=1) + time
    r = F.silu(F.group_norm(r, n2.num_groups, n2.weight, n2.bias, n2.eps))
    r = F.conv2d(r, block.conv2.weight, block.conv2.bias, padding=1)
    out = h + r
    return out if block.output_scale_factor == 1.0 else out / block.output_scale_factor


def _transformer(model: Transformer2DModel, h: torch.Tensor, layers: list[Layer]) -> torch.Tensor:
    """`model(h, encoder_hidden_states=context)` for SABW's Transformer2DModel: h (B, d, H, W)
    and its layers' projections and cross-attention keys and values (`prepare`) -> (B, d, H, W)."""
    b, d, hh, ww = h.shape
    norm = model.norm
    x = F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
    # contiguous: on a strided input `F.linear` takes a path that depends on whether the weight
    # requires grad (a last-bit difference between a training run's and a loaded module's outputs)
    x = F.linear(x.flatten(2).transpose(1, 2).contiguous(), model.proj_in.weight.flatten(1), model.proj_in.bias)  # (B, HW, d)
    for block, layer in zip(model.transformer_blocks, layers, strict=True):
        heads = block.attn1.heads
        scale = (d // heads) ** -0.5
        n = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        q, k, v = F.linear(n, layer.qkv).view(b, hh * ww, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, HW, h')
        x = x + F.linear(
            _merge_heads(F.scaled_dot_product_attention(q, k, v, scale=scale)), layer.out1, block.attn1.to_out[0].bias
        )
        n = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        q = F.linear(n, layer.q2).view(b, hh * ww, heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, layer.keys, layer.values, scale=scale)
        x = x + F.linear(_merge_heads(o), layer.out2, block.attn2.to_out[0].bias)
        n = F.layer_norm(x, (d,), block.norm3.weight, block.norm3.bias, block.norm3.eps)
        # GEGLU (diffusers' `GEGLU`): its projection's two halves as two products, so each is
        # contiguous (elementwise maths on the strided halves of one product was 2x slower)
        geglu, out, half = block.ff.net[0].proj, block.ff.net[2], block.ff.net[2].in_features
        u = F.linear(n, geglu.weight[:half], geglu.bias[:half])
        gate = F.linear(n, geglu.weight[half:], geglu.bias[half:])
        x = x + F.linear(u * F.gelu(gate), out.weight, out.bias)
    x = x.transpose(1, 2).reshape(b, d, hh, ww)
    return F.conv2d(x, model.proj_out.weight, model.proj_out.bias) + h


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, h') -> (B, T, heads h')."""
    return o.transpose(1, 2).flatten(2)


class AFAAggregators(ModelMixin, ConfigMixin):
    """One SABW aggregator per aggregation point of an ensemble of `n_models` UNets.

    `channels[i]` is the feature width at point i (`ensemble.aggregation_channels`); `models`
    the content hashes of the models in their order, `unet_config` the fingerprint of the UNet
    configuration they share (`ensemble.unet_fingerprint`), `labels` their names (for people).
    `layers` is the transformer layers of each aggregator: 1 in the shipped zoo:afa-slices; the
    authors' released code builds the last down block's layer count (its `num_layers` argument
    is overwritten by a loop variable), 2 for SD-1.5. Stored in the config, so loading rebuilds
    the trained shape.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        channels: list[int],
        n_models: int,
        width: int = 128,
        heads: int = 8,
        temb_channels: int = 1280,
        cross_attention_dim: int = 768,
        norm_groups: int = 32,
        layers: int = 1,
        models: list[str] | None = None,
        labels: list[str] | None = None,
        unet_config: str | None = None,
    ):
        super().__init__()
        if n_models < 2:
            raise ValueError(f"n_models={n_models}: an ensemble needs at least 2 models")
        if width % heads or width % norm_groups:
            raise ValueError(f"width={width} must be a multiple of heads={heads} and norm_groups={norm_groups}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers={layers!r} must be a positive int: the transformer layers of each aggregator (1 or 2)")
        self.points = nn.ModuleList(
            SABW(c, n_models, width, heads, temb_channels, cross_attention_dim, norm_groups, layers) for c in channels
        )

    def prepare(self, temb: torch.Tensor, context: torch.Tensor) -> list[Prepared]:
        """Every point's part of a denoiser call for temb (B, T) and context (B, L, D), made once
        per call (`prepare`)."""
        return prepare(self.points, temb, context)

    def forward(self, point: int, features: torch.Tensor, prepared: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate at `point`: features (N, B, C, H, W) and the call's `prepared` (`prepare`) ->
        (the aggregated feature (B, C, H, W), the weights (B, N, H, W))."""
        weights = model_weights(self.points[point].logits(features, prepared[point]).float())
        return convex_combination(features, weights), weights
