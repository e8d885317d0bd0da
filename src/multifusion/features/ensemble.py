"""What every AFA ensemble shares, whichever denoiser it walks: N models of one configuration run
in lock-step and meet at aggregation points (AFA: Wang et al., "Ensembling Diffusion Models via
Adaptive Feature Aggregation", arXiv 2405.17082, Sec. 3.2; Tenvence/afa).

A `Walker` is how one kind of denoiser is walked: which denoisers it takes, the feature width at
each aggregation point, the aggregators' condition widths and the ensemble module (with the
members' call signature, so a handle holds it like one denoiser). `unet.py` walks UNets (SD 1/2,
SDXL), `mmdit.py` SD3 transformers; `walkers.walker_for` picks one from the denoiser, once.

Here: configuration fingerprints and content hashes, the checks that the members are one
configuration and that trained aggregators fit them, each model's own conditioning joined on the
sequence axis (and split back), the aggregators' sizes, and `EnsembleHandle`: the members' own
family handle with the joined conditioning (`EnsembleHandle.of`).

Conditioning. `encoder_hidden_states` holds each model's own text embedding, concatenated on the
sequence axis: (B, N*L, D), model n's in [n*L, (n+1)*L); further conditioning tensors (SDXL's
pooled text and time ids, SD3's pooled projection) hold the models' own side by side on their
second axis (`join_conditionings`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multifusion.errors import IncompatibleModelsError
from multifusion.features.afa import AFAAggregators, Prepared
from multifusion.handles import Conditioning, ModelHandle, stored_tensors

_NOT_ARCHITECTURE = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


def unet_config_of(unet: nn.Module) -> dict[str, Any]:
    """The architecture part of a UNet's config (no paths or versions)."""
    return {k: v for k, v in dict(unet.config).items() if k not in _NOT_ARCHITECTURE}


def unet_fingerprint(unet: nn.Module) -> str:
    """Short hash of the UNet configuration (what must match for saved aggregators to fit)."""
    return hashlib.sha256(json.dumps(unet_config_of(unet), sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(*modules: nn.Module) -> str:
    """Content hash of modules' weights: names and values, cast to float16 so a model loaded in
    float32 from float16 files (the zoo) or in float16 hashes alike. A quantized weight hashes
    its stored parts, so a quantized model is another model to AFA (its aggregators are its own)."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            for leaf in stored_tensors(t):  # t itself, or a quantized tensor's int values and scales
                h.update(leaf.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_denoisers(unets: Sequence[nn.Module], labels: Sequence[str] | None = None) -> None:
    """IncompatibleModelsError unless there are >= 2 denoisers (UNets or SD3 transformers), all
    of one class and configuration."""
    labels = list(labels or [f"model {i}" for i in range(len(unets))])
    if len(unets) < 2:
        raise IncompatibleModelsError(f"AFA ensembles at least 2 models; got {len(unets)}")
    base = unet_config_of(unets[0])
    for label, unet in zip(labels[1:], unets[1:]):
        if type(unet) is not type(unets[0]):
            raise IncompatibleModelsError(
                f"AFA needs denoisers of one kind: {labels[0]!r} has a {type(unets[0]).__name__}, "
                f"{label!r} a {type(unet).__name__}; ensemble fine-tunes of one base model"
            )
        cfg = unet_config_of(unet)
        diff = sorted(k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k))
        if diff:
            shown = "; ".join(f"{k}: {base.get(k)!r} vs {cfg.get(k)!r}" for k in diff[:4])
            raise IncompatibleModelsError(
                f"AFA needs denoisers of one configuration: {labels[0]!r} and {label!r} differ in {shown}; "
                "ensemble fine-tunes of one base model"
            )


@dataclass(frozen=True)
class Walker:
    """How one kind of denoiser is walked (module docstring): `check(denoiser)` raises
    IncompatibleModelsError unless it can be; `channels(denoiser)` is the feature width at each
    aggregation point; `dims(denoiser)` the aggregators' `temb_channels` and
    `cross_attention_dim`; `ensemble(denoisers, aggregators, labels)` builds the module."""

    kind: str
    check: Callable[[nn.Module], None]
    channels: Callable[[nn.Module], list[int]]
    dims: Callable[[nn.Module], dict[str, int]]
    ensemble: Callable[..., nn.Module]


class EnsembleModule(nn.Module):
    """N denoisers of one configuration and their aggregators, callable like one of them (each
    walker's ensemble subclasses this and walks its kind in `forward`). `last_weights` holds,
    after each call, every aggregation point's per-pixel (or per-patch) model weights: a list of
    (B, N, h, w) tensors (detached)."""

    kind = "denoisers"  # in messages
    check_member: Callable[[nn.Module], None] = staticmethod(lambda denoiser: None)
    channels_of: Callable[[nn.Module], list[int]] = staticmethod(lambda denoiser: [])

    def __init__(self, denoisers: Sequence[nn.Module], aggregators: AFAAggregators, labels: Sequence[str] | None = None):
        super().__init__()
        check_same_denoisers(denoisers, labels)
        for denoiser in denoisers:
            self.check_member(denoiser)
        channels = self.channels_of(denoisers[0])
        cfg = aggregators.config
        if cfg.n_models != len(denoisers) or list(cfg.channels) != channels:
            raise IncompatibleModelsError(
                f"the aggregators fit {cfg.n_models} models with feature widths {list(cfg.channels)}; these {len(denoisers)} "
                f"{self.kind} have {channels}: train aggregators for these models (`multifusion afa train`)"
            )
        self.members = nn.ModuleList(denoisers)
        self.aggregators = aggregators
        self.last_weights: list[torch.Tensor] = []

    @property
    def denoisers(self) -> list[nn.Module]:
        return list(self.members)

    @property
    def config(self):
        """The members' config (in_channels, sample_size, ...): the ensemble is one of them."""
        return self.members[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def n_models(self) -> int:
        return len(self.members)

    def meet(self, point: int, features: list[torch.Tensor], prepared: list[Prepared]) -> torch.Tensor:
        """The aggregate (B, C, h, w) of the members' `features` at aggregation point `point`,
        with the aggregators' part of the call made once (`AFAAggregators.prepare` of the time
        embedding (B, T) and text (B, L, D)); the weights are kept in `last_weights`."""
        agg, weights = self.aggregators(point, torch.stack(features), prepared)
        self.last_weights.append(weights.detach())
        return agg


def split_models(encoder_hidden_states: torch.Tensor, n: int) -> list[torch.Tensor]:
    """(B, N*L, D) -> N tensors (B, L, D): each model's own text embedding."""
    if encoder_hidden_states.shape[1] % n:
        raise ValueError(
            f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, not a multiple of the {n} models' "
            "(concatenate each model's own text embedding on the sequence axis)"
        )
    return list(encoder_hidden_states.chunk(n, dim=1))


def join_conditionings(parts: Sequence[Conditioning], labels: Sequence[str]) -> Conditioning:
    """The ensemble's conditioning from each model's own (batch B): embeds (B, N*L, D) on the
    sequence axis, each extra (B, N*E) on its second axis. Inverse of `split_conditioning`."""
    if len({tuple(p.embeds.shape[1:]) for p in parts}) != 1:
        raise IncompatibleModelsError(
            "AFA needs text embeddings of one shape (tokens, width) from every model; got "
            + ", ".join(f"{m}: {tuple(p.embeds.shape[1:])}" for m, p in zip(labels, parts))
        )
    keys = set(parts[0].extra)
    if any(set(p.extra) != keys for p in parts):
        raise IncompatibleModelsError(
            "AFA needs models of one family (the same conditioning); got "
            + ", ".join(f"{m}: {sorted(p.extra) or 'text only'}" for m, p in zip(labels, parts))
        )
    return Conditioning(
        torch.cat([p.embeds for p in parts], dim=1), {k: torch.cat([p.extra[k] for p in parts], dim=1) for k in keys}
    )


def split_conditioning(cond: Conditioning, n: int) -> list[Conditioning]:
    """Each of `n` models' own conditioning from the ensemble's (see `join_conditionings`)."""
    extras = {k: v.chunk(n, dim=1) for k, v in cond.extra.items()}
    return [Conditioning(e, {k: v[i] for k, v in extras.items()}) for i, e in enumerate(split_models(cond.embeds, n))]


def ensemble_kwargs(
    members: Sequence[ModelHandle], x_t: torch.Tensor, cond: Conditioning, device: torch.device
) -> dict[str, Any]:
    """The ensemble's denoiser keywords beyond the text sequence: each member's own
    (`ModelHandle.denoiser_kwargs` of its part of `cond`), their tensors side by side on the
    second axis; none for Stable Diffusion 1.x/2.x members."""
    own = [m.denoiser_kwargs(x_t, c, device) for m, c in zip(members, split_conditioning(cond, len(members)))]
    if not own[0]:
        return {}
    added = [kw["added_cond_kwargs"] for kw in own]
    return {"added_cond_kwargs": {k: torch.cat([a[k] for a in added], dim=1) for k in added[0]}}


# --------------------------------------------------------------------------- aggregators for models


def check_aggregators_fit(
    aggregators: AFAAggregators,
    unets: Sequence[nn.Module],
    hashes: Sequence[str],
    labels: Sequence[str],
    where: str = "the aggregators",
) -> None:
    """IncompatibleModelsError unless `aggregators` were trained for these models, in this order."""
    cfg = aggregators.config
    trained = list(cfg.models or [])
    names = list(cfg.labels or trained)
    if cfg.n_models != len(unets):
        raise IncompatibleModelsError(
            f"{where} were trained for {cfg.n_models} models ({', '.join(names)}); the recipe gives {len(unets)}"
        )
    if cfg.unet_config != unet_fingerprint(unets[0]):
        raise IncompatibleModelsError(
            f"{where} were trained on UNets of another configuration (fingerprint {cfg.unet_config}, "
            f"these: {unet_fingerprint(unets[0])}); train aggregators for these models"
        )
    if trained != list(hashes):
        if sorted(trained) == sorted(hashes):
            order = [names[trained.index(h)] for h in hashes]
            raise IncompatibleModelsError(
                f"{where} were trained with the models in the order {names}; the recipe gives them as "
                f"{order}: list the models in the trained order"
            )
        missing = [f"{lab!r}" for lab, h in zip(labels, hashes) if h not in trained]
        raise IncompatibleModelsError(
            f"{where} were trained for other models ({', '.join(names)}, content hashes {trained}); "
            f"{', '.join(missing)} differ: train aggregators for these models (`multifusion afa train`)"
        )


# --------------------------------------------------------------------------- the handle


def model_hash(handle: ModelHandle) -> str:
    """A model's content hash for AFA: its UNet's and text encoders' weights (`weights_hash`)."""
    return weights_hash(handle.unet, *(module for kind, module in handle.modules().items() if kind.startswith("text_encoder")))


@dataclass(eq=False)
class EnsembleHandle(ModelHandle):
    """A handle whose denoiser is an AFA ensemble (a `Walker`'s module) of `members`' denoisers.
    Its text embedding is each member's own (its tokenizer and text encoder), joined
    (`join_conditionings`), so `Guided` (uncond and cond halves in one batch) and the shared loop
    need nothing new. `EnsembleHandle.of` makes it a handle of the members' own family too, so
    the family's `eps`, schedule and latent facts drive the ensemble as they drive one denoiser.
    The VAE, schedule and tokenizer shown as its own are the first member's."""

    members: list[ModelHandle] = field(default_factory=list)

    @classmethod
    def of(cls, members: Sequence[ModelHandle], ensemble: nn.Module, name: str = "afa") -> EnsembleHandle:
        """The handle of `ensemble` over `members` (one family: `check_same_denoisers`)."""
        first = members[0]
        return _of_family(type(first))(
            name=name,
            unet=ensemble,
            vae=first.vae,
            text_encoder=first.text_encoder,
            tokenizer=first.tokenizer,
            scheduler_config=first.scheduler_config,
            source="+".join(m.source or m.name for m in members),
            device=first.device,
            dtype=first.dtype,
            offloader=None,
            members=list(members),
        )

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


@functools.cache
def _of_family(family: type[ModelHandle]) -> type[EnsembleHandle]:
    """EnsembleHandle joined with a family's handle class (the family's methods under the
    ensemble's conditioning), made once per family."""
    if issubclass(family, EnsembleHandle):
        raise IncompatibleModelsError("an AFA ensemble cannot be a member of another ensemble")
    return dataclass(eq=False)(
        type(
            f"{family.__name__[: -len('Handle')] or family.__name__}EnsembleHandle",
            (EnsembleHandle, family),
            {"__module__": __name__},
        )
    )
