"""Multi-LoRA composition at sampling time: LoRA Switch and LoRA Composite.

Zhong et al., "Multi-LoRA Composition for Image Generation" (arXiv 2402.16843, Sec. 3.2), and
the authors' reference code (maszhongming/Multi-LoRA-Composition: `callbacks.py` for Switch, the
`lora_composite` branch of `pipeline/pipeline_0.26.3.py` for Composite). Each of the N models is
one base with one LoRA (multifusion holds the base once and switches adapters per call), and each
model's guided prediction comes from its own classifier-free guidance, both branches with its
own adapters active:

    eps_i(x_t) = eps_i(x_t, uncond) + s_i (eps_i(x_t, c_i) - eps_i(x_t, uncond))

    LoRA Switch, step k = 0, 1, ... (0-based), period tau, turn order o (a permutation of 0..N-1):
        eps(x_t) = eps_{o[j]}(x_t),   j = floor(k / tau) mod N                  one model per step
    LoRA Composite:
        eps(x_t) = (1 / N) sum_i eps_i(x_t)                                    every model, every step

Composite is exactly `average` with equal weights (`average.weighted_average`), so it reuses
that maths: the reference code averages the unconditional and the conditional predictions over
the LoRAs and then applies one guidance scale, which by linearity equals the average of each
LoRA's guided prediction when the models share one prompt and guidance scale (it differs only
in float rounding).

Deviations:
- Switch: the reference code switches in a step-end callback when `step > 0 and step % tau == 0`,
  so its first LoRA runs tau + 1 steps and every later turn tau. Here every turn is tau steps,
  as the paper describes the switch ("every tau steps").
- The reference code encodes the prompt once, with the first LoRA's (Switch) or every LoRA's
  (Composite) text-encoder layers active; here each model encodes its own prompt with its own
  adapters, so a text-encoder LoRA conditions only its own model's predictions.
- Each model may have its own prompt, negative prompt and guidance scale (the recipe's), and any
  models sharing a latent space may take turns or be averaged, not only LoRAs of one base (with
  several checkpoints the memory is theirs; with LoRAs of one base it is one base plus N LoRAs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from multifusion.handles import NoiseFn


def switch_turn(step: int, tau: int, order: Sequence[int]) -> int:
    """The model active at 0-based `step`: order[floor(step / tau) mod len(order)]."""
    return order[(step // tau) % len(order)]


@dataclass(eq=False)
class Switch:
    """Noise function of LoRA Switch: call k (the loop calls a trajectory's noise function once
    per step, `loop.sample`) returns fns[switch_turn(k, tau, order)](x_t, t). Make one per
    sampling run: it counts the steps it has served. Only the active model is called."""

    fns: Sequence[NoiseFn]
    tau: int
    order: Sequence[int]
    step: int = field(default=0, init=False)

    def __post_init__(self):
        if self.tau < 1:
            raise ValueError(f"tau must be at least 1, got {self.tau}")
        if sorted(self.order) != list(range(len(self.fns))):
            raise ValueError(f"order {list(self.order)} is not a permutation of the {len(self.fns)} models' indices")

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        active = switch_turn(self.step, self.tau, self.order)
        self.step += 1
        if record is not None:
            record["switch/model"] = active  # which model this step used, for a step callback
        return self.fns[active](x_t, t, record)
