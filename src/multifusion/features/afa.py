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
        h = self.conv_in(stack_models(features))  # (B, d, H, W)
        h = _resnet(self.resnet, h, temb)
        h = _transformer(self.transformer, h, context)
        return self.conv_out(h)  # (B, N, H, W)


# The aggregators run 13-25 times per denoiser call on feature maps of width d (10 on the zoo),
# where the diffusers modules' own forwards add per-call checks, reshapes and copies to little
# arithmetic (the profile in docs/afa.md). The two functions below compute what
# `ResnetBlock2D.forward` and `Transformer2DModel.forward` compute for the configuration SABW
# builds (GroupNorm + SiLU, default time-embedding norm, no shortcut, no dropout; continuous input
# with a 1x1-conv projection, layer-norm blocks, bias-free q/k/v, GEGLU) from the same parameters,
# in fewer operations: fused attention (`scaled_dot_product_attention`) on 4-d inputs, the tokens
# kept in (B, HW, d). The diffusers modules stay the parameters' home, so saved aggregators load
# unchanged; tests compare both paths (logits and gradients).


def _resnet(block: ResnetBlock2D, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """`block(h, temb)` for SABW's ResnetBlock2D: h (B, d, H, W), temb (B, T) -> (B, d, H, W)."""
    n1, n2 = block.norm1, block.norm2
    r = F.silu(F.group_norm(h, n1.num_groups, n1.weight, n1.bias, n1.eps))
    r = F.conv2d(r, block.conv1.weight, block.conv1.bias, padding=1)
    r = r + F.linear(F.silu(temb), block.time_emb_proj.weight, block.time_emb_proj.bias)[:, :, None, None]
    r = F.silu(F.group_norm(r, n2.num_groups, n2.weight, n2.bias, n2.eps))
    r = F.conv2d(r, block.conv2.weight, block.conv2.bias, padding=1)
    out = h + r
    return out if block.output_scale_factor == 1.0 else out / block.output_scale_factor


def _transformer(model: Transformer2DModel, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """`model(h, encoder_hidden_states=context)` for SABW's Transformer2DModel: h (B, d, H, W),
    context (B, L, D) -> (B, d, H, W)."""
    b, d, hh, ww = h.shape
    norm = model.norm
    x = F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
    x = F.linear(x.flatten(2).transpose(1, 2), model.proj_in.weight.flatten(1), model.proj_in.bias)  # (B, HW, d)
    for block in model.transformer_blocks:
        a1, a2 = block.attn1, block.attn2
        n = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        q, k, v = (F.linear(n, a.weight) for a in (a1.to_q, a1.to_k, a1.to_v))
        x = x + F.linear(_attention(q, k, v, a1.heads), a1.to_out[0].weight, a1.to_out[0].bias)
        n = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        q, k, v = F.linear(n, a2.to_q.weight), F.linear(context, a2.to_k.weight), F.linear(context, a2.to_v.weight)
        x = x + F.linear(_attention(q, k, v, a2.heads), a2.to_out[0].weight, a2.to_out[0].bias)
        n = F.layer_norm(x, (d,), block.norm3.weight, block.norm3.bias, block.norm3.eps)
        # GEGLU (diffusers' `GEGLU`): its projection's two halves as two products, so each is
        # contiguous (elementwise maths on the strided halves of one product was 2x slower)
        geglu, out, half = block.ff.net[0].proj, block.ff.net[2], block.ff.net[2].in_features
        u = F.linear(n, geglu.weight[:half], geglu.bias[:half])
        gate = F.linear(n, geglu.weight[half:], geglu.bias[half:])
        x = x + F.linear(u * F.gelu(gate), out.weight, out.bias)
    x = x.transpose(1, 2).reshape(b, d, hh, ww)
    return F.conv2d(x, model.proj_out.weight, model.proj_out.bias) + h


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of q (B, T, d) over k, v (B, S, d) -> (B, T, d), scale 1/sqrt(d/heads)."""
    b, t, d = q.shape
    # 4-d inputs: on CPU, 3-d ones take the unfused path (a safe softmax with masks of its own)
    q, k, v = (x.unflatten(-1, (heads, d // heads)).transpose(1, 2) for x in (q, k, v))  # (B, heads, T, d/heads)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)


class AFAAggregators(ModelMixin, ConfigMixin):
    """One SABW aggregator per aggregation point of an ensemble of `n_models` UNets.

    `channels[i]` is the feature width at point i (`ensemble.aggregation_channels`); `models`
    the content hashes of the models in their order, `unet_config` the fingerprint of the UNet
    configuration they share (`ensemble.unet_fingerprint`), `labels` their names (for people).
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
        self.points = nn.ModuleList(
            SABW(c, n_models, width, heads, temb_channels, cross_attention_dim, norm_groups, layers) for c in channels
        )

    def forward(
        self, point: int, features: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate at `point`: features (N, B, C, H, W), temb (B, T), context (B, L, D) ->
        (the aggregated feature (B, C, H, W), the weights (B, N, H, W))."""
        weights = model_weights(self.points[point](features, temb, context).float())
        return convex_combination(features, weights), weights
