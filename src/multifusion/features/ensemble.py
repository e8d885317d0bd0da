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

SD3 transformers are walked by `mmdit.SD3Ensemble`; `build_ensemble` picks the walker, and the
helpers below (aggregation points, aggregator sizes, fingerprints, fits) take either kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from multifusion.errors import IncompatibleModelsError
from multifusion.features.afa import AFAAggregators
from multifusion.handles import Conditioning, ModelHandle

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
_NOT_ARCHITECTURE = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


def unet_config_of(unet: nn.Module) -> dict[str, Any]:
    """The architecture part of a UNet's config (no paths or versions)."""
    return {k: v for k, v in dict(unet.config).items() if k not in _NOT_ARCHITECTURE}


def unet_fingerprint(unet: nn.Module) -> str:
    """Short hash of the UNet configuration (what must match for saved aggregators to fit)."""
    return hashlib.sha256(json.dumps(unet_config_of(unet), sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(*modules: nn.Module) -> str:
    """Content hash of modules' weights: names and values, cast to float16 so a model loaded in
    float32 from float16 files (the zoo) or in float16 hashes alike."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def is_transformer(denoiser: nn.Module) -> bool:
    """Whether `denoiser` is a transformer (walked by `mmdit.SD3Ensemble`) rather than a UNet."""
    return hasattr(denoiser, "transformer_blocks")


def check_walkable(unet: nn.Module) -> None:
    """IncompatibleModelsError unless an ensemble can walk this denoiser's blocks."""
    if is_transformer(unet):
        from multifusion.features import mmdit

        return mmdit.check_walkable(unet)
    cfg = unet.config
    unsupported = [(k, cfg.get(k)) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "num_class_embeds")
                   if cfg.get(k) is not None and not (k == "addition_embed_type" and cfg.get(k) == "text_time")]
    kinds = [type(b).__name__ for b in unet.down_blocks] + [type(b).__name__ for b in unet.up_blocks] + [type(unet.mid_block).__name__]
    bad = [k for k in kinds if k not in DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS]
    if unsupported or bad:
        what = ", ".join([f"{k}={v!r}" for k, v in unsupported] + [f"block {k}" for k in bad])
        raise IncompatibleModelsError(
            f"AFA walks UNets made of {', '.join(DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS)} with time and text "
            f"conditioning (and SDXL's text_time) only; this UNet has {what}"
        )


def aggregation_channels(unet: nn.Module) -> list[int]:
    """Feature width at each aggregation point of `unet`, in order (module docstring; for an SD3
    transformer `mmdit.aggregation_channels`)."""
    if is_transformer(unet):
        from multifusion.features import mmdit

        return mmdit.aggregation_channels(unet)
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


def check_same_denoisers(unets: Sequence[nn.Module], labels: Sequence[str] | None = None) -> None:
    """IncompatibleModelsError unless there are >= 2 denoisers (UNets or SD3 transformers), all
    of one class and configuration."""
    labels = list(labels or [f"model {i}" for i in range(len(unets))])
    if len(unets) < 2:
        raise IncompatibleModelsError(f"AFA ensembles at least 2 models; got {len(unets)}")
    base = unet_config_of(unets[0])
    for label, unet in zip(labels[1:], unets[1:]):
        if type(unet) is not type(unets[0]):
            raise IncompatibleModelsError(f"AFA needs denoisers of one kind: {labels[0]!r} has a {type(unets[0]).__name__}, "
                                          f"{label!r} a {type(unet).__name__}; ensemble fine-tunes of one base model")
        cfg = unet_config_of(unet)
        diff = sorted(k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k))
        if diff:
            shown = "; ".join(f"{k}: {base.get(k)!r} vs {cfg.get(k)!r}" for k in diff[:4])
            raise IncompatibleModelsError(
                f"AFA needs denoisers of one configuration: {labels[0]!r} and {label!r} differ in {shown}; "
                "ensemble fine-tunes of one base model"
            )
    for unet in unets:
        check_walkable(unet)


def split_models(encoder_hidden_states: torch.Tensor, n: int) -> list[torch.Tensor]:
    """(B, N*L, D) -> N tensors (B, L, D): each model's own text embedding."""
    if encoder_hidden_states.shape[1] % n:
        raise ValueError(f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, not a multiple of the {n} models' "
                         "(concatenate each model's own text embedding on the sequence axis)")
    return list(encoder_hidden_states.chunk(n, dim=1))


def join_conditionings(parts: Sequence[Conditioning], labels: Sequence[str]) -> Conditioning:
    """The ensemble's conditioning from each model's own (batch B): embeds (B, N*L, D) on the
    sequence axis, each extra (B, N*E) on its second axis. Inverse of `split_conditioning`."""
    if len({tuple(p.embeds.shape[1:]) for p in parts}) != 1:
        raise IncompatibleModelsError("AFA needs text embeddings of one shape (tokens, width) from every model; got "
                                      + ", ".join(f"{m}: {tuple(p.embeds.shape[1:])}" for m, p in zip(labels, parts)))
    keys = set(parts[0].extra)
    if any(set(p.extra) != keys for p in parts):
        raise IncompatibleModelsError("AFA needs models of one family (the same conditioning); got "
                                      + ", ".join(f"{m}: {sorted(p.extra) or 'text only'}" for m, p in zip(labels, parts)))
    return Conditioning(torch.cat([p.embeds for p in parts], dim=1), {k: torch.cat([p.extra[k] for p in parts], dim=1) for k in keys})


def split_conditioning(cond: Conditioning, n: int) -> list[Conditioning]:
    """Each of `n` models' own conditioning from the ensemble's (see `join_conditionings`)."""
    extras = {k: v.chunk(n, dim=1) for k, v in cond.extra.items()}
    return [Conditioning(e, {k: v[i] for k, v in extras.items()}) for i, e in enumerate(split_models(cond.embeds, n))]


def ensemble_kwargs(members: Sequence[ModelHandle], x_t: torch.Tensor, cond: Conditioning, device: torch.device) -> dict[str, Any]:
    """The ensemble's denoiser keywords beyond the text sequence: each member's own
    (`ModelHandle.denoiser_kwargs` of its part of `cond`), their tensors side by side on the
    second axis; none for Stable Diffusion 1.x/2.x members."""
    own = [m.denoiser_kwargs(x_t, c, device) for m, c in zip(members, split_conditioning(cond, len(members)))]
    if not own[0]:
        return {}
    added = [kw["added_cond_kwargs"] for kw in own]
    return {"added_cond_kwargs": {k: torch.cat([a[k] for a in added], dim=1) for k in added[0]}}


class AFAEnsemble(nn.Module):
    """N UNets of one configuration and their aggregators, callable like one UNet.

    `last_weights` holds, after each call, the per-pixel model weights of every aggregation
    point: a list of (B, N, h, w) tensors (detached).
    """

    def __init__(self, unets: Sequence[nn.Module], aggregators: AFAAggregators, labels: Sequence[str] | None = None):
        super().__init__()
        check_same_denoisers(unets, labels)
        if is_transformer(unets[0]):
            raise IncompatibleModelsError("AFAEnsemble walks UNets; build transformer ensembles with `build_ensemble`")
        channels = aggregation_channels(unets[0])
        cfg = aggregators.config
        if cfg.n_models != len(unets) or list(cfg.channels) != channels:
            raise IncompatibleModelsError(
                f"the aggregators fit {cfg.n_models} models with feature widths {list(cfg.channels)}; these {len(unets)} "
                f"UNets have {channels}: train aggregators for these models (`multifusion afa train`)"
            )
        self.unets = nn.ModuleList(unets)
        self.aggregators = aggregators
        self.last_weights: list[torch.Tensor] = []

    @property
    def denoisers(self) -> list[nn.Module]:
        return list(self.unets)

    @property
    def config(self):
        """The member UNets' config (in_channels, sample_size, ...): the ensemble is one of them."""
        return self.unets[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.unets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.unets[0].device

    @property
    def n_models(self) -> int:
        return len(self.unets)

    def _meet(self, point: int, features: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        agg, weights = self.aggregators(point, torch.stack(features), temb, context)
        self.last_weights.append(weights.detach())
        return agg

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = True, **unused: Any):
        """As `UNet2DConditionModel.forward` for sample (B, C, H, W), encoder_hidden_states
        (B, N*L, D) and, for SDXL-family UNets, added_cond_kwargs with each model's tensors side
        by side on the second axis (module docstring); other keyword arguments (ControlNet
        residuals, masks) are not supported."""
        extra = {k: v for k, v in unused.items() if v is not None}
        if extra:
            raise TypeError(f"the AFA ensemble does not take {sorted(extra)}")
        unets, n = self.unets, self.n_models
        texts = split_models(encoder_hidden_states, n)
        added = [{k: v.chunk(n, dim=1)[i] for k, v in added_cond_kwargs.items()} for i in range(n)] if added_cond_kwargs else [{}] * n
        contexts = [u.process_encoder_hidden_states(c, a) for u, c, a in zip(unets, texts, added)]
        embs = []
        for u, c, a in zip(unets, texts, added):
            emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
            aug = u.get_aug_embed(emb=emb, encoder_hidden_states=c, added_cond_kwargs=a)  # SDXL: pooled text + time ids
            emb = emb + aug if aug is not None else emb
            embs.append(u.time_embed_act(emb) if u.time_embed_act is not None else emb)
        temb = torch.stack(embs).mean(0)  # (B, T): the aggregators' time condition
        context = torch.stack(contexts).mean(0)  # (B, L, D): their text condition
        self.last_weights = []
        point = 0

        def meet(features: list[torch.Tensor]) -> torch.Tensor:
            nonlocal point
            out = self._meet(point, features, temb, context)
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


# --------------------------------------------------------------------------- aggregators for models

WIDTHS = (8, 10, 12, 16, 24, 32, 48, 64, 96, 128)
"""Aggregator widths d tried by `default_width`; 128 is the paper's."""
SHARE = 0.06
"""Aggregator parameters as a share of one UNet that `default_width` keeps below (the paper:
~50M parameters, ~6 % of one SD UNet)."""


def _groups(width: int) -> int:
    return next(g for g in (32, 16, 8, 5, 4, 2, 1) if width % g == 0)


def _heads(width: int) -> int:
    return 8 if width >= 64 and width % 8 == 0 else 1


def aggregator_kwargs(unet: nn.Module, n_models: int, width: int) -> dict[str, Any]:
    """The `AFAAggregators` arguments for `n_models` denoisers like `unet` at width d = `width`."""
    if is_transformer(unet):
        from multifusion.features import mmdit

        dims = mmdit.aggregator_dims(unet)
    else:
        dims = {"temb_channels": unet.time_embedding.linear_2.out_features, "cross_attention_dim": unet.config.cross_attention_dim}
    return dict(channels=aggregation_channels(unet), n_models=n_models, width=width, heads=_heads(width), norm_groups=_groups(width),
                **dims)


def parameter_count(unet_config: dict[str, Any], n_models: int, width: int, denoiser_class: type | None = None) -> tuple[int, int]:
    """(aggregator parameters, parameters of one denoiser) computed from a config alone (a
    UNet2DConditionModel's unless `denoiser_class` says otherwise): both are built on the meta
    device, so no memory is used and no weights are read."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = (denoiser_class or UNet2DConditionModel).from_config(unet_config)
        agg = AFAAggregators(**aggregator_kwargs(unet, n_models, width))
    return sum(p.numel() for p in agg.parameters()), sum(p.numel() for p in unet.parameters())


def default_width(unet_config: dict[str, Any], n_models: int, share: float = SHARE, denoiser_class: type | None = None) -> int:
    """The largest width of `WIDTHS` whose aggregators stay within `share` of one denoiser's
    parameters (the paper's proportion), at least the smallest. SD-1.5 gets 128 (the paper's d)."""
    counts = {w: parameter_count(unet_config, n_models, w, denoiser_class) for w in WIDTHS}
    fits = [w for w, (agg, one) in counts.items() if agg <= share * one]
    return max(fits) if fits else WIDTHS[0]


def fresh_aggregators(unets: Sequence[nn.Module], hashes: Sequence[str], labels: Sequence[str], width: int | None = None) -> AFAAggregators:
    """Zero-initialised aggregators (feature averaging) for these models, in this order."""
    check_same_denoisers(unets, labels)
    config = unet_config_of(unets[0])
    width = width or default_width(config, len(unets), denoiser_class=type(unets[0]))
    return AFAAggregators(**aggregator_kwargs(unets[0], len(unets), width), models=list(hashes), labels=list(labels),
                          unet_config=unet_fingerprint(unets[0]))


def build_ensemble(denoisers: Sequence[nn.Module], aggregators: AFAAggregators, labels: Sequence[str] | None = None) -> nn.Module:
    """The ensemble of these denoisers: an `AFAEnsemble` of UNets or an `mmdit.SD3Ensemble` of
    SD3 transformers (each has its members' call signature)."""
    if denoisers and is_transformer(denoisers[0]):
        from multifusion.features.mmdit import SD3Ensemble

        return SD3Ensemble(denoisers, aggregators, labels)
    return AFAEnsemble(denoisers, aggregators, labels)


def check_aggregators_fit(aggregators: AFAAggregators, unets: Sequence[nn.Module], hashes: Sequence[str], labels: Sequence[str],
                          where: str = "the aggregators") -> None:
    """IncompatibleModelsError unless `aggregators` were trained for these models, in this order."""
    cfg = aggregators.config
    trained = list(cfg.models or [])
    names = list(cfg.labels or trained)
    if cfg.n_models != len(unets):
        raise IncompatibleModelsError(f"{where} were trained for {cfg.n_models} models ({', '.join(names)}); the recipe gives {len(unets)}")
    if cfg.unet_config != unet_fingerprint(unets[0]):
        raise IncompatibleModelsError(f"{where} were trained on UNets of another configuration (fingerprint {cfg.unet_config}, "
                                      f"these: {unet_fingerprint(unets[0])}); train aggregators for these models")
    if trained != list(hashes):
        if sorted(trained) == sorted(hashes):
            order = [names[trained.index(h)] for h in hashes]
            raise IncompatibleModelsError(f"{where} were trained with the models in the order {names}; the recipe gives them as "
                                          f"{order}: list the models in the trained order")
        missing = [f"{lab!r}" for lab, h in zip(labels, hashes) if h not in trained]
        raise IncompatibleModelsError(f"{where} were trained for other models ({', '.join(names)}, content hashes {trained}); "
                                      f"{', '.join(missing)} differ: train aggregators for these models (`multifusion afa train`)")


# --------------------------------------------------------------------------- the handle

def model_hash(handle: ModelHandle) -> str:
    """A model's content hash for AFA: its UNet's and text encoders' weights (`weights_hash`)."""
    return weights_hash(handle.unet, *(module for kind, module in handle.modules().items() if kind.startswith("text_encoder")))


@dataclass(eq=False)
class EnsembleHandle(ModelHandle):
    """A handle whose denoiser is an `AFAEnsemble` of `members`' UNets. Its text embedding is
    each member's own (its tokenizer and text encoder), concatenated on the sequence axis, so
    `Guided` (uncond and cond halves in one batch) and the shared loop need nothing new. The
    VAE, schedule and tokenizer shown as its own are the first member's."""

    members: list[ModelHandle] = field(default_factory=list)

    @classmethod
    def of(cls, members: Sequence[ModelHandle], ensemble: nn.Module, name: str = "afa") -> "EnsembleHandle":
        """The handle of `ensemble` (`build_ensemble`) over `members`; an `mmdit.SD3EnsembleHandle`
        for SD3 members."""
        kind = cls
        if cls is EnsembleHandle and is_transformer(ensemble.denoisers[0]):
            from multifusion.features.mmdit import SD3EnsembleHandle

            kind = SD3EnsembleHandle
        first = members[0]
        return kind(name=name, unet=ensemble, vae=first.vae, text_encoder=first.text_encoder, tokenizer=first.tokenizer,
                   scheduler_config=first.scheduler_config, source="+".join(m.source or m.name for m in members),
                   device=first.device, dtype=first.dtype, offloader=None, members=list(members))

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Each member's own conditioning of `prompts`, joined (`join_conditionings`; shared
        encoders run once)."""
        return self.encode_each([prompts] * len(self.members))

    def encode_negative(self, negatives: list[str], positive: Conditioning) -> Conditioning:
        """Each member's unconditional conditioning (its own `encode_negative`), joined."""
        return self.encode_each([negatives] * len(self.members), negative_of=positive)

    @torch.no_grad()
    def encode_each(self, prompts: Sequence[list[str]], negative_of: Conditioning | None = None) -> Conditioning:
        """Member n's conditioning of its own `prompts[n]`, joined (`join_conditionings`), encoded
        once per distinct (encoders, prompts). With `negative_of` (the ensemble's positive
        conditioning) each member's unconditional one (`ModelHandle.encode_negative`)."""
        positives = split_conditioning(negative_of, len(self.members)) if negative_of is not None else [None] * len(self.members)
        done: dict[tuple, Conditioning] = {}
        parts = []
        for m, p, pos in zip(self.members, prompts, positives):
            encoders = tuple(id(module) for kind, module in m.modules().items() if kind.startswith("text_encoder"))
            key = (type(m), id(m.tokenizer), encoders, tuple(p), getattr(m, "force_zeros_for_empty_prompt", None))
            if key not in done:
                cond = m.encode_prompt(list(p)) if pos is None else m.encode_negative(list(p), pos)
                done[key] = cond.to(self.device)
            parts.append(done[key])
        return join_conditionings(parts, [m.name for m in self.members])

    def denoiser_kwargs(self, x_t: torch.Tensor, cond: Conditioning, device: torch.device) -> dict[str, Any]:
        return ensemble_kwargs(self.members, x_t, cond, device)
