"""Which walker an AFA ensemble uses, chosen once from the denoiser (`walker_for`), and what
needs one: aggregator sizes, fresh aggregators and the ensemble module itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from multifusion.errors import IncompatibleModelsError
from multifusion.features import mmdit, unet
from multifusion.features.afa import AFAAggregators
from multifusion.features.ensemble import Walker, check_same_denoisers, unet_config_of, unet_fingerprint

WALKERS: dict[str, Walker] = {"UNet2DConditionModel": unet.WALKER, "SD3Transformer2DModel": mmdit.WALKER}
"""Walkers by the denoiser's diffusers class."""

NOT_WALKED = {
    "FluxTransformer2DModel": (
        "FLUX.1's single-stream blocks run the text and image tokens as one sequence (with rotary positions and a guidance "
        "embedding) and are not walked yet; fuse FLUX models with average, snb, mod or amdm"
    )
}


WIDTHS = (8, 10, 12, 16, 24, 32, 48, 64, 96, 128)
"""Aggregator widths d tried by `default_width`; 128 is the paper's."""
SHARE = 0.06
"""Aggregator parameters as a share of one UNet that `default_width` keeps below (the paper:
~50M parameters, ~6 % of one SD UNet)."""


def _groups(width: int) -> int:
    return next(g for g in (32, 16, 8, 5, 4, 2, 1) if width % g == 0)


def _heads(width: int) -> int:
    return 8 if width >= 64 and width % 8 == 0 else 1


def walker_for(denoiser: nn.Module) -> Walker:
    """The walker of `denoiser`'s kind; IncompatibleModelsError saying why for others."""
    kind = type(denoiser).__name__
    if kind not in WALKERS:
        why = f" ({NOT_WALKED[kind]})" if kind in NOT_WALKED else ""
        raise IncompatibleModelsError(
            f"AFA walks UNets and Stable Diffusion 3 transformers ({', '.join(WALKERS)}); this denoiser is a {kind}{why}"
        )
    return WALKERS[kind]


def aggregation_channels(denoiser: nn.Module) -> list[int]:
    """Feature width at each aggregation point of `denoiser`, in order (its walker's)."""
    return walker_for(denoiser).channels(denoiser)


def aggregator_kwargs(unet: nn.Module, n_models: int, width: int, layers: int = 1) -> dict[str, Any]:
    """The `AFAAggregators` arguments for `n_models` denoisers like `unet` at width d = `width`
    with `layers` transformer layers per aggregator."""
    walker = walker_for(unet)
    return dict(
        channels=walker.channels(unet),
        n_models=n_models,
        width=width,
        heads=_heads(width),
        norm_groups=_groups(width),
        layers=layers,
        **walker.dims(unet),
    )


def parameter_count(
    unet_config: dict[str, Any], n_models: int, width: int, denoiser_class: type | None = None, layers: int = 1
) -> tuple[int, int]:
    """(aggregator parameters, parameters of one denoiser) computed from a config alone (a
    UNet2DConditionModel's unless `denoiser_class` says otherwise): both are built on the meta
    device, so no memory is used and no weights are read."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = (denoiser_class or UNet2DConditionModel).from_config(unet_config)
        agg = AFAAggregators(**aggregator_kwargs(unet, n_models, width, layers))
    return sum(p.numel() for p in agg.parameters()), sum(p.numel() for p in unet.parameters())


def default_width(unet_config: dict[str, Any], n_models: int, share: float = SHARE, denoiser_class: type | None = None) -> int:
    """The largest width of `WIDTHS` whose aggregators stay within `share` of one denoiser's
    parameters (the paper's proportion), at least the smallest. SD-1.5 gets 128 (the paper's d)."""
    counts = {w: parameter_count(unet_config, n_models, w, denoiser_class) for w in WIDTHS}
    fits = [w for w, (agg, one) in counts.items() if agg <= share * one]
    return max(fits) if fits else WIDTHS[0]


def fresh_aggregators(
    unets: Sequence[nn.Module], hashes: Sequence[str], labels: Sequence[str], width: int | None = None, layers: int = 1
) -> AFAAggregators:
    """Zero-initialised aggregators (feature averaging) for these models, in this order, with
    `layers` transformer layers each; the default width is the one-layer rule of `default_width`
    whatever `layers` is, so 1 and 2 layers compare at one width."""
    check_same_denoisers(unets, labels)
    walker_for(unets[0]).check(unets[0])
    config = unet_config_of(unets[0])
    width = width or default_width(config, len(unets), denoiser_class=type(unets[0]))
    return AFAAggregators(
        **aggregator_kwargs(unets[0], len(unets), width, layers),
        models=list(hashes),
        labels=list(labels),
        unet_config=unet_fingerprint(unets[0]),
    )


def build_ensemble(denoisers: Sequence[nn.Module], aggregators: AFAAggregators, labels: Sequence[str] | None = None) -> nn.Module:
    """The ensemble of these denoisers, built by their walker: a `unet.AFAEnsemble` of UNets or
    an `mmdit.SD3Ensemble` of SD3 transformers (each has its members' call signature)."""
    if not denoisers:
        raise IncompatibleModelsError("AFA ensembles at least 2 models; got 0")
    return walker_for(denoisers[0]).ensemble(denoisers, aggregators, labels)
