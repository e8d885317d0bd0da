"""Memory estimates from configs: parameter counts on the meta device equal the built models',
the published configs have their known sizes, activation peaks of every denoiser kind grow with
the canvas and the batch, and the residency and fit rules on hand-made numbers."""

import pytest

from multifusion.families import FluxHandle, SD3Handle, SDXLHandle
from multifusion.memory import (
    PUBLISHED,
    Footprint,
    GiB,
    Published,
    activation_peaks,
    activations_per_input,
    build,
    count_parameters,
    denoiser_activations,
    denoiser_parameters,
    device_bytes,
    fits,
    host_bytes,
)
from multifusion.zoo.tiny_sdxl import PROJECTION_DIM, TIME_EMBED_DIM

TINY_VAE = dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=4,
    layers_per_block=1,
)  # 4 latent channels
TINY_CLIP = dict(
    vocab_size=100,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=PROJECTION_DIM,
)
TINY_T5 = dict(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, is_encoder_decoder=False)
TINY = {
    "unet": dict(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=40,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    ),
    "sd3": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    ),
    "flux": dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "vae": TINY_VAE,
    "clip": TINY_CLIP,
    "clip_projection": TINY_CLIP,
    "t5": TINY_T5,
}


FAMILY = {"unet": SDXLHandle, "sd3": SD3Handle, "flux": FluxHandle}


def tiny_family(kind: str) -> Published:
    return Published(
        FAMILY[kind], TINY[kind], {"CLIP": ("clip", TINY_CLIP), "T5": ("t5", TINY_T5)}, TINY_VAE, guidance_batch=2, text_tokens=7
    )


@pytest.mark.parametrize("kind", sorted(set(TINY) - set(FAMILY)))
def test_meta_counts_equal_the_built_models(kind):
    assert count_parameters(kind, TINY[kind]) == sum(p.numel() for p in build(kind, TINY[kind]).parameters())


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_meta_denoiser_counts_equal_the_built_models(kind):
    built = FAMILY[kind].build_denoiser(TINY[kind])
    assert denoiser_parameters(tiny_family(kind)) == sum(p.numel() for p in built.parameters())


def test_published_configs_have_their_known_parameter_counts():
    # the SDXL report (arXiv 2307.01952) Table 1: UNet 2.6B, text encoders 817M (CLIP ViT-L 123M + OpenCLIP bigG 695M)
    sdxl = PUBLISHED["SDXL base"]
    assert denoiser_parameters(sdxl) == 2_567_463_684
    assert [count_parameters(*c) for c in sdxl.text_encoders.values()] == [123_060_480, 694_659_840]
    assert count_parameters("vae", sdxl.vae) == 83_653_863
    # FLUX.1 dev: "a 12 billion parameter rectified flow transformer"; SD3.5 Large: 8.1 billion
    assert denoiser_parameters(PUBLISHED["FLUX.1 dev"]) == pytest.approx(11.9e9, rel=0.01)
    assert denoiser_parameters(PUBLISHED["SD3.5 Large"]) == pytest.approx(8.1e9, rel=0.01)


@pytest.mark.parametrize("kind", ["unet", "sd3", "flux"])
def test_activation_peaks_grow_with_the_canvas_and_the_batch(kind):
    family = tiny_family(kind)
    small = activation_peaks(family, 32, 32)
    wide = activation_peaks(family, 32, 64)
    double = activation_peaks(family, 32, 32, batch=2)
    for part in ("denoiser", "vae_decode"):
        assert 0 < small[part] < wide[part] and small[part] < double[part], part


FP = Footprint(denoiser=100, text_encoders={"a": 10, "b": 30}, vae=5, denoiser_activations=7, decode_activations=50)


def test_offload_peak_is_the_largest_module_whatever_the_model_count():
    # 2 bytes a parameter: one denoiser with its call (207), one encoder (60), the VAE with its decode (60)
    peaks = {device_bytes(FP, n, offload=True, shared=s) for n in (1, 2, 3) for s in (True, False)}
    assert peaks == {max(200 + 7, 60, 10 + 50)}
    assert device_bytes(FP, 3, offload=True, vae_on_device=False) == 207


def test_shared_encoders_and_vae_are_counted_once():
    # off: N denoisers + encoders and VAE (once or per model) + the larger activation peak
    assert device_bytes(FP, 2, offload=False) == 2 * (200 + 40 + 5) + 50
    assert device_bytes(FP, 2, offload=False, shared=False) == 2 * (200 + 80 + 10) + 50
    assert device_bytes(FP, 3, offload=False, vae_on_device=False) == 2 * (300 + 40) + 7
    assert host_bytes(FP, 3) == 2 * (300 + 40 + 5)
    assert host_bytes(FP, 3, shared=False) == 2 * (300 + 120 + 15)


def test_fits_keeps_a_tenth_of_the_card():
    assert fits(9 * GiB, 10) and not fits(9 * GiB + 1, 10)


@pytest.mark.parametrize("kind", ["unet", "sd3", "flux"])
def test_a_batch_of_k_inputs_takes_k_times_one_inputs_activations(kind):
    """The premise of Mixture of Diffusers' tile batch rule (`noise.methods.memory_tile_batch`):
    per-input activations times the batch bound the batch's peak from above (what the batch
    shares, time embeddings and rotary ids, makes tiny models' bound loose), for every denoiser
    kind; and the quick count agrees with MemTracker's."""
    import torch

    family = FAMILY[kind]
    latent = (4, 8, 8)
    one = activations_per_input(family, TINY[kind], latent, 7, torch.float32)
    assert one == denoiser_activations(family, TINY[kind], 1, latent, 7, torch.float32, quick=True) > 0
    for k in (2, 5):
        quick = denoiser_activations(family, TINY[kind], k, latent, 7, torch.float32, quick=True)
        assert quick <= k * one
        # the quick count is MemTracker's to within 15 % (FLUX's tiny transformer the farthest, above it)
        assert quick == pytest.approx(denoiser_activations(family, TINY[kind], k, latent, 7, torch.float32), rel=0.15)


def test_quantized_weights_shrink_the_linear_layers_only():
    """A denoiser of 1000 parameters, 800 of them in linear layers with 10 output rows, in int8:
    200 x 2 bytes kept, 800 x 1 byte, 10 x 4 bytes of scales = 1240 bytes = 620 bfloat16 parameters."""
    from multifusion.memory import QUANT_FORMATS, quantized

    fp = Footprint(1000, {"CLIP": 300, "T5": 500}, 50, 7, 9)
    linear = {"denoiser": (800, 10), "T5": (400, 4)}
    q = quantized(fp, linear, "int8")
    assert q.denoiser == 620
    assert q.text_encoders == {"CLIP": 300, "T5": (100 * 2 + 400 + 16) // 2}  # CLIP is not quantized
    assert (q.vae, q.denoiser_activations, q.decode_activations) == (50, 7, 9)
    assert quantized(fp, linear, "int8", t5=False).text_encoders == fp.text_encoders
    assert quantized(fp, linear, "bfloat16") == fp
    nf4 = QUANT_FORMATS["nf4"][0]
    assert quantized(fp, linear, "nf4").denoiser == round((200 * 2 + 800 * nf4) / 2)


def test_linear_weights_count_every_linear_layer():
    import torch

    from multifusion.memory import linear_weights

    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Conv2d(2, 2, 1), torch.nn.Sequential(torch.nn.Linear(3, 5)))
    assert linear_weights(m) == (4 * 3 + 3 * 5, 3 + 5)


def test_one_model_per_card_holds_one_model_and_the_vae_on_the_first():
    from multifusion.memory import per_device_bytes

    fp = Footprint(100, {"CLIP": 10}, 5, 7, 9)  # parameters; activations in bytes
    assert per_device_bytes(fp, 1, offload=False) == device_bytes(fp, 1, offload=False) == (100 + 10 + 5) * 2 + 9
    assert per_device_bytes(fp, 2, offload=False) == (100 + 10 + 5) * 2 + 9  # the first card is the busiest
    assert device_bytes(fp, 1, offload=False, vae_on_device=False) == (100 + 10) * 2 + 7


class _Attn(__import__("torch").nn.Module):
    """Names as diffusers' Attention: to_q, to_k, to_out.0 (a Linear and a Dropout)."""

    def __init__(self):
        import torch

        super().__init__()
        self.to_q, self.to_k = torch.nn.Linear(4, 6), torch.nn.Linear(3, 6, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(6, 4), torch.nn.Dropout(0.0)])
        self.xto_q = torch.nn.Linear(4, 4)  # ends with "to_q" but not with ".to_q": not a target


def _tiny_net():
    import torch

    net = torch.nn.Module()
    net.attn = _Attn()
    net.proj = torch.nn.Linear(4, 4)
    net.to_q = torch.nn.Conv2d(4, 4, 1)  # a target's name on a non-Linear: not counted
    return net


def test_lora_parameters_are_rank_times_in_plus_out_of_the_named_linear_layers():
    """Rank 2 on to_q (4 -> 6), to_k (3 -> 6), to_out.0 (6 -> 4): 2 (10 + 9 + 10) = 58."""
    from multifusion.memory import lora_layers, lora_parameters

    targets = ("to_q", "to_k", "to_out.0")
    net = _tiny_net()
    assert sorted(lora_layers(net, targets)) == ["attn.to_k", "attn.to_out.0", "attn.to_q"]
    assert lora_parameters(net, 2, targets) == 2 * ((4 + 6) + (3 + 6) + (6 + 4)) == 58
    assert lora_parameters(net, 2, ("to_out",)) == 0  # a ModuleList is no Linear


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_lora_count_equals_the_parameters_peft_injects(kind):
    """On each tiny denoiser kind, built on the meta device: the parameters `inject_lora` adds
    (peft's LoraConfig on `LORA_TARGETS`) are `denoiser_lora_parameters`' count, and the count
    is linear in the rank."""
    import torch

    from multifusion.memory import denoiser_lora_parameters, inject_lora

    family = tiny_family(kind)
    for rank in (1, 4):
        with torch.device("meta"):
            denoiser = family.family.build_denoiser(family.denoiser)
            before = sum(p.numel() for p in denoiser.parameters())
            inject_lora(denoiser, rank)
            added = sum(p.numel() for p in denoiser.parameters()) - before
        assert added == denoiser_lora_parameters(family, rank) > 0
    assert denoiser_lora_parameters(family, 4) == 4 * denoiser_lora_parameters(family, 1)


def test_base_and_loras_hold_one_denoiser_and_a_lora_per_model():
    """FP's denoiser (100 parameters) with 3 LoRAs of 4 parameters: one model's residency with
    112 parameters of denoiser, whatever the models; the activations the adapted call's."""
    from multifusion.memory import with_loras

    held = with_loras(FP, 4, 3, lora_activations=11)
    assert device_bytes(held, 1, offload=False) == 2 * (112 + 40 + 5) + 50
    assert device_bytes(held, 1, offload=True) == 2 * 112 + 11
    assert host_bytes(held, 1) == 2 * (112 + 40 + 5)
    assert with_loras(FP, 4, 0) == FP


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_a_call_with_a_lora_active_counts_the_adapters_activations(kind):
    """The adapted call runs (fake tensors, peft layers in the forward): its peak is at least the
    base call's; and a rank as wide as the layers shows the low-rank products are in it."""
    import torch

    family = FAMILY[kind]
    latent = (4, 8, 8)
    base = denoiser_activations(family, TINY[kind], 2, latent, 7, torch.float32, quick=True)
    small = denoiser_activations(family, TINY[kind], 2, latent, 7, torch.float32, quick=True, lora=1)
    wide = denoiser_activations(family, TINY[kind], 2, latent, 7, torch.float32, quick=True, lora=256)
    assert base <= small <= wide and base < wide
