"""The AFA ensemble over Stable Diffusion 3 transformers (MMDiT): N transformers of one
configuration run in lock-step and their image tokens meet after every joint block.

AFA (Wang et al., arXiv 2405.17082, Sec. 3.2; Tenvence/afa) is defined on UNet block layers;
this carries it to SD3's joint transformer blocks (Esser et al., arXiv 2403.03206, Sec. 4: each
block holds an image-token stream and a text-token stream that attend jointly). Aggregation
points, in order (`aggregation_channels`):

    the patch embedding (pos_embed)        image tokens (B, T, D) on their grid (B, D, h/p, w/p)
    each joint block but the last          the same
    the output (norm_out, proj_out)        the velocities (B, C, h, w), unpatchified

so a transformer of L joint blocks has 1 + L points: as in the UNet ensemble (`unet.py`) the
last layer meets after the output head, so the ensemble returns one prediction. The tokens are
reshaped to their patch grid (`tokens_to_grid`) and aggregated per patch by the same SABW
aggregators (`afa.py`) as UNet features; every model continues from the aggregate, as in the
UNet ensemble. Each model keeps its own text stream (its context tokens, projected by its own
`context_embedder` and updated by its own blocks) and its own time-and-pooled-text embedding.

Conditioning. `encoder_hidden_states` holds each model's own text tokens concatenated on the
sequence axis, (B, N*L, D), and `pooled_projections` each model's pooled embedding side by side,
(B, N*P) (`ensemble.join_conditionings`). The aggregators see the mean over models of the N
time-and-pooled embeddings (B, D) and of the N projected contexts (B, L, D).

Deviation (from the paper, which has no transformer case): a point after the patch embedding
stands for the authors' point after `conv_in`; the aggregators' text condition is the models'
projected context before the first block (the text streams change block by block, each model's
own).

FLUX is not walked: its single-stream blocks run text and image tokens as one sequence, and its
rotary positions and guidance embedding would need a walker of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from multifusion.errors import IncompatibleModelsError
from multifusion.features.ensemble import EnsembleModule, Walker, split_models


def tokens_to_grid(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols, D) image tokens, row-major over patches (as `PatchEmbed` flattens them) ->
    (B, D, rows, cols) feature map."""
    b, t, d = tokens.shape
    if t != rows * cols:
        raise ValueError(f"{t} image tokens are not a {rows} x {cols} patch grid")
    return tokens.transpose(1, 2).reshape(b, d, rows, cols)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, D, rows, cols) -> (B, rows*cols, D), the inverse of `tokens_to_grid`."""
    b, d, rows, cols = grid.shape
    return grid.reshape(b, d, rows * cols).transpose(1, 2).contiguous()


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch: int, channels: int) -> torch.Tensor:
    """(B, rows*cols, p*p*C) output tokens -> (B, C, rows*p, cols*p), the same operations as
    `SD3Transformer2DModel.forward`'s unpatchify (so the result is bit-identical to it)."""
    x = tokens.reshape(tokens.shape[0], rows, cols, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, rows * patch, cols * patch)


def check_walkable(transformer: nn.Module) -> None:
    """IncompatibleModelsError unless the transformer has the parts the walk calls (an
    `SD3Transformer2DModel`: patch embedding, joint blocks, output head)."""
    missing = [
        m
        for m in ("pos_embed", "context_embedder", "time_text_embed", "transformer_blocks", "norm_out", "proj_out")
        if not hasattr(transformer, m)
    ]
    if missing:
        raise IncompatibleModelsError(
            f"AFA walks SD3 transformers; this {type(transformer).__name__} has no {', '.join(missing)}"
        )


def aggregation_channels(transformer: nn.Module) -> list[int]:
    """Feature width at each point (module docstring): the inner width D after the patch
    embedding and each joint block but the last, then the output's latent channels C."""
    check_walkable(transformer)
    inner = transformer.inner_dim
    return [inner] * len(transformer.transformer_blocks) + [transformer.out_channels]


def aggregator_dims(transformer: nn.Module) -> dict[str, int]:
    """The aggregators' time-embedding width and text width for this transformer."""
    return {
        "temb_channels": transformer.time_text_embed.timestep_embedder.linear_2.out_features,
        "cross_attention_dim": transformer.context_embedder.out_features,
    }


class SD3Ensemble(EnsembleModule):
    """N SD3 transformers of one configuration and their aggregators, callable like one
    `SD3Transformer2DModel` (`forward(hidden_states, encoder_hidden_states, pooled_projections,
    timestep, return_dict=True)`, `.config`); `last_weights` as `ensemble.EnsembleModule`'s, per
    patch (B, N, h', w')."""

    kind = "transformers"
    check_member = staticmethod(check_walkable)
    channels_of = staticmethod(aggregation_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        return_dict: bool = True,
        **unused: Any,
    ):
        """As `SD3Transformer2DModel.forward` for hidden_states (B, C, H, W), encoder_hidden_states
        (B, N*L, D_text), pooled_projections (B, N*P) (module docstring); ControlNet residuals,
        joint-attention kwargs and skipped layers are not supported."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        extra = {k: v for k, v in unused.items() if v is not None}
        if extra:
            raise TypeError(f"the AFA ensemble does not take {sorted(extra)}")
        models, n = self.members, len(self.members)
        width = n * models[0].config.pooled_projection_dim
        if pooled_projections.shape[1] != width:
            raise ValueError(
                f"pooled_projections has width {pooled_projections.shape[1]}, not {width} ({n} models' pooled "
                "embeddings side by side on the second axis, each model's own)"
            )
        pooled = pooled_projections.chunk(n, dim=1)
        tembs = [m.time_text_embed(timestep, p) for m, p in zip(models, pooled)]  # each (B, D)
        texts = [m.context_embedder(c) for m, c in zip(models, split_models(encoder_hidden_states, n))]  # each (B, L, D)
        temb, context = torch.stack(tembs).mean(0), torch.stack(texts).mean(0)  # the aggregators' conditions
        prepared = self.aggregators.prepare(temb, context)  # every point's, at once
        patch = models[0].config.patch_size
        rows, cols = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        self.last_weights = []
        point = 0

        def meet(features: list[torch.Tensor]) -> torch.Tensor:
            nonlocal point
            agg = self.meet(point, features, prepared)
            point += 1
            return agg

        # image tokens (B, T, D) <-> their grid (B, D, rows, cols) at each meeting
        h = grid_to_tokens(meet([tokens_to_grid(m.pos_embed(hidden_states), rows, cols) for m in models]))
        n_blocks = len(models[0].transformer_blocks)
        for i in range(n_blocks):
            outs = []
            for k, m in enumerate(models):
                texts[k], x = m.transformer_blocks[i](
                    hidden_states=h, encoder_hidden_states=texts[k], temb=tembs[k], joint_attention_kwargs=None
                )
                outs.append(x)
            if i < n_blocks - 1:
                h = grid_to_tokens(meet([tokens_to_grid(x, rows, cols) for x in outs]))
        # the last block meets after the output head, on the velocities (B, C, H, W)
        out = meet(
            [unpatchify(m.proj_out(m.norm_out(x, e)), rows, cols, patch, m.out_channels) for m, x, e in zip(models, outs, tembs)]
        )
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


WALKER = Walker("SD3 transformer", check_walkable, aggregation_channels, aggregator_dims, SD3Ensemble)
