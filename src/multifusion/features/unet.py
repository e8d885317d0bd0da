"""The AFA ensemble: N UNets of one configuration run in lock-step and meet after every layer.

It has the call signature of a diffusers `UNet2DConditionModel` (`forward(sample, timestep,
encoder_hidden_states, return_dict=True)`, `.config`), so a handle holds it like any UNet and the
shared loop and every scheduler drive it unchanged. It is built by walking the UNets' own
blocks and calling the installed diffusers submodules (time embedding, resnets, transformers,
down/upsamplers, the mid block, the output head); no UNet source is copied.

Aggregation points, in order (`aggregation_channels`; paper Sec. 3.2, Tenvence/afa
`models/model.py`, `agg_in_channels`):

    conv_in                                         1
    each down layer (resnet [+ transformer]) and each downsampler
    the mid block                                   1
    each up layer (resnet [+ transformer]), the upsampler folded into the last layer of its
    block, except the very last layer, whose aggregation is that of
    the output (conv_norm_out, conv_act, conv_out)  1

SD-1.5: 1 + 11 + 1 + 11 + 1 = 25. After each point every model continues from the aggregated
tensor, and the skip connections store aggregated tensors.

Conditioning. `encoder_hidden_states` holds each model's own text embedding, concatenated on the
sequence axis: (B, N*L, D), model n's in [n*L, (n+1)*L) (`EnsembleHandle.encode_prompt` makes
them). Inside its own blocks each UNet sees its own embedding and its own time embedding; the
aggregators see the mean over models of the time embeddings and of the text embeddings.
SDXL-family UNets (`addition_embed_type="text_time"`) also take `added_cond_kwargs`: each tensor
holds the models' own on its second axis (text_embeds (B, N*P), time_ids (B, N*6)), and each
model adds its own pooled-text and micro-conditioning embedding to its time embedding, as its
own forward does (`UNet2DConditionModel.get_aug_embed`).

SD3 transformers are walked by `mmdit.py`; `walkers.walker_for` picks the walker from the
denoiser, once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from multifusion.errors import IncompatibleModelsError
from multifusion.features.ensemble import EnsembleModule, Walker, split_models

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


def check_walkable(unet: nn.Module) -> None:
    """IncompatibleModelsError unless an ensemble can walk this denoiser's blocks."""
    if not all(hasattr(unet, m) for m in ("down_blocks", "mid_block", "up_blocks")):
        raise IncompatibleModelsError(
            f"this walker walks UNets, and this denoiser is a {type(unet).__name__}: build ensembles "
            "with `walkers.build_ensemble`, which picks the walker of the denoiser"
        )
    cfg = unet.config
    unsupported = [
        (k, cfg.get(k))
        for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "num_class_embeds")
        if cfg.get(k) is not None and not (k == "addition_embed_type" and cfg.get(k) == "text_time")
    ]
    kinds = (
        [type(b).__name__ for b in unet.down_blocks]
        + [type(b).__name__ for b in unet.up_blocks]
        + [type(unet.mid_block).__name__]
    )
    bad = [k for k in kinds if k not in DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS]
    if unsupported or bad:
        what = ", ".join([f"{k}={v!r}" for k, v in unsupported] + [f"block {k}" for k in bad])
        raise IncompatibleModelsError(
            f"AFA walks UNets made of {', '.join(DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS)} with time and text "
            f"conditioning (and SDXL's text_time) only; this UNet has {what}"
        )


def aggregation_channels(unet: nn.Module) -> list[int]:
    """Feature width at each aggregation point of `unet`, in order (module docstring)."""
    check_walkable(unet)
    out = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        out += [r.out_channels for r in block.resnets]
        out += [d.out_channels for d in (block.downsamplers or [])]
    out.append(unet.mid_block.resnets[-1].out_channels)
    for block in unet.up_blocks:
        out += [r.out_channels for r in block.resnets]
    out[-1] = unet.conv_out.out_channels  # the last up layer meets after the output head
    return out


def aggregator_dims(unet: nn.Module) -> dict[str, int]:
    """The aggregators' time-embedding width and text width for this UNet."""
    return {"temb_channels": unet.time_embedding.linear_2.out_features, "cross_attention_dim": unet.config.cross_attention_dim}


class AFAEnsemble(EnsembleModule):
    """N UNets of one configuration and their aggregators, callable like one UNet (module
    docstring; `ensemble.EnsembleModule`)."""

    kind = "UNets"
    check_member = staticmethod(check_walkable)
    channels_of = staticmethod(aggregation_channels)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unused: Any,
    ):
        """As `UNet2DConditionModel.forward` for sample (B, C, H, W), encoder_hidden_states
        (B, N*L, D) and, for SDXL-family UNets, added_cond_kwargs with each model's tensors side
        by side on the second axis (module docstring); other keyword arguments (ControlNet
        residuals, masks) are not supported."""
        extra = {k: v for k, v in unused.items() if v is not None}
        if extra:
            raise TypeError(f"the AFA ensemble does not take {sorted(extra)}")
        unets, n = self.members, self.n_models
        texts = split_models(encoder_hidden_states, n)
        added = (
            [{k: v.chunk(n, dim=1)[i] for k, v in added_cond_kwargs.items()} for i in range(n)] if added_cond_kwargs else [{}] * n
        )
        contexts = [u.process_encoder_hidden_states(c, a) for u, c, a in zip(unets, texts, added)]
        embs = []
        for u, c, a in zip(unets, texts, added):
            emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
            aug = u.get_aug_embed(emb=emb, encoder_hidden_states=c, added_cond_kwargs=a)  # SDXL: pooled text + time ids
            emb = emb + aug if aug is not None else emb
            embs.append(u.time_embed_act(emb) if u.time_embed_act is not None else emb)
        temb = torch.stack(embs).mean(0)  # (B, T): the aggregators' time condition
        context = torch.stack(contexts).mean(0)  # (B, L, D): their text condition
        prepared = self.aggregators.prepare(temb, context)  # every point's, at once
        self.last_weights = []
        point = 0

        def meet(features: list[torch.Tensor]) -> torch.Tensor:
            nonlocal point
            out = self.meet(point, features, prepared)
            point += 1
            return out

        # Upsample sizes as diffusers computes them, for latents not divisible by 2**upsamplers.
        up_factor = 2 ** unets[0].num_upsamplers
        forward_size = any(s % up_factor for s in sample.shape[-2:])

        if unets[0].config.center_input_sample:
            sample = 2 * sample - 1.0
        h = meet([u.conv_in(sample) for u in unets])
        skips = [h]
        for b in range(len(unets[0].down_blocks)):
            blocks = [u.down_blocks[b] for u in unets]
            for j in range(len(blocks[0].resnets)):
                h = meet([self._layer(blk, j, h, e, c) for blk, e, c in zip(blocks, embs, contexts)])
                skips.append(h)
            if blocks[0].downsamplers is not None:
                h = meet([_down(blk.downsamplers, h) for blk in blocks])
                skips.append(h)

        mids = []
        for u, e, c in zip(unets, embs, contexts):
            if getattr(u.mid_block, "has_cross_attention", False):
                mids.append(u.mid_block(h, e, encoder_hidden_states=c))
            else:
                mids.append(u.mid_block(h, e))
        h = meet(mids)

        n_up = len(unets[0].up_blocks)
        for b in range(n_up):
            blocks = [u.up_blocks[b] for u in unets]
            n_layers = len(blocks[0].resnets)
            size = skips[-n_layers - 1].shape[2:] if forward_size and b < n_up - 1 else None
            for j in range(n_layers):
                skip = skips.pop()
                outs = []
                for blk, e, c in zip(blocks, embs, contexts):
                    x = self._layer(blk, j, torch.cat([h, skip], dim=1), e, c)
                    if j == n_layers - 1 and blk.upsamplers is not None:
                        x = _up(blk.upsamplers, x, size)
                    outs.append(x)
                if b == n_up - 1 and j == n_layers - 1:
                    h = meet([_head(u, x) for u, x in zip(unets, outs)])  # the last layer meets after the head
                else:
                    h = meet(outs)
        if not return_dict:
            return (h,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=h)

    @staticmethod
    def _layer(block: nn.Module, j: int, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Layer j of a down or up block: its resnet, then its transformer if it has one."""
        h = block.resnets[j](h, emb)
        if getattr(block, "attentions", None) is not None and len(block.attentions) > j:
            h = block.attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
        return h


def _down(samplers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    for s in samplers:
        h = s(h)
    return h


def _up(samplers: nn.ModuleList, h: torch.Tensor, size: Any) -> torch.Tensor:
    for s in samplers:
        h = s(h, size)
    return h


def _head(unet: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


WALKER = Walker("UNet", check_walkable, aggregation_channels, aggregator_dims, AFAEnsemble)
