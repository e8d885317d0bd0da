"""Memory estimates from configs: parameter counts on the meta device equal the built models',
SDXL base's are the published ones, activation peaks grow with the canvas, and the residency
arithmetic (offload on and off) on hand-made numbers."""

import pytest

from multifusion.memory import GiB, SDXL_BASE, Footprint, activation_peaks, fits, parameter_counts
from multifusion.zoo.tiny_sdxl import PROJECTION_DIM, TIME_EMBED_DIM

TINY = {
    "unet": dict(sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
                 transformer_layers_per_block=(1, 2), cross_attention_dim=40, attention_head_dim=8, norm_num_groups=8,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                 projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM),
    "vae": dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, layers_per_block=1),
    "text_encoder": dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
    "text_encoder_2": dict(vocab_size=100, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           projection_dim=PROJECTION_DIM),
}


def test_meta_counts_equal_the_built_models():
    from multifusion.memory import _build

    counts = parameter_counts(TINY)
    for kind, config in TINY.items():
        assert counts[kind] == sum(p.numel() for p in _build(kind, config).parameters()), kind


def test_sdxl_base_has_its_published_parameter_counts():
    # the SDXL report (arXiv 2307.01952) Table 1: UNet 2.6B, text encoders 817M (CLIP ViT-L 123M + OpenCLIP bigG 695M)
    assert parameter_counts(SDXL_BASE) == {"unet": 2_567_463_684, "text_encoder": 123_060_480,
                                           "text_encoder_2": 694_659_840, "vae": 83_653_863}


def test_activation_peaks_grow_with_the_canvas_and_the_batch():
    small = activation_peaks(TINY, 32, 32)
    wide = activation_peaks(TINY, 32, 64)
    double = activation_peaks(TINY, 32, 32, batch=2)
    assert 0 < small["unet"] < wide["unet"] and 0 < small["vae_decode"] < wide["vae_decode"]
    assert double["unet"] > small["unet"] and double["vae_decode"] > small["vae_decode"]


def test_residency_arithmetic():
    fp = Footprint({"unet": 100, "text_encoder": 10, "text_encoder_2": 30, "vae": 5}, {"unet": 7, "vae_decode": 50})
    # off: N UNets + encoders (once or per model) + VAE + the larger activation peak, 2 bytes a parameter
    assert fp.device_bytes(2, offload=False) == 2 * (200 + 40 + 5) + 50
    assert fp.device_bytes(2, offload=False, shared_encoders=False) == 2 * (200 + 80 + 5) + 50
    assert fp.device_bytes(3, offload=False, vae_on_device=False) == 2 * (300 + 40) + 7
    # on: the largest single module with its activations, whatever N
    assert fp.device_bytes(1, offload=True) == fp.device_bytes(3, offload=True) == max(200 + 7, 60, 10 + 50)
    assert fp.device_bytes(3, offload=True, vae_on_device=False) == 207
    assert fp.host_bytes(3, shared_encoders=False) == 2 * (300 + 120 + 5)


@pytest.mark.parametrize("gib, capacity, ok", [(10.7, 12, True), (10.9, 12, False), (21.5, 24, True)])
def test_fits_keeps_a_tenth_of_the_card(gib, capacity, ok):
    assert fits(int(gib * GiB), capacity) is ok
