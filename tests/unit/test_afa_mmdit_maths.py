"""AFA over SD3 transformers, the pure parts: image tokens to their patch grid and back, the
unpatchify of the output head, and the aggregation points and parameter counts of published
SD3.5 configurations (built on the meta device)."""

import pytest
import torch

from multifusion.features.mmdit import grid_to_tokens, tokens_to_grid, unpatchify
from multifusion.features.walkers import aggregation_channels, default_width, parameter_count
from multifusion.memory import SD35_MEDIUM


def test_tokens_to_grid_is_row_major_over_patches():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # (B, T = 2 x 3, D)
    grid = tokens_to_grid(tokens, 2, 3)
    assert grid.shape == (2, 3, 2, 3)
    assert torch.equal(grid[1, :, 1, 2], tokens[1, 5])  # patch (row 1, col 2) is token 1*3 + 2
    assert torch.equal(grid[0, 2, 0, 1], tokens[0, 1, 2])
    assert torch.equal(grid_to_tokens(grid), tokens)


def test_tokens_to_grid_matches_the_patch_embedding_layout():
    from diffusers.models.embeddings import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(height=8, width=12, patch_size=2, in_channels=4, embed_dim=6, pos_embed_type=None)
    x = torch.randn(1, 4, 8, 12)
    assert torch.equal(tokens_to_grid(embed(x), 4, 6), embed.proj(x))  # the conv's own (B, D, h/p, w/p) map


def test_unpatchify_puts_each_token_on_its_patch():
    rows, cols, p, c = 2, 3, 2, 4
    tokens = torch.randn(1, rows * cols, p * p * c)
    out = unpatchify(tokens, rows, cols, p, c)
    assert out.shape == (1, c, rows * p, cols * p)
    patch = tokens[0, 1 * cols + 2].view(p, p, c)  # token (row 1, col 2): its (p, q, c) values
    assert torch.equal(out[0, :, 2:4, 4:6], patch.permute(2, 0, 1))


def test_a_token_count_off_the_grid_is_an_error():
    with pytest.raises(ValueError, match="not a 2 x 3 patch grid"):
        tokens_to_grid(torch.zeros(1, 5, 4), 2, 3)


def test_sd35_medium_points_and_parameters_from_config_alone():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD35_MEDIUM)
    ch = aggregation_channels(transformer)
    assert ch == [1536] * 24 + [16]  # the patch embedding, blocks 0..22, the output (block 23 meets after the head)
    agg, one = parameter_count(SD35_MEDIUM, 2, 128, SD3Transformer2DModel)
    assert one == 2_243_171_520 and 0 < agg < 0.06 * one
    assert default_width(SD35_MEDIUM, 2, denoiser_class=SD3Transformer2DModel) == 128
