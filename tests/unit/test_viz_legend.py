"""Method pictures are at least as wide as their legend: no model's name is cut at the edge."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from multifusion.viz import AFAMapRecorder, legend_width


def test_an_afa_map_with_long_model_names_shows_its_whole_legend(tmp_path):
    rec = AFAMapRecorder()
    maps = [torch.rand(2, 1, 1, 4, 4)]  # one aggregation point: (N models, B, 1, h, w)
    rec(SimpleNamespace(step=0, record={"afa/maps": maps}))  # what the recorder reads of a loop Step
    names = ["zoo:a-rather-long-model-name", "zoo:another-long-one"]
    (path,) = rec.save(tmp_path / "x", model_names=names)
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape[1] >= legend_width(names) > 34 + 32  # wider than the one-step grid it holds
    # the second name's colour square is drawn inside the picture
    x = 2 + 16 + 7 * len(names[0])
    assert (im[5, x + 4] != 0).any()
