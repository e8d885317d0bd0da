"""Model handles: one denoiser, how to condition it, and its classifier-free guidance.

A handle is the edge where models differ: its own tokenizer and text encoder, its own
prediction type (v-prediction is converted to epsilon here, once, so no combiner ever sees v),
its own guidance scale and negative prompt. What leaves a handle is a *noise function*
``(x_t, t) -> eps``, the one callable every combiner takes and returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

from multifusion.errors import IncompatibleModelsError


class NoiseFn(Protocol):
    """``(x_t, t, record=None) -> eps``: epsilon prediction for latents ``x_t`` (B, C, H, W),
    already scaled by ``scheduler.scale_model_input``, at scheduler timestep ``t``.

    ``record``, when a dict, collects named tensors for the step callback (masks, maps)."""

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, record: dict[str, Any] | None = None
    ) -> torch.Tensor: ...


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


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar(t) for integer or fractional timesteps t (any shape).

    Fractional t (Euler-type schedules) interpolate log sigma linearly, sigma = sqrt((1-a)/a),
    as k-diffusion's discrete-schedule wrapper does; integer t index the table exactly.
    """
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    a = alphas_cumprod.to(torch.float64)
    log_sigma = 0.5 * torch.log((1 - a) / a)
    lo = t.floor().long()
    hi = t.ceil().long()
    w = t - lo
    ls = (1 - w) * log_sigma[lo] + w * log_sigma[hi]
    exact = a[lo]
    return torch.where(w == 0, exact, 1 / (1 + torch.exp(2 * ls)))


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps from a v-prediction: with x_t = sqrt(a) x0 + sqrt(1-a) eps and
    v = sqrt(a) eps - sqrt(1-a) x0, eps = sqrt(a) v + sqrt(1-a) x_t (Salimans & Ho 2022).
    `x_t` is the variance-preserving latent, i.e. the UNet's (scaled) input."""
    a = alpha_bar.to(v.dtype)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


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

    def __getitem__(self, rows: slice) -> "Conditioning":
        return Conditioning(self.embeds[rows], {k: v[rows] for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> "Conditioning":
        return Conditioning(self.embeds.to(device), {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Stack conditionings of one model along the batch (all must carry the same extras)."""
        keys = set(parts[0].extra)
        if any(set(p.extra) != keys for p in parts):
            raise ValueError("conditionings to batch together carry different extras: " + ", ".join(sorted({k for p in parts for k in p.extra})))
        return Conditioning(torch.cat([p.embeds for p in parts]), {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})


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

    # The diffusers pipeline class this handle is built from, and its modules that hold weights
    # (shared between handles when equal, counted by `held_bytes`). Families extend both.
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder")
    # What `eps` returns, the space the trajectories of this family run in: "epsilon" (DDPM
    # schedules) or "velocity" (flow matching, docs/flow.md); models of different spaces never meet.
    prediction_space: ClassVar[str] = "epsilon"
    family_name: ClassVar[str] = "Stable Diffusion 1.x/2.x"

    denoiser_folder: ClassVar[str] = "unet"  # the denoiser's folder in a pipeline folder

    @classmethod
    def config_facts(cls, denoiser: dict) -> tuple[int, int]:
        """(latent channels, patch side in latent pixels) from the denoiser's config.json, read
        before loading."""
        return int(denoiser.get("in_channels", 4)), 1

    @classmethod
    def pipeline_parts(cls, pipe: Any) -> dict[str, Any]:
        """The handle's fields taken from a loaded pipeline of `pipeline_class`."""
        return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}

    def modules(self) -> dict[str, torch.nn.Module]:
        """The weight-holding modules by component name (optional ones left out when absent)."""
        return {kind: getattr(self, kind) for kind in self.components if getattr(self, kind) is not None}

    def scheduler(self, name: str, latent_hw: tuple[int, int]):
        """A fresh scheduler of kind `name` on this model's schedule, for latents of `latent_hw`
        (families whose schedule depends on the image size use it)."""
        from multifusion.schedulers import make_scheduler

        return make_scheduler(name, self.scheduler_config)

    # --- facts used to check that models can meet ------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

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
        return self.vae_scale_factor

    @property
    def native_px(self) -> int:
        """The model's native image side in pixels (the default canvas)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDPMScheduler

        if not hasattr(self, "_alphas_cumprod"):
            sched = DDPMScheduler.from_config(self.scheduler_config)
            self._alphas_cumprod = sched.alphas_cumprod.clone()
        return self._alphas_cumprod

    def _on_device(self, module: torch.nn.Module) -> None:
        if self.offloader is not None:
            self.offloader.activate(module)

    # --- conditioning -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The conditioning for `prompts`: text embeddings (B, L, D) as diffusers'
        StableDiffusionPipeline computes them (padded to the tokenizer's max length, truncated,
        attention mask only where the text encoder's config asks for it, last hidden state).
        Model families with further conditioning override this and `eps`."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        self._on_device(self.text_encoder)
        dev = self.offloader.device if self.offloader else self.device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(dev)
        embeds = self.text_encoder(tok.input_ids.to(dev), attention_mask=mask)[0]
        return Conditioning(embeds.to(dtype=self.dtype))

    def guide(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 7.5,
        batch_size: int = 1,
    ) -> "Guided":
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
    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call converted to epsilon. x_t (B, C, H, W) float32, `cond` of batch B;
        returns eps (B, C, H, W) float32."""
        self._on_device(self.unet)
        dev = self.offloader.device if self.offloader else self.device
        out = self.unet(
            x_t.to(dev, self.dtype), t, encoder_hidden_states=cond.embeds.to(dev), return_dict=False,
            **self.denoiser_kwargs(x_t, cond, dev),
        )[0].to(x_t.device, torch.float32)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, x_t, alpha_bar_at(self.alphas_cumprod, t).to(x_t.device, torch.float32))
        elif self.prediction_type != "epsilon":
            raise IncompatibleModelsError(
                f"model {self.name!r} predicts {self.prediction_type!r}; only 'epsilon' and 'v_prediction' models can be combined"
            )
        return out


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

    def windowed(self, box: tuple[int, int, int, int], canvas: tuple[int, int]) -> "Guided":
        """This conditioning for the latent window `box` of a canvas (see `ModelHandle.for_window`)."""
        h = self.handle
        return Guided(h, h.for_window(self.positive, box, canvas), h.for_window(self.negative, box, canvas),
                      self.guidance_scale, self.prompts)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, need_uncond: bool = False) -> GuidedPrediction:
        return predict_together([self], [x_t], t, need_uncond)[0]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        return self.predict(x_t, t).eps


def predict_together(
    guided: Sequence[Guided], xs: Sequence[torch.Tensor], t: torch.Tensor, need_uncond: bool = False
) -> list[GuidedPrediction]:
    """Guided predictions of several conditioned copies of ONE model, each on its own input
    xs[i] (B_i, C, H, W) of one size, in one UNet call: unconditional halves first, then
    conditional, as diffusers batches CFG. When every guidance scale is 1 and the unconditional
    prediction is not asked for, only the conditional half runs."""
    handle = guided[0].handle
    if any(g.handle is not handle for g in guided):
        raise ValueError("predict_together takes conditioned copies of one model; group inputs by model first")
    x = torch.cat(list(xs))
    cond = Conditioning.cat([g.positive for g in guided])
    if not need_uncond and all(g.guidance_scale == 1.0 for g in guided):
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


def check_same_latent_space(handles: list[ModelHandle]) -> None:
    """Raise IncompatibleModelsError unless all handles share latent channels, VAE factor,
    VAE scaling factor and noise schedule: the conditions for meeting at noise or latent level."""
    base = handles[0]
    for h in handles[1:]:
        if base.prediction_space != h.prediction_space or (
                "velocity" in (base.prediction_space, h.prediction_space) and base.family_name != h.family_name):
            raise IncompatibleModelsError(
                f"models {base.name!r} ({base.family_name}) and {h.name!r} ({h.family_name}) live in different latent "
                f"spaces (different VAEs) and predict {base.prediction_space} vs {h.prediction_space} on different noise "
                "schedules: they cannot meet at noise or latent level; fuse models of one family"
            )
        for what, a, b in (
            ("latent channels", base.latent_channels, h.latent_channels),
            ("VAE downsampling factor", base.vae_scale_factor, h.vae_scale_factor),
            ("VAE scaling_factor", round(base.scaling_factor, 6), round(h.scaling_factor, 6)),
            ("VAE shift_factor", round(base.shift_factor, 6), round(h.shift_factor, 6)),
            ("num_train_timesteps", len(base.alphas_cumprod), len(h.alphas_cumprod)),
        ):
            if a != b:
                kinds = f" ({base.name!r} is {base.family_name}, {h.name!r} {h.family_name}: different VAEs)" \
                    if base.family_name != h.family_name else ""
                raise IncompatibleModelsError(
                    f"models {base.name!r} and {h.name!r} differ in {what} ({a} vs {b}){kinds}: their latents "
                    "cannot be combined; use models fine-tuned from the same base (same VAE and schedule)"
                )
        if not torch.allclose(base.alphas_cumprod, h.alphas_cumprod, atol=1e-6):
            raise IncompatibleModelsError(
                f"models {base.name!r} and {h.name!r} use different noise schedules (betas); "
                "a timestep would mean different noise levels for them"
            )
