"""The FLOP counts of benchmarks/cost.py's second table: a LoRA model's call is the base call plus
each adapted layer's two low-rank products, and a region-attention call with one region covering
the canvas and no base prompt is the plain call (the degenerate case of `features/regional.py`),
for a UNet, an SD3 and a FLUX transformer."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from multifusion.families import FluxHandle, SD3Handle, SDHandle

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
VAE = dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=4,
    layers_per_block=1,
)  # 4x downsampling, 4 latent channels
DENOISERS = {
    "unet": (
        SDHandle,
        dict(
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=24,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        24,
    ),
    "sd3": (
        SD3Handle,
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            pos_embed_max_size=16,
        ),
        16,
    ),
    "flux": (
        FluxHandle,
        dict(
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
        32,
    ),
}


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("cost_script", BENCHMARKS / "cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_script"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["cost_script"]


def tiny(cost, kind):
    family, config, _ = DENOISERS[kind]
    return cost.Model(family, config, VAE, guidance_batch=2, text_tokens=7, side=32, steps=4)


@pytest.mark.parametrize("kind", sorted(DENOISERS))
def test_a_lora_call_adds_two_low_rank_products_per_adapted_layer(cost, kind):
    """2 FLOPs a multiply-add: rows x r x in (A) and rows x r x out (B), the rows each adapted
    layer sees recorded by hooks on the base model's own call."""
    from multifusion.memory import LORA_TARGETS, lora_layers

    model, rank = tiny(cost, kind), 3
    denoiser = model.family.build_denoiser(model.denoiser)
    layers = lora_layers(denoiser, LORA_TARGETS[type(denoiser).__name__])
    rows: dict[str, int] = {}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda m, args, out, name=name: rows.__setitem__(name, args[0].numel() // m.in_features))
    kwargs = model.family.example_inputs(model.denoiser, 2, (4, 8, 8), 7)
    with torch.no_grad():
        denoiser(**kwargs, return_dict=False)
    assert rows.keys() == layers.keys()
    by_hand = sum(2 * rows[n] * rank * (m.in_features + m.out_features) for n, m in layers.items())
    assert cost.lora_call_flops(model, rank) - cost.call_flops(model, 32, 32) == by_hand > 0


@pytest.mark.parametrize("kind", sorted(DENOISERS))
def test_one_region_over_the_canvas_without_a_base_prompt_costs_the_plain_call(cost, kind):
    model = tiny(cost, kind)
    plain = cost.call_flops(model, 32, 32)
    assert cost.region_call_flops(model, 1, base=False) == plain
    # a base prompt adds its attention and, in joint blocks, its text tokens' work; regions add more
    with_base = cost.region_call_flops(model, 1)
    assert plain < with_base < cost.region_call_flops(model, 2)
