"""SDXL micro-conditioning of a canvas window: the maths of `SDXLHandle.for_window`."""

from types import SimpleNamespace

import torch
from hypothesis import given
from hypothesis import strategies as st

from multifusion.families.sdxl import SDXLHandle, time_ids
from multifusion.handles import Conditioning, ModelHandle


def _handle(cls=SDXLHandle, factor=8):
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[1] * (factor.bit_length())))
    return cls(name="m", unet=None, vae=vae, text_encoder=None, tokenizer=None, scheduler_config={})


@st.composite
def windows(draw):
    H, W = draw(st.integers(1, 256)), draw(st.integers(1, 256))
    r0, c0 = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
    return (r0, draw(st.integers(r0 + 1, H)), c0, draw(st.integers(c0 + 1, W))), (H, W)


@given(windows(), st.sampled_from([4, 8]), st.integers(1, 3))
def test_a_window_is_a_crop_of_the_canvas_in_pixels(window, factor, batch):
    (r0, r1, c0, c1), (H, W) = window
    h = _handle(factor=factor)
    cond = Conditioning(torch.zeros(batch, 2, 3), {"text_embeds": torch.ones(batch, 5)})
    out = h.for_window(cond, (r0, r1, c0, c1), (H, W))
    want = [H * factor, W * factor, r0 * factor, c0 * factor, (r1 - r0) * factor, (c1 - c0) * factor]
    assert out.extra["time_ids"].tolist() == [want] * batch
    assert out.embeds is cond.embeds and out.extra["text_embeds"] is cond.extra["text_embeds"]
    if (r0, r1, c0, c1) == (0, H, 0, W):  # the whole canvas: the pipeline's default for an image of that size
        x = torch.zeros(batch, 4, H, W)
        default = h.denoiser_kwargs(x, cond, torch.device("cpu"))["added_cond_kwargs"]["time_ids"]
        assert torch.equal(out.extra["time_ids"], default)


def test_time_ids_follow_the_pipeline_order():
    assert time_ids((1024, 768), (64, 32), (512, 384), 2).tolist() == [[1024, 768, 64, 32, 512, 384]] * 2


def test_windows_leave_sd_conditioning_alone():
    h = _handle(ModelHandle)
    cond = Conditioning(torch.ones(1, 2, 3))
    assert h.for_window(cond, (0, 1, 0, 1), (4, 4)) is cond
    assert h.denoiser_kwargs(torch.zeros(1, 4, 4, 4), cond, torch.device("cpu")) == {}
