"""Model handles: one denoiser, how to condition it, and its classifier-free guidance.

A handle is the edge where models differ: its own tokenizer and text encoder, its own
prediction type (v-prediction is converted to epsilon at the edge, once, so no combiner ever sees
v), its own guidance scale and negative prompt. What leaves a handle is a *noise function*
``(x_t, t) -> eps``, the one callable every combiner takes and returns.

`ModelHandle` is the interface; each model family (`multifusion.families`) is one subclass.
`Guided` (a model conditioned on prompts), `predict_together` (several conditionings of one
model, or of LoRA models of one base, in one call), `predict_many` / `call_all` (the models of a
combiner grouped into such calls) and `cfg` work on any family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from multifusion.lora import per_sample_adapters, per_sample_names


class NoiseFn(Protocol):
    """``(x_t, t, record=None) -> eps``: epsilon prediction for latents ``x_t`` (B, C, H, W),
    already scaled by ``scheduler.scale_model_input``, at scheduler timestep ``t``.

    ``record``, when a dict, collects named tensors for the step callback (masks, maps)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict[str, Any] | None = None) -> torch.Tensor: ...


class Offloader:
    """Keeps at most one registered module on the accelerator; the others wait on the CPU.

    `activate(module)` moves the previously active module to the CPU and `module` to `device`.
    This is diffusers' model offload reduced to its rule, so it also covers several UNets:
    while model A denoises, model B's weights stay in host memory. `move` is injectable so the
    rule can be tested on a machine without an accelerator.
    """

    def __init__(self, device: torch.device | str, move: Callable[[torch.nn.Module, Any], Any] | None = None):
        self.device = torch.device(device)
        self.active: torch.nn.Module | None = None
        self._move = move or (lambda module, device: module.to(device))

    def activate(self, module: torch.nn.Module) -> None:
        if module is self.active:
            return
        if self.active is not None:
            self._move(self.active, torch.device("cpu"))
        self._move(module, self.device)
        self.active = module


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What a denoiser is conditioned on for a batch of B prompts, batch first.

    `embeds` (B, L, D) is the text encoder's sequence (cross-attention context); `extra` holds
    the further batch-first tensors a model family needs (e.g. a pooled text embedding (B, P)),
    passed to the handle's `eps` untouched. Conditionings concatenate and slice along the batch,
    so several conditionings of one model run in one denoiser call (`predict_together`).
    """

    embeds: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for key, value in self.extra.items():
            if value.shape[0] != self.embeds.shape[0]:
                raise ValueError(f"conditioning {key!r} has batch {value.shape[0]}, embeds have {self.embeds.shape[0]}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, rows: slice) -> Conditioning:
        return Conditioning(self.embeds[rows], {k: v[rows] for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(self.embeds.to(device), {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Stack conditionings of one model along the batch (all must carry the same extras)."""
        keys = set(parts[0].extra)
        if any(set(p.extra) != keys for p in parts):
            raise ValueError(
                "conditionings to batch together carry different extras: "
                + ", ".join(sorted({k for p in parts for k in p.extra}))
            )
        return Conditioning(
            torch.cat([p.embeds for p in parts]), {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra}
        )


@dataclass(eq=False)
class ModelHandle:
    """One loaded text-to-image model: its denoiser and its conditioning.

    Components may be shared objects between handles (same text encoder or VAE weights are held
    once; see `multifusion.loading`).
    """

    name: str
    unet: torch.nn.Module  # the denoiser (a UNet, or a transformer in families that use one)
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    offloader: Offloader | None = None
    # The LoRAs this model runs with on a base it may share with other handles
    # (`multifusion.lora.AdapterSet`): activated on each shared module right before it runs.
    adapters: Any = None
    quantize: Any = None  # the `recipe.Quantize` it was loaded with (recorded in the recipes of its runs), or None

    # What a family answers (each family module in `multifusion.families` sets these): the
    # diffusers pipeline class it is built from, its modules that hold weights (shared between
    # handles when equal, counted by `held_bytes`), the space `eps` returns and the trajectories of
    # the family run in ("epsilon" on DDPM schedules, "velocity" for flow matching, docs/flow.md;
    # models of different spaces never meet), its name in messages, the denoiser's folder in a
    # pipeline folder, and whether it takes a true-CFG scale and a scheduler eta.
    pipeline_class: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder")
    prediction_space: ClassVar[str] = "epsilon"
    family_name: ClassVar[str] = ""
    denoiser_folder: ClassVar[str] = "unet"
    takes_true_cfg: ClassVar[bool] = False
    takes_eta: ClassVar[bool] = True
    t5_component: ClassVar[str | None] = None  # the T5 encoder's component name, where the family has one

    # What a family computes (each family module defines these; docs in `multifusion.families`).
    load_kwargs: ClassVar[dict[str, Any]] = {}
    single_file: ClassVar[bool] = False
    denoiser_class: ClassVar[str] = ""  # the diffusers class of the denoiser

    @classmethod
    def build_denoiser(cls, config: dict) -> torch.nn.Module:
        """The family's denoiser built from `config` (on the current default device: `meta`
        counts parameters without storage, as `multifusion.memory` does)."""
        import diffusers

        return getattr(diffusers, cls.denoiser_class)(**config)

    @classmethod
    def example_inputs(cls, config: dict, batch: int, latent: tuple[int, int, int], tokens: int) -> dict[str, Any]:
        """Random keyword inputs of one denoiser call on `batch` latents `latent` (C, h, w) with a
        text sequence of `tokens`, shaped as this family's handle passes them (for memory traces)."""
        raise NotImplementedError

    @classmethod
    def config_facts(cls, denoiser: dict) -> tuple[int, int, int]:
        """(latent channels, patch side in latent pixels, native image side in latent pixels)
        from the denoiser's config.json (read before loading, or the loaded denoiser's)."""
        raise NotImplementedError

    @classmethod
    def schedule_table(cls, scheduler_config: Any) -> torch.Tensor:
        """alpha_bar of every position of the family's timestep axis (T,)."""
        raise NotImplementedError

    @classmethod
    def pipeline_parts(cls, pipe: Any) -> dict[str, Any]:
        """The handle's fields taken from a loaded pipeline of `pipeline_class`: its denoiser (the
        pipeline's `denoiser_folder` component, a UNet or a transformer) as `unet`, every other
        component by its name, and each text encoder's tokenizer (`text_encoder_2` ->
        `tokenizer_2`). Families with further fields extend this."""
        parts = {"unet": getattr(pipe, cls.denoiser_folder)}
        for name in cls.components[1:]:
            parts[name] = getattr(pipe, name)
            if name.startswith("text_encoder"):
                tokenizer = "tokenizer" + name.removeprefix("text_encoder")
                parts[tokenizer] = getattr(pipe, tokenizer)
        return parts

    def modules(self) -> dict[str, torch.nn.Module]:
        """The weight-holding modules by component name (optional ones left out when absent)."""
        return {kind: getattr(self, kind) for kind in self.components if getattr(self, kind) is not None}

    def quantized_components(self) -> list[str]:
        """The components holding quantized weights (`holds_quantized`), by name."""
        return [kind for kind, module in self.modules().items() if holds_quantized(module)]

    def scheduler(self, name: str, latent_hw: tuple[int, int]):
        """A fresh scheduler of kind `name` on this model's schedule, for latents of `latent_hw`
        (families whose schedule depends on the image size use it)."""
        raise NotImplementedError

    # --- facts used to check that models can meet ------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return self.config_facts(dict(self.unet.config))[0]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def patch_px(self) -> int:
        """The pixel grid of canvas sizes and region boxes (the VAE factor; times the
        transformer's patch size for patch-based denoisers)."""
        return self.vae_scale_factor * self.config_facts(dict(self.unet.config))[1]

    @property
    def native_px(self) -> int:
        """The model's native image side in pixels (the default canvas)."""
        return self.config_facts(dict(self.unet.config))[2] * self.vae_scale_factor

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar of every training timestep (the family's `schedule_table`), computed once."""
        if not hasattr(self, "_alphas_cumprod"):
            self._alphas_cumprod = self.schedule_table(self.scheduler_config)
        return self._alphas_cumprod

    def _on_device(self, module: torch.nn.Module) -> None:
        """Make `module` ready to run for this model: on its device (under offload) and, on a base
        shared by models differing in LoRAs, with this model's adapters active. Every family calls
        it right before running a component."""
        if self.offloader is not None:
            self.offloader.activate(module)
        if self.adapters is not None:
            self.adapters.activate(module)

    # --- conditioning -------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The conditioning of `prompts` (batch first), as the family's diffusers pipeline
        computes it."""
        raise NotImplementedError

    def guide(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 7.5,
        batch_size: int = 1,
    ) -> Guided:
        """A noise function for this model, conditioned on `prompt` with its own guidance."""
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one per prompt or a single string"
            )
        positive = self.encode_prompt(prompts)
        return Guided(self, positive, self.encode_negative(negatives, positive), float(guidance_scale), prompts)

    def encode_negative(self, negatives: list[str], positive: Conditioning) -> Conditioning:
        """The unconditional conditioning for classifier-free guidance, given the positive one
        (families that zero out empty negative prompts, as SDXL does, override this)."""
        return self.encode_prompt(negatives)

    def for_window(self, cond: Conditioning, box: tuple[int, int, int, int], canvas: tuple[int, int]) -> Conditioning:
        """`cond` for denoising the latent window box = (r0, r1, c0, c1) of a canvas (H, W) in
        latent pixels (a Mixture-of-Diffusers region). The text does not depend on where the
        window lies, so this is `cond` itself; families conditioned on the crop (SDXL's
        micro-conditioning) override it."""
        return cond

    def denoiser_kwargs(self, x_t: torch.Tensor, cond: Conditioning, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of the denoiser call beyond the latents, timestep and text sequence,
        built from `cond.extra` on `device` (none for Stable Diffusion 1.x/2.x)."""
        return {}

    def ready_vae(self, device: str | torch.device | None = None) -> torch.nn.Module:
        """The VAE, ready to run: moved to `device` when one is given (in float32 on the CPU,
        where half precision is slow or missing), else where this handle runs its models
        (brought onto the accelerator under offload)."""
        if device is not None:
            device = torch.device(device)
            self.vae.to(device, torch.float32 if device.type == "cpu" else self.dtype)
        elif self.offloader is not None:
            self.offloader.activate(self.vae)
        return self.vae

    # --- denoising ---------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One denoiser call in the family's prediction space: x_t (B, C, H, W) float32, `cond`
        of batch B; returns (B, C, H, W) float32."""
        raise NotImplementedError


def holds_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds quantized weights: loaded with a quantization config (diffusers and
    transformers mark such models `is_quantized`) or quantized in place (its parameters are tensor
    subclasses: torchao's, bitsandbytes')."""
    if getattr(module, "is_quantized", False):
        return True
    return any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in module.parameters())


def stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding `t`'s data: itself, or for a quantized tensor subclass (torchao's) the
    inner tensors it is made of (its int8 values and scales: the subclass itself reports the
    storage of the full-precision tensor it stands for)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for n in names if getattr(t, n, None) is not None for leaf in stored_tensors(getattr(t, n))]


def cfg(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in eps space, u + s (c - u), all (B, C, H, W). At s = 1 it is
    c itself (u + 1 * (c - u) would differ in the last bit). Deviation: diffusers turns guidance
    off for s <= 1; here s in [0, 1) interpolates towards u (s = 0 is the unconditional model)."""
    return cond if guidance_scale == 1.0 else uncond + guidance_scale * (cond - uncond)


@dataclass(eq=False)
class GuidedPrediction:
    """The parts of one classifier-free-guided prediction, all (B, C, H, W) in eps space."""

    eps: torch.Tensor  # u + s (c - u)
    uncond: torch.Tensor | None  # u (None when guidance_scale == 1 and it was not asked for)
    cond: torch.Tensor  # c
    guidance_scale: float

    @property
    def response(self) -> torch.Tensor:
        """s (c - u): the guidance response MagicFusion's salience is built from."""
        if self.uncond is None:
            raise ValueError("the unconditional prediction was not computed; call predict(..., need_uncond=True)")
        return self.guidance_scale * (self.cond - self.uncond)


@dataclass(eq=False)
class Guided:
    """A model conditioned on a batch of prompts: the basic noise function.

    Unconditional and conditional halves run as one batch of 2B, as diffusers does; at
    guidance scale 1 only the conditional half runs (as diffusers does) unless asked for.
    """

    handle: ModelHandle
    positive: Conditioning  # batch B
    negative: Conditioning  # batch B
    guidance_scale: float
    prompts: list[str]

    @property
    def batch_size(self) -> int:
        return len(self.positive)

    def windowed(self, box: tuple[int, int, int, int], canvas: tuple[int, int]) -> Guided:
        """This conditioning for the latent window `box` of a canvas (see `ModelHandle.for_window`)."""
        h = self.handle
        return Guided(
            h,
            h.for_window(self.positive, box, canvas),
            h.for_window(self.negative, box, canvas),
            self.guidance_scale,
            self.prompts,
        )

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, need_uncond: bool = False) -> GuidedPrediction:
        return predict_together([self], [x_t], t, need_uncond)[0]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        return self.predict(x_t, t).eps


def shared_base(a: ModelHandle, b: ModelHandle) -> bool:
    """Whether two handles are one model or models differing only in LoRAs on one held base: the
    same denoiser object (not compiled: a compiled graph holds no per-sample adapters), family,
    dtype, device, offloader and schedule (so `eps` converts their outputs alike)."""
    return a is b or (
        a.unet is b.unet
        and type(a) is type(b)
        and not hasattr(a.unet, "_orig_mod")
        and (a.dtype, a.device, a.offloader) == (b.dtype, b.device, b.offloader)
        and a.scheduler_config == b.scheduler_config
    )


def predict_together(
    guided: Sequence[Guided], xs: Sequence[torch.Tensor], t: torch.Tensor, need_uncond: bool = False
) -> list[GuidedPrediction]:
    """Guided predictions of several conditioned copies of ONE model, or of models of one base
    differing in their LoRAs (`shared_base`, each with at most one LoRA: `lora.per_sample_names`),
    each on its own input xs[i] (B_i, C, H, W) of one size, in one denoiser call: unconditional
    halves first, then conditional, as diffusers batches CFG. When every guidance scale is 1 and
    the unconditional prediction is not asked for, only the conditional half runs."""
    handle = guided[0].handle
    if any(not shared_base(g.handle, handle) for g in guided):
        raise ValueError("predict_together takes conditioned copies of one model (or of one base); group inputs by model first")
    mixed = None
    if any(g.handle is not handle for g in guided):
        mixed = per_sample_names([g.handle.adapters for g in guided], handle.unet)
        if mixed is None:
            raise ValueError(
                "predict_together: these models of one base run several LoRAs, one LoRA at two weights or a DoRA adapter"
            )
    x = torch.cat(list(xs))
    cond = Conditioning.cat([g.positive for g in guided])
    halves = 1 if not need_uncond and all(g.guidance_scale == 1.0 for g in guided) else 2
    mixing = contextlib.nullcontext()
    if mixed is not None:
        names = [n for n, xi in zip(mixed[0], xs) for _ in range(xi.shape[0])] * halves
        mixing = per_sample_adapters(handle.unet, names, mixed[1])
    with mixing:
        if halves == 1:
            c_all, u_all = handle.eps(x, t, cond), None
        else:
            uncond = Conditioning.cat([g.negative for g in guided])
            u_all, c_all = handle.eps(torch.cat([x, x]), t, Conditioning.cat([uncond, cond])).chunk(2)
    out, start = [], 0
    for g, xi in zip(guided, xs):
        n = xi.shape[0]
        c = c_all[start : start + n]
        u = None if u_all is None else u_all[start : start + n]
        out.append(GuidedPrediction(c if u is None else cfg(u, c, g.guidance_scale), u, c, g.guidance_scale))
        start += n
    return out


def predict_many(
    guided: Sequence[Guided], x_t: torch.Tensor, t: torch.Tensor, need_uncond: bool = False
) -> list[GuidedPrediction]:
    """`[g.predict(x_t, t, need_uncond) for g in guided]`, with the models that can share a
    denoiser call (`predict_together`: one model's copies, or models of one base each running at
    most one LoRA) in one call per base; the others one by one. The maths is the same; only the
    batch the denoiser sees changes (its float rounding may differ in the last bits). One model
    given twice with the same conditioning (an SNB of a model with itself) is predicted once, so
    a model fused with itself is that model bit for bit."""
    key = [(id(g.handle), id(g.positive), id(g.negative), g.guidance_scale) for g in guided]
    first = {k: i for i, k in reversed(list(enumerate(key)))}  # each model and conditioning's first place
    groups: list[list[int]] = []  # each one call: the first group each model fits, in order
    for i, g in enumerate(guided):
        if first[key[i]] != i:
            continue
        group = next((grp for grp in groups if _joins([guided[j] for j in grp], g)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    out: list[GuidedPrediction | None] = [None] * len(guided)
    for group in groups:
        for i, p in zip(group, predict_together([guided[i] for i in group], [x_t] * len(group), t, need_uncond)):
            out[i] = p
    for i in range(len(guided)):
        out[i] = out[first[key[i]]]
    return out  # type: ignore[return-value]


def _joins(members: list[Guided], g: Guided) -> bool:
    """Whether `g` can share `members`' denoiser call (`predict_together`)."""
    if not shared_base(members[0].handle, g.handle):
        return False
    if all(m.handle is g.handle for m in members):
        return True
    return per_sample_names([m.handle.adapters for m in members] + [g.handle.adapters], g.handle.unet) is not None


def call_all(fns: Sequence[NoiseFn], x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> list[torch.Tensor]:
    """`[f(x_t, t, record) for f in fns]`, the guided models among them (`Guided`) through
    `predict_many`, so copies of one model and LoRA models of one base share denoiser calls."""
    guided = [i for i, f in enumerate(fns) if type(f) is Guided]
    preds = dict(zip(guided, predict_many([fns[i] for i in guided], x_t, t))) if len(guided) > 1 else {}
    return [preds[i].eps if i in preds else f(x_t, t, record) for i, f in enumerate(fns)]
