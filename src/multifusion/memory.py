"""Accelerator and host memory of a fused run, computed from the models' published configs
(nothing downloaded, no weights read), for SDXL, SD3.5 and FLUX.1.

Unit: GiB (2**30 bytes) everywhere. A card sold as "N GB" is taken to hold N GiB (the driver
reports about that much for 12, 24 and 80 GB cards).

Parameters: each component is instantiated on the `meta` device (shapes only) and its
parameters counted (`count_parameters`). Weights take 2 bytes a parameter (float16 or bfloat16).

Activations: one forward pass under torch's `FakeTensorMode` (tensors with shapes and no
storage), tracked by `torch.distributed._tools.mem_tracker.MemTracker`, gives the largest sum of
live activation tensors during one denoiser call and during one VAE decode
(`activation_peaks`). Attention is counted as a fused kernel (PyTorch's scaled-dot-product
attention, which does not materialise the score matrix), so these peaks are floors: kernel
workspaces, the CUDA context (~0.3-0.5 GiB) and allocator fragmentation come on top.

Residency follows how runs load models (`multifusion.loading`, `handles.Offloader`;
`device_bytes`):
- without offload every model's denoiser, the text encoders and the VAE are on the device; the
  text encoders and VAE are held once when the fine-tunes share them (`share_components` holds
  identical weights once), once per model when each has its own; the peak adds the larger of
  one denoiser call's and the VAE decode's activations (they never run together);
- with offload one module is on the device at a time: the peak is the largest of (one denoiser
  + its activations), (one text encoder) and (the VAE + its decode), whatever the number of
  models; host memory then holds everything (`host_bytes`);
- `runtime.vae_device: cpu` takes the VAE and its decode off the device.

Fit rule (`fits`): the peak is at most 90 % of the card; the other 10 % is kept for what the
floors leave out (CUDA context, kernel workspaces, fragmentation).

Quantized weights (`quantized`, docs/quantization.md): the weights of the linear layers (every
`nn.Linear` of the denoiser and of T5, counted on the meta device) take the format's bytes per
weight (`QUANT_FORMATS`, scales included); every other parameter (convolutions, norms, embeddings,
biases) stays in bfloat16, as torchao, bitsandbytes and the GGUF files of FLUX keep them.
Activations are unchanged (the layers compute in bfloat16).

One model per device (`models[i].device`): each card holds its model's denoiser, text encoders
and activations, and the first card the VAE too (`device_bytes` of one model on each).

Models as one base + LoRAs (`multifusion.lora`: the base loaded once, each model's adapters
activated before its call): the denoiser is held once with every LoRA injected, so N such models
hold one denoiser of `lora_parameters` more per LoRA (`with_loras`), the text encoders and VAE once.
A LoRA's size is counted on the meta device from the published config: rank r on a Linear layer
of in x out weights adds r (in + out) parameters (A: r x in, B: out x r; peft's layout), summed
over the layers its target modules name (`LORA_TARGETS`, matched as peft matches
`target_modules`: the module's name or its last dotted parts). The denoiser call's activations
are counted with the adapters in the forward (`denoiser_activations(lora=...)`): peft adds each
low-rank product to the base layer's output.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from multifusion.families import FluxHandle, SD3Handle, SDXLHandle
from multifusion.handles import ModelHandle

# --- published configs ---------------------------------------------------------------------------
# The diffusers folders' config.json of stabilityai/stable-diffusion-xl-base-1.0,
# stabilityai/stable-diffusion-3.5-large and -medium, black-forest-labs/FLUX.1-dev. SDXL fine-tunes
# (Pony, Illustrious, NoobAI, Juggernaut, ...) keep SDXL base's shapes.

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from diffusers' defaults)
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    sample_size=64,
)
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
)
SD35_LARGE = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
VAE_16 = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Text towers: CLIP ViT-L/14, OpenCLIP ViT-bigG/14, T5 v1.1 XXL (encoder only).
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)

GiB = 2**30
BYTES_PER_PARAM = 2  # float16 / bfloat16 weights and activations
DTYPE = torch.bfloat16
RESERVE = 0.10  # of the card, kept free by `fits`


@dataclass(frozen=True)
class Published:
    """The shapes of one published model: its family (`multifusion.families`, which builds the
    denoiser and its inputs), the denoiser's config, and its other components as (kind, config),
    kinds "clip", "clip_projection", "t5" (text encoders)."""

    family: type[ModelHandle]
    denoiser: dict[str, Any]
    text_encoders: dict[str, tuple[str, dict[str, Any]]]  # display name -> component
    vae: dict[str, Any]  # AutoencoderKL config
    guidance_batch: int  # denoiser inputs per image: 2 with classifier-free guidance, 1 guidance-distilled
    text_tokens: int  # length of the text sequence the denoiser attends to (the pipelines' defaults)


PUBLISHED: dict[str, Published] = {
    "SDXL base": Published(
        SDXLHandle,
        SDXL_UNET,
        {"CLIP ViT-L": ("clip", CLIP_L), "OpenCLIP bigG": ("clip_projection", CLIP_G)},
        SDXL_VAE,
        guidance_batch=2,
        text_tokens=77,
    ),
    "SD3.5 Large": Published(
        SD3Handle,
        SD35_LARGE,
        {"CLIP ViT-L": ("clip_projection", CLIP_L), "OpenCLIP bigG": ("clip_projection", CLIP_G), "T5-XXL": ("t5", T5_XXL)},
        VAE_16,
        guidance_batch=2,
        text_tokens=77 + 256,
    ),
    "SD3.5 Medium": Published(
        SD3Handle,
        SD35_MEDIUM,
        {"CLIP ViT-L": ("clip_projection", CLIP_L), "OpenCLIP bigG": ("clip_projection", CLIP_G), "T5-XXL": ("t5", T5_XXL)},
        VAE_16,
        guidance_batch=2,
        text_tokens=77 + 256,
    ),
    # FLUX.1 dev is guidance-distilled: one pass per step (2 with true CFG, `true_cfg_scale` > 1)
    "FLUX.1 dev": Published(
        FluxHandle,
        FLUX_DEV,
        {"CLIP ViT-L": ("clip", CLIP_L), "T5-XXL": ("t5", T5_XXL)},
        VAE_16,
        guidance_batch=1,
        text_tokens=512,
    ),
}


def build(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    """The diffusers / transformers module of a component ("vae" or a text-encoder kind as in
    `Published`), on the current default device and dtype."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if kind == "vae":
        return AutoencoderKL(**config)
    if kind == "t5":
        return T5EncoderModel(T5Config(**config))
    return {"clip": CLIPTextModel, "clip_projection": CLIPTextModelWithProjection}[kind](CLIPTextConfig(**config))


def count_parameters(kind: str, config: dict[str, Any]) -> int:
    """Parameters of a component, built on the meta device (no storage, no initialisation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(kind, config).parameters())


def denoiser_parameters(model: Published) -> int:
    """Parameters of a published model's denoiser, built on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in model.family.build_denoiser(model.denoiser).parameters())


LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # diffusers' train_dreambooth_lora_sdxl.py default: every attention's projections (attn1, attn2)
    "UNet2DConditionModel": ("to_q", "to_k", "to_v", "to_out.0"),
    # the attention projections of both streams (image: to_*, text: add_*_proj, to_add_out); LoRAs
    # trained on the feed-forwards too are larger than these
    "SD3Transformer2DModel": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "FluxTransformer2DModel": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}
"""The modules a typical LoRA adapts, by the denoiser's diffusers class: the attention projections."""
LORA_RANKS = (16, 32)  # the ranks the tables state; a LoRA's size is linear in its rank


def lora_layers(module: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """{name: layer} of the `nn.Linear` layers of `module` that `targets` name, matched as peft
    matches a list of `target_modules`: the full name equals a target or ends with "." + target."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    }


def lora_parameters(module: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of one rank-`rank` LoRA on the `targets` of `module`: r (in + out) per layer."""
    return sum(rank * (m.in_features + m.out_features) for m in lora_layers(module, targets).values())


def denoiser_lora_parameters(model: Published, rank: int) -> int:
    """`lora_parameters` of a rank-`rank` LoRA on a published denoiser's `LORA_TARGETS`, built on the
    meta device."""
    with torch.device("meta"):
        denoiser = model.family.build_denoiser(model.denoiser)
    return lora_parameters(denoiser, rank, LORA_TARGETS[type(denoiser).__name__])


def inject_lora(denoiser: torch.nn.Module, rank: int, name: str = "lora") -> None:
    """A rank-`rank` peft LoRA named `name` on `denoiser`'s `LORA_TARGETS` (alpha = rank), as
    diffusers' `load_lora_weights` injects one."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(LORA_TARGETS[type(denoiser).__name__])
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), denoiser, adapter_name=name)


def _fake_copy(module: torch.nn.Module) -> torch.nn.Module:
    """`module` (on the meta device) with every parameter and buffer replaced in place by an empty
    tensor of its shape and dtype made under the active `FakeTensorMode` (peft cannot inject into a
    module built under fake tensors: its adapters' move converts fake parameters, which fails)."""
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
    return module


def _peak_activations(module: torch.nn.Module, run: Callable[[], Any]) -> int:
    """Bytes of `module`'s live activations at the peak of `run()` (parameters not counted)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with torch.no_grad(), tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")  # {device: {memory kind (PARAM, ACT, ...) or "Total": bytes}}
    return max(sum(int(n) for kind, n in per_kind.items() if getattr(kind, "name", None) == "ACT") for per_kind in peak.values())


def activation_peaks(model: Published, height: int, width: int, batch: int = 1) -> dict[str, int]:
    """Bytes of live activations at the peak of one denoiser call on `batch` images
    (`model.guidance_batch` x `batch` inputs, built by its family's `example_inputs`) and of one untiled VAE decode of `batch` images,
    at height x width pixels, in `DTYPE` (module docstring: floors).
    Returns {"denoiser": bytes, "vae_decode": bytes}."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    f = 2 ** (len(model.vae["block_out_channels"]) - 1)  # VAE downsampling factor
    latent = (model.vae.get("latent_channels", 4), height // f, width // f)
    previous = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(DTYPE)
        try:
            vae = build("vae", model.vae)
            z = torch.randn(batch, *latent)
        finally:
            torch.set_default_dtype(previous)
        decode = _peak_activations(vae, lambda: vae.decode(z))
    denoiser = denoiser_activations(model.family, model.denoiser, model.guidance_batch * batch, latent, model.text_tokens, DTYPE)
    return {"denoiser": denoiser, "vae_decode": decode}


class _LivePeak(TorchDispatchMode):
    """The peak bytes of the storages that operator outputs hold alive (a storage counted once
    however many views share it, released when its last tensor is collected): what MemTracker
    measures as activations, without its per-module bookkeeping (1.5 s against 47 s for SDXL's
    UNet at 1024 px on this project's CPU; 0.2 % from it there, within 15 % on tiny test models:
    tests/unit/test_memory.py)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the storage itself: views of one storage share it
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def denoiser_activations(
    family: type[ModelHandle],
    config: dict[str, Any],
    inputs: int,
    latent: tuple[int, int, int],
    tokens: int,
    dtype: torch.dtype,
    quick: bool = False,
    lora: int = 0,
) -> int:
    """Bytes of live activations at the peak of one call of `family`'s denoiser built from
    `config` (its config.json; keys starting with "_" are ignored), on `inputs` latents of shape
    `latent` (C, h, w) with a text sequence of `tokens`, in `dtype` (fake tensors, no storage:
    module docstring). `quick`: counted by `_LivePeak` instead of MemTracker. `lora` > 0: with a
    LoRA of that rank active (`inject_lora`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    previous = torch.get_default_dtype()
    if lora:
        with torch.device("meta"):
            torch.set_default_dtype(dtype)
            try:
                adapted = family.build_denoiser(config)
                inject_lora(adapted, lora)
            finally:
                torch.set_default_dtype(previous)
    with FakeTensorMode():
        torch.set_default_dtype(dtype)
        try:
            denoiser = _fake_copy(adapted) if lora else family.build_denoiser(config)
            kwargs = family.example_inputs(config, inputs, latent, tokens)
        finally:
            torch.set_default_dtype(previous)
        if not quick:
            return _peak_activations(denoiser, lambda: denoiser(**kwargs, return_dict=False))
        with torch.no_grad(), _LivePeak() as live:
            denoiser(**kwargs, return_dict=False)
        return live.peak


@functools.lru_cache(maxsize=64)
def _per_input(family: type[ModelHandle], config_json: str, latent: tuple[int, int, int], tokens: int, dtype: torch.dtype) -> int:
    return denoiser_activations(family, json.loads(config_json), 1, latent, tokens, dtype, quick=True)


def activations_per_input(
    family: type[ModelHandle], config: dict[str, Any], latent: tuple[int, int, int], tokens: int, dtype: torch.dtype
) -> int:
    """`denoiser_activations` of one input (`quick`), remembered for the process (about a second
    on the zoo, 1.5 s for SDXL's UNet at 1024 px): a batch of k inputs takes at most k times this
    (tests/unit/test_memory.py)."""
    return _per_input(family, json.dumps(dict(config), sort_keys=True, default=list), latent, tokens, dtype)


def free_bytes(device: torch.device | str) -> int:
    """Memory free on `device` now: the accelerator's free memory (CUDA), else the host's
    available memory (what a CPU run's activations come from)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().available


@dataclass(frozen=True)
class Footprint:
    """One model's parameter counts and its activation peaks (bytes) at one canvas."""

    denoiser: int
    text_encoders: dict[str, int]  # display name -> parameters
    vae: int
    denoiser_activations: int
    decode_activations: int


def footprint(model: Published, height: int, width: int, batch: int = 1) -> Footprint:
    """Parameter counts (meta device) and activation peaks (fake tensors) of `model`."""
    acts = activation_peaks(model, height, width, batch)
    return Footprint(
        denoiser_parameters(model),
        {name: count_parameters(*c) for name, c in model.text_encoders.items()},
        count_parameters("vae", model.vae),
        acts["denoiser"],
        acts["vae_decode"],
    )


def device_bytes(fp: Footprint, n_models: int, *, offload: bool, shared: bool = True, vae_on_device: bool = True) -> int:
    """Peak accelerator bytes of a run fusing `n_models` models with footprint `fp` (module
    docstring: residency). `shared`: the text encoders and VAE are held once (fine-tunes that
    kept the base's), else once per model."""
    w = BYTES_PER_PARAM
    vae_peak = fp.vae * w + fp.decode_activations if vae_on_device else 0
    if offload:
        return max(fp.denoiser * w + fp.denoiser_activations, *(n * w for n in fp.text_encoders.values()), vae_peak)
    sets = 1 if shared else n_models
    held = n_models * fp.denoiser + sets * (sum(fp.text_encoders.values()) + (fp.vae if vae_on_device else 0))
    return held * w + max(fp.denoiser_activations, fp.decode_activations if vae_on_device else 0)


def host_bytes(fp: Footprint, n_models: int, *, shared: bool = True) -> int:
    """Host bytes holding every model's weights under offload (`shared` as in `device_bytes`)."""
    sets = 1 if shared else n_models
    return BYTES_PER_PARAM * (n_models * fp.denoiser + sets * (sum(fp.text_encoders.values()) + fp.vae))


QUANT_FORMATS: dict[str, tuple[float, int, str]] = {
    "bfloat16": (2.0, 0, "full precision"),
    "int8": (1.0, 4, "torchao int8 / bitsandbytes LLM.int8: one byte a weight, a scale per output row"),
    "Q8_0": (34 / 32, 0, "GGUF Q8_0: blocks of 32 int8 weights and one float16 scale"),
    "nf4": (0.5 + 4 / 64, 0, "bitsandbytes NF4: 4 bits a weight, a float32 absmax per block of 64"),
    "Q4_0": (18 / 32, 0, "GGUF Q4_0: blocks of 32 4-bit weights and one float16 scale"),
}
"""Bytes per weight of a quantized linear layer and bytes per output row (its scales), by format."""


def linear_weights(module: torch.nn.Module) -> tuple[int, int]:
    """(weights of every `nn.Linear` in `module`, their output rows): what quantization shrinks."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return sum(m.weight.numel() for m in layers), sum(m.out_features for m in layers)


def quantizable(model: Published) -> dict[str, tuple[int, int]]:
    """`linear_weights` of the denoiser ("denoiser") and of each T5 encoder (by display name),
    built on the meta device."""
    with torch.device("meta"):
        out = {"denoiser": linear_weights(model.family.build_denoiser(model.denoiser))}
        for name, (kind, config) in model.text_encoders.items():
            if kind == "t5":
                out[name] = linear_weights(build(kind, config))
    return out


def quantized(fp: Footprint, linear: dict[str, tuple[int, int]], fmt: str, t5: bool = True) -> Footprint:
    """`fp` with its denoiser (and, if `t5`, its T5 encoders) in format `fmt` (`QUANT_FORMATS`);
    `linear` is `quantizable(model)`. The quantized components' counts become the parameters of
    the same bytes in bfloat16 (bytes / `BYTES_PER_PARAM`), so the residency rules apply unchanged."""
    per_weight, per_row, _ = QUANT_FORMATS[fmt]

    def shrunk(params: int, part: str) -> int:
        weights, rows = linear[part]
        return round(((params - weights) * BYTES_PER_PARAM + weights * per_weight + rows * per_row) / BYTES_PER_PARAM)

    encoders = {k: shrunk(n, k) if t5 and k in linear else n for k, n in fp.text_encoders.items()}
    return Footprint(shrunk(fp.denoiser, "denoiser"), encoders, fp.vae, fp.denoiser_activations, fp.decode_activations)


def with_loras(fp: Footprint, lora_params: int, n_loras: int, lora_activations: int | None = None) -> Footprint:
    """`fp` as one base denoiser holding `n_loras` LoRAs of `lora_params` parameters each (module
    docstring): `device_bytes(with_loras(...), 1, ...)` is the peak of every model of the group,
    whatever their number. `lora_activations`: the call's activation peak with an adapter active
    (`denoiser_activations(lora=...)`), else the base's."""
    acts = fp.denoiser_activations if lora_activations is None else lora_activations
    return Footprint(fp.denoiser + n_loras * lora_params, fp.text_encoders, fp.vae, acts, fp.decode_activations)


def per_device_bytes(fp: Footprint, n_models: int, *, offload: bool) -> int:
    """Peak bytes of the busiest card when each of `n_models` models runs on its own card (its
    own text encoders there; the VAE on the first card)."""
    first = device_bytes(fp, 1, offload=offload)
    return first if n_models == 1 else max(first, device_bytes(fp, 1, offload=offload, vae_on_device=False))


def fits(peak_bytes: int, card_gib: float) -> bool:
    """Whether a run's peak fits a card of `card_gib` GiB: at most (1 - `RESERVE`) of it, the
    reserve kept for the CUDA context, kernel workspaces and fragmentation."""
    return peak_bytes <= (1 - RESERVE) * card_gib * GiB
