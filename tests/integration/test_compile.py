"""`runtime.compile`: each denoiser compiled once per run gives the eager run's images to float
rounding, compiles one graph per input shape (every step and every region of one size reuse
it), and leaves the handles it was given eager."""

import torch
import torch._dynamo

from multifusion.api import Run, run
from multifusion.loading import load_models

PROMPT = "a red circle in a snowy field"


def _recipe(models, method="single", params=None, compile=None):
    return {
        "method": method,
        "models": [{"model": m, "prompt": PROMPT} for m in models],
        "params": params or {},
        "sampling": {"num_inference_steps": 3, "seed": 1, "num_images": 2},
        "runtime": {} if compile is None else {"compile": compile},
    }


def test_compiled_runs_equal_eager_ones_and_compile_once_per_shape(tiny_a):
    [h] = load_models([tiny_a])
    tiles = {"prompts": [["a red circle", "a blue square"]], "tile_height": 32, "tile_width": 32, "tile_col_overlap": 16}
    for method, params in (("single", None), ("mod", {"tiles": tiles, "tile_batch_size": 1})):
        eager = run(_recipe([tiny_a], method, params), models=[h], progress=False).latents
        torch._dynamo.reset()
        counts = torch._dynamo.utils.counters
        counts.clear()
        r = Run(_recipe([tiny_a], method, params, compile=True), models=[h])
        assert r.handles[0].unet is not h.unet and h.unet.__class__.__name__ == "UNet2DConditionModel"
        compiled = r.batch([1, 2], progress=False).latents
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        # one frame compiled, whatever the steps (3) and tiles (2 of one size)
        assert counts["stats"]["unique_graphs"] == 1, dict(counts["stats"])
    # the handle passed in stays eager: a later eager run does not compile
    counts.clear()
    run(_recipe([tiny_a]), models=[h], progress=False)
    assert counts["stats"]["unique_graphs"] == 0


def test_afa_under_compile_walks_the_models_themselves():
    """AFA's ensemble walks the denoisers' blocks and hashes their weights: under
    `runtime.compile` it takes the uncompiled modules (the shipped aggregators are still found by
    the models' hashes) and samples what it samples eagerly, bit for bit."""
    models = ["zoo:slice0", "zoo:slice1"]
    handles = load_models(models)
    eager = run(_recipe(models, "afa"), models=handles, progress=False).latents
    compiled = run(_recipe(models, "afa", compile=True), models=handles, progress=False).latents
    assert torch.equal(compiled, eager)
