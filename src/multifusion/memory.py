"""Accelerator memory of a fused run, computed from the models' configs (no weights read).

Parameter counts come from instantiating each component on the `meta` device (shapes only).
Activation peaks come from one forward pass under torch's `FakeTensorMode` (tensors with shapes
and no storage) tracked by `torch.distributed._tools.mem_tracker.MemTracker`: the largest sum of
live activation tensors during a UNet call on a classifier-free-guidance batch, and during a VAE
decode. Attention is counted as a fused kernel (PyTorch's scaled-dot-product attention, which
does not materialise the score matrix), so these peaks are floors: kernel workspaces, the CUDA
context (~0.3-0.5 GiB) and allocator fragmentation come on top; `fits` keeps 10 % of the card
for them.

What is resident follows how runs load models (`multifusion.loading`, `handles.Offloader`):
- without offload every model's UNet, the text encoders (held once when fine-tunes share them,
  once per model when each retrained its own), and the VAE are on the device; the peak adds the
  larger of one UNet call's and the VAE decode's activations (they never run together);
- with offload one module is on the device at a time: the peak is the largest of (one UNet +
  its activations), (one text encoder) and (the VAE + its decode), whatever the number of
  models, and host memory holds everything;
- `runtime.vae_device: cpu` takes the VAE and its decode off the device (VAE tiling, switched on
  above 4x the native area, shrinks the decode instead).

SDXL base's configs (`SDXL_BASE`) are the published values of
stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/, text_encoder_2/, vae/
config.json): fine-tunes (Pony, Illustrious, NoobAI, Juggernaut, ...) keep these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SDXL_BASE: dict[str, dict[str, Any]] = {
    "unet": dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 norm_num_groups=32),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
    "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
                scaling_factor=0.13025),
}

GiB = 2**30


def _build(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "unet":
        return UNet2DConditionModel(**config)
    if kind == "vae":
        return AutoencoderKL(**config)
    cls = CLIPTextModelWithProjection if kind == "text_encoder_2" else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def parameter_counts(configs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Parameters of each component ("unet", "vae", "text_encoder", "text_encoder_2"), built
    from its config on the meta device."""
    out = {}
    with torch.device("meta"):
        for kind, config in configs.items():
            out[kind] = sum(p.numel() for p in _build(kind, config).parameters())
    return out


def _peak_activations(module: torch.nn.Module, run) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with torch.no_grad(), tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")  # {device: {memory kind (PARAM, ACT, ...) or "Total": bytes}}
    return max(sum(int(n) for kind, n in per_kind.items() if getattr(kind, "name", None) == "ACT") for per_kind in peak.values())


def activation_peaks(configs: dict[str, dict[str, Any]], height: int, width: int, batch: int = 1,
                     dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Bytes of live activations at the peak of one UNet call on a classifier-free-guidance
    batch (2 x `batch`) and of one VAE decode of `batch` images, at height x width pixels
    (module docstring: floors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    unet_cfg, vae_cfg = configs["unet"], configs["vae"]
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    latent = (unet_cfg.get("in_channels", 4), height // f, width // f)
    previous = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)
        try:
            unet, vae = _build("unet", unet_cfg), _build("vae", vae_cfg)
        finally:
            torch.set_default_dtype(previous)
        b = 2 * batch
        x = torch.randn(b, *latent, dtype=dtype)
        context = torch.randn(b, 77, unet_cfg["cross_attention_dim"], dtype=dtype)
        added = None
        if unet_cfg.get("addition_embed_type") == "text_time":
            pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
            added = {"text_embeds": torch.randn(b, pooled, dtype=dtype), "time_ids": torch.randn(b, 6, dtype=dtype)}
        unet_peak = _peak_activations(unet, lambda: unet(x, torch.tensor(500), encoder_hidden_states=context, added_cond_kwargs=added))
        z = torch.randn(batch, *latent, dtype=dtype)
        vae_peak = _peak_activations(vae, lambda: vae.decode(z))
    return {"unet": unet_peak, "vae_decode": vae_peak}


@dataclass(frozen=True)
class Footprint:
    """Parameter counts and activation peaks (bytes) of one model family at one canvas size."""

    params: dict[str, int]
    activations: dict[str, int]

    def device_bytes(self, n_models: int, *, offload: bool, shared_encoders: bool = True, vae_on_device: bool = True,
                     bytes_per_param: int = 2) -> int:
        """Peak accelerator bytes of a run fusing `n_models` models of this family (module
        docstring). `shared_encoders`: the text encoders are held once (fine-tunes that kept
        the base's) rather than once per model."""
        p, a, b = self.params, self.activations, bytes_per_param
        encoders = [p[k] * b for k in p if k.startswith("text_encoder")]
        vae = p["vae"] * b + a["vae_decode"] if vae_on_device else 0
        if offload:
            return max(p["unet"] * b + a["unet"], *encoders, vae)
        held = n_models * p["unet"] * b + (1 if shared_encoders else n_models) * sum(encoders)
        return held + max(a["unet"], a["vae_decode"] if vae_on_device else 0) + (p["vae"] * b if vae_on_device else 0)

    def host_bytes(self, n_models: int, *, shared_encoders: bool = True, bytes_per_param: int = 2) -> int:
        """Host bytes holding every model's weights under offload."""
        p, b = self.params, bytes_per_param
        encoders = sum(p[k] for k in p if k.startswith("text_encoder"))
        return b * (n_models * p["unet"] + (1 if shared_encoders else n_models) * encoders + p["vae"])


def fits(device_bytes: int, capacity_gib: float, reserve: float = 0.10) -> bool:
    """Whether a run's peak fits a card of `capacity_gib`, keeping `reserve` of it for the CUDA
    context, kernel workspaces and fragmentation."""
    return device_bytes <= (1 - reserve) * capacity_gib * GiB
