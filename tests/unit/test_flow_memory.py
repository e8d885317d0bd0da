"""The memory table of docs/flow.md is counted from published configs on the meta device."""

import pytest

from multifusion.flow.memory import FLUX_DEV, MemoryRow, count_parameters, fits


def test_meta_count_equals_a_real_module():
    from diffusers import FluxTransformer2DModel

    tiny = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    real = sum(p.numel() for p in FluxTransformer2DModel(**tiny).parameters())
    assert count_parameters(lambda: FluxTransformer2DModel(**tiny)) == real


def test_flux_dev_transformer_has_its_published_size():
    from diffusers import FluxTransformer2DModel

    assert count_parameters(lambda: FluxTransformer2DModel(**FLUX_DEV)) == pytest.approx(11.9e9, rel=0.01)


def test_two_fine_tunes_hold_their_shared_parts_once():
    r = MemoryRow("m", transformer=10**9, shared=3 * 10**9, largest_module=10**9)
    assert r.two_models_gb() == pytest.approx(10.0) and r.offload_gb() == pytest.approx(2.0)
    assert fits(19.2, 24) == "yes" and fits(19.3, 24) == "no"
