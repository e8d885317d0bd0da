"""K-LoRA: one subject LoRA and one style LoRA of a shared base, chosen per attention projection.

Ouyang, Li, Hou, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs",
CVPR 2025, arXiv 2502.18461 (Sec. 3), checked against the authors' reference code
(HVision-NKU/K-LoRA: `klora.py` for the choice, `utils.py` for gamma and the layers it hooks,
`inference_sd.py` / `inference_flux.py` for the constants).

For every attention projection l (to_q, to_k, to_v, to_out.0) where the LoRAs apply, with the
updates dW = s (alpha / r) B A of the subject (c) and the style (s) LoRA:

    S_c,l = sum of the K largest |dW_c,l| entries        S_s,l = the same for dW_s,l
    K     = r_c * r_s                                     (or the recipe's `k`)
    gamma = mean_l ( sum|dW_c,l| / sum|dW_s,l| )          (layers with a ratio >= 3 * mean dropped,
                                                           then the mean taken again)
    S(p)  = alpha * p + beta                              ("s": alpha 1.5, beta 0.5)
            (alpha * p + beta) mod alpha                  ("s*": beta 0.85 * alpha, the supplement's)
    layer l runs dW_c,l alone   if  S_c,l / gamma  >  S_s,l * S(p),   else dW_s,l alone

p is the sampling progress. The reference counts every K-LoRA layer call with a global counter
c and uses p = c / T, T = steps * (K-LoRA layer calls per denoiser call): 50 * 560 = 28000 for
SDXL's UNet at its default 50 steps (140 attention modules, 4 projections each; diffusers
batches the two CFG halves in one call), and `diffuse_step * layers` for FLUX. So layer j
(1-based, of L) in step i (0-based, of N) sees p = (i L + j) / (N L), within step i's
interval (i / N, (i + 1) / N]. Here the choice is made once per denoiser call, with the middle
of that interval, p = (i + 1/2) / N, for every layer (`step_progress`); N counts the loop's
denoiser calls (2n - 1 for Heun's n steps), as the reference's counter does.

Deviations:
- p is per denoiser call (above), not per layer call: within 1 / (2N) of the reference's.
- dW includes the adapter's own alpha / r and the recipe's scale (what the layer adds when it
  runs); the reference multiplies the raw up and down matrices (alpha = r, scale 1 for the
  diffusers-trained LoRAs it uses, so the same there).
- gamma is taken over the attention projections K-LoRA chooses on, per layer name, and over the
  layers where both updates are non-zero (a zero style update makes the reference's ratio
  infinite); with no such layer gamma is 1. The reference pairs every LoRA tensor of the two
  files by position.
- K larger than a matrix's entry count sums every entry (torch.topk would fail); a layer where
  only one LoRA applies treats the other's update as zero. Ties go to the style LoRA, as the
  reference's strict `> 1` does.
- Layers K-LoRA does not choose on (other denoiser layers a LoRA may touch, text encoders) run
  the base alone, as in the reference, which applies nothing but the attention projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from multifusion.lora import AdapterSet, _lora_layers

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections K-LoRA chooses on (the reference's four parts of each attention)."""
OUTLIER_FACTOR = 3.0
"""Layers whose subject/style ratio is at least this times the mean are left out of gamma (reference)."""


def topk_sum(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k largest |entries| of `delta` (any shape); every entry when k >= delta.numel().
    Returns a 0-d float32 tensor."""
    flat = delta.detach().abs().flatten().float()
    if k >= flat.numel():
        return flat.sum()
    return torch.topk(flat, k).values.sum()


def balance(subject_totals: Sequence[float], style_totals: Sequence[float]) -> float:
    """gamma: the mean over layers of sum|dW_c| / sum|dW_s| (one total per layer each), layers
    with a ratio >= 3 x the mean left out and the mean taken again. Layers where either total is
    zero give no ratio; with none left, 1."""
    ratios = [c / s for c, s in zip(subject_totals, style_totals) if c > 0 and s > 0]
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < OUTLIER_FACTOR * mean]
    return sum(kept) / len(kept)


def style_scale(progress: float, alpha: float = 1.5, beta: float = 0.5, wrap: bool = False) -> float:
    """S(p) = alpha p + beta at sampling progress p in [0, 1] ("s"); taken mod alpha when `wrap`
    ("s*")."""
    s = alpha * progress + beta
    return s % alpha if wrap else s


def step_progress(step: int, steps: int) -> float:
    """p for every layer of 0-based step `step` of `steps`: the middle of the reference's
    (step / steps, (step + 1) / steps]."""
    return (step + 0.5) / steps


def choose_subject(subject: torch.Tensor, style: torch.Tensor, gamma: float, scale: float) -> torch.Tensor:
    """True where the subject LoRA runs: subject / gamma > style * scale, elementwise over
    layers (subject, style: (L,) top-K sums). Ties and both zero go to the style."""
    return subject / gamma > style * scale


def delta_weight(layer: torch.nn.Module, adapter: str, weight: float) -> torch.Tensor | None:
    """dW (out, in) that peft layer `layer` adds for `adapter` at adapter weight `weight`
    (weight * alpha / r * B A, peft's own `get_delta_weight`), or None when it has no such
    adapter."""
    if adapter not in getattr(layer, "lora_A", {}):
        return None
    layer.set_scale(adapter, weight)
    with torch.no_grad():
        return layer.get_delta_weight(adapter).float()


@dataclass(eq=False)
class KLoraLayers:
    """The attention projections of one denoiser K-LoRA chooses on, their top-K sums (L,) for
    each LoRA, gamma, and the schedule; `progress` is set before each denoiser call."""

    layers: list[torch.nn.Module]
    names: list[str]
    subject: torch.Tensor  # (L,) S_c,l
    style: torch.Tensor  # (L,) S_s,l
    gamma: float
    alpha: float
    beta: float
    wrap: bool
    progress: float = 0.0

    def choices(self) -> torch.Tensor:
        """(L,) bool: True where layer l runs the subject LoRA at the current progress."""
        return choose_subject(self.subject, self.style, self.gamma, style_scale(self.progress, self.alpha, self.beta, self.wrap))


def measure(denoiser: torch.nn.Module, adapters: AdapterSet, k: int | None, alpha: float, beta: float, wrap: bool) -> KLoraLayers:
    """The K-LoRA layers of `denoiser` for `adapters` (exactly two: subject, style) with their
    top-K sums and gamma. K = r_c * r_s per layer when `k` is None. ValueError when no attention
    projection carries either LoRA."""
    (subject, style), (w_c, w_s) = adapters.names, adapters.weights
    layers, names, s_c, s_s, tot_c, tot_s = [], [], [], [], [], []
    for name, layer in denoiser.named_modules():
        # by name, whatever the attention class (diffusers' Attention, FLUX's own): the
        # reference's four parts (FLUX's single-stream blocks have no to_out)
        if not hasattr(layer, "lora_A") or not any(name.endswith("." + part) for part in PROJECTIONS):
            continue
        d_c, d_s = delta_weight(layer, subject, w_c), delta_weight(layer, style, w_s)
        if d_c is None and d_s is None:
            continue
        if d_c is None:
            d_c = torch.zeros_like(d_s)
        if d_s is None:
            d_s = torch.zeros_like(d_c)
        kk = k if k is not None else _rank(layer, subject) * _rank(layer, style)
        layers.append(layer)
        names.append(name)
        s_c.append(topk_sum(d_c, kk))
        s_s.append(topk_sum(d_s, kk))
        tot_c.append(float(d_c.abs().sum()))
        tot_s.append(float(d_s.abs().sum()))
    if not layers:
        raise ValueError("neither LoRA applies to an attention projection (to_q, to_k, to_v, to_out.0) of the denoiser")
    return KLoraLayers(layers, names, torch.stack(s_c), torch.stack(s_s), balance(tot_c, tot_s), alpha, beta, wrap)


def _rank(layer: torch.nn.Module, adapter: str) -> int:
    """The adapter's rank on `layer` (1 where it has none: K then counts the other's rank)."""
    return int(layer.r[adapter]) if adapter in layer.r else 1


@dataclass(frozen=True)
class KLoraAdapters(AdapterSet):
    """The subject and style LoRAs of one model, activated the K-LoRA way: on the denoiser, each
    chosen attention projection runs the LoRA `chosen.choices()` picks (at its weight) and every
    other peft layer the base alone; on any other module (text encoders) the base alone."""

    chosen: KLoraLayers | None = field(default=None, compare=False)

    def activate(self, module: torch.nn.Module) -> None:
        layers = _lora_layers(module)
        if not layers:
            return
        ours = {id(layer): j for j, layer in enumerate(self.chosen.layers)} if self.chosen is not None else {}
        mine = any(id(layer) in ours for layer in layers)
        picks = tuple(self.chosen.choices().tolist()) if mine else ()
        # A state no plain AdapterSet has: another model's set re-activates every layer after this.
        state = ("k-lora", id(self.chosen), picks)
        if getattr(module, "_active_adapter_set", None) == state:
            return
        (subject, style), (w_c, w_s) = self.names, self.weights
        for layer in layers:
            j = ours.get(id(layer))
            if j is None:
                layer.set_adapter([])
                continue
            name, weight = (subject, w_c) if picks[j] else (style, w_s)
            if name in layer.lora_A:
                layer.set_adapter([name])
                layer.set_scale(name, weight)
            else:  # this LoRA does not touch the layer: its update is zero
                layer.set_adapter([])
        module._active_adapter_set = state
