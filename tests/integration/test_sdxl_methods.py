"""Every noise and latent method on tiny SDXL models: degenerate cases equal `single`, a base
with its fine-tunes (shared or retrained text encoders), Mixture-of-Diffusers regions
conditioned as crops, and SDXL + SD mixes refused."""

import pytest
import torch
from handmade import ddim_step, mixed, region_weight

import multifusion as mf
from multifusion import IncompatibleModelsError, load_models
from multifusion.api import run
from multifusion.handles import Conditioning, cfg
from multifusion.loading import held_bytes
from multifusion.loop import initial_noise
from multifusion.noise.regions import Canvas, Region, region_weights

PROMPTS = ["a red circle in a snowy field", "a blue square in a desert"]
KW = dict(num_inference_steps=4, seed=2, num_images=2, progress=False, height=32, width=48)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    """a, b (a fine-tune of a: same encoders and VAE) and c (retrained text encoders)."""
    return load_models([str(tiny_sdxl_dir / k) for k in "abc"], names=["a", "b", "c"])


def test_a_fine_tune_holds_the_base_encoders_once_and_a_retrained_one_its_own(sdxl):
    a, b, c = sdxl
    assert b.text_encoder is a.text_encoder and b.text_encoder_2 is a.text_encoder_2 and b.vae is a.vae
    assert c.text_encoder is not a.text_encoder and c.text_encoder_2 is not a.text_encoder_2 and c.vae is a.vae
    assert held_bytes([a, b]) < held_bytes([a]) + held_bytes([b])


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_average_snb_and_amdm_of_a_model_with_itself_are_single(sdxl, scheduler):
    a = sdxl[0]
    ref = mf.single(a, PROMPTS[0], scheduler=scheduler, **KW).latents
    assert torch.equal(mf.average([a, a], PROMPTS[0], weights=[0.5, 0.5], scheduler=scheduler, **KW).latents, ref)
    assert torch.equal(mf.snb([a, a], PROMPTS[0], scheduler=scheduler, **KW).latents, ref)
    assert torch.equal(mf.amdm([a, a], PROMPTS[0], w=1.0, correction=0.0, scheduler=scheduler, **KW).latents, ref)


@pytest.mark.parametrize("pair", ["ab", "ac"])
def test_every_noise_and_latent_method_fuses_a_base_and_a_fine_tune(sdxl, pair):
    h = dict(zip("abc", sdxl))
    x, y = h[pair[0]], h[pair[1]]
    singles = [mf.single(m, p, **KW).latents for m, p in ((x, PROMPTS[0]), (y, PROMPTS[1]))]
    # all weight on one model is that model
    assert torch.equal(mf.average([x, y], PROMPTS, weights=[0.0, 1.0], **KW).latents, singles[1])
    assert torch.equal(mf.amdm([x, y], PROMPTS, specified=1, w=1.0, correction=0.0, **KW).latents, singles[1])
    # Each method's step recomputed from its record and each model's own SDXL prediction (its
    # own text encoders, pooled embedding and time ids): wrong conditioning or a wrong mix shows.
    own = [m.guide(p, batch_size=2) for m, p in ((x, PROMPTS[0]), (y, PROMPTS[1]))]
    steps = {method: [] for method in ("average", "snb", "amdm")}
    for method, recorded in steps.items():
        out = mf.fuse(method, [x, y], PROMPTS, callback=recorded.append, **KW).latents
        assert not any(torch.allclose(out, s, atol=1e-4) for s in singles)
    for step in steps["average"]:
        eps = [g(step.model_input[0], step.t[0]) for g in own]
        torch.testing.assert_close(step.eps[0], 0.5 * eps[0] + 0.5 * eps[1], rtol=1e-6, atol=1e-6)
    for step in steps["snb"]:
        eps = [g(step.model_input[0], step.t[0]) for g in own]
        mask = step.record["snb/mask"]
        assert 0 < mask[1].mean() < 1  # both models paint
        torch.testing.assert_close(step.eps[0], mask[0] * eps[0] + mask[1] * eps[1], rtol=0, atol=0)
    # AMDM's defaults meet at the first step only: w = 0.5 on the specified (first) model, the
    # other sqrt(3) / 2; it continues from m - 0.43 (m - x'_x), x' each model's own DDIM step
    # (which clips x0 here: the tiny SDXL schedule's config leaves DDIM's clip_sample at True).
    step = steps["amdm"][0]
    s = step.schedulers
    stepped = [
        ddim_step(
            step.model_input[k],
            step.eps[k],
            float(s[k].alphas_cumprod[step.t[k]]),
            float(s[k].alphas_cumprod[step.t_next[k]]),
            clip=s[k].config.clip_sample,
        )
        for k in range(2)
    ]
    m = 0.5 * stepped[0] + 3**0.5 / 2 * stepped[1]
    torch.testing.assert_close(step.latents[0].double(), m - 0.43 * (m - stepped[0]), rtol=1e-5, atol=1e-5)
    assert step.latents[1] is None and all("amdm/x0" not in s.record for s in steps["amdm"][1:])


def _mod(models, regions, **sampling):
    return {
        "method": "mod",
        "models": [{"model": m.source, "name": m.name} for m in models],
        "params": {"regions": regions},
        "sampling": {"num_inference_steps": 4, "seed": 2, "num_images": 2, "height": 32, "width": 48, **sampling},
    }


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_one_region_over_a_non_square_canvas_is_single(sdxl, scheduler):
    a = sdxl[0]
    region = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 48, "prompt": PROMPTS[0]}
    out = run(_mod([a], [region], scheduler=scheduler), models=[a], progress=False).latents
    assert torch.equal(out, mf.single(a, PROMPTS[0], scheduler=scheduler, **KW).latents)


def test_regions_are_conditioned_as_crops_of_the_canvas(sdxl):
    """Two constant-weight halves of a 32 x 48 canvas: each half's prediction is the model's on
    that crop with original size 32 x 48, the crop's corner and its own size as time ids."""
    a, _, c = sdxl
    left, right = a.guide(PROMPTS[0], batch_size=1, guidance_scale=5.0), c.guide(PROMPTS[1], batch_size=1, guidance_scale=3.0)
    canvas = Canvas(
        [
            Region((0, 8, 0, 4), left, region_weights(8, 4, "constant")),
            Region((0, 8, 4, 12), right, region_weights(8, 8, "constant")),
        ],
        (8, 12),
    )
    assert canvas.regions[1].fn.positive.extra["time_ids"].tolist() == [[32, 48, 0, 16, 32, 32]]
    x = initial_noise((4, 8, 12), [torch.Generator().manual_seed(0)])
    t = torch.tensor(500)
    eps = canvas(x, t)

    def expected(handle, guided, cols, ids):
        window = x[:, :, :, cols].contiguous()
        with_ids = [
            type(g)(g.embeds, {**g.extra, "time_ids": torch.tensor([ids], dtype=torch.float32)})
            for g in (guided.negative, guided.positive)
        ]
        u, v = handle.eps(torch.cat([window, window]), t, Conditioning.cat(with_ids)).chunk(2)  # one batch, as Guided runs
        return cfg(u, v, guided.guidance_scale)

    assert torch.equal(eps[..., :4], expected(a, left, slice(0, 4), [32, 48, 0, 0, 32, 16]))
    assert torch.equal(eps[..., 4:], expected(c, right, slice(4, 12), [32, 48, 0, 16, 32, 32]))
    # the crop's conditioning matters: the window alone, as a whole image, predicts otherwise
    assert not torch.allclose(eps[..., 4:], right(x[..., 4:].contiguous(), t), atol=1e-6)


def test_mod_runs_two_sdxl_models_on_tiles(sdxl):
    """Tiles of model b batched two at a time next to a region of model a: each step's
    prediction is the Gaussian-weighted mix, weights computed by hand, of each region's own
    model on its window conditioned as that crop of the canvas."""
    a, b, _ = sdxl
    tiles = {"prompts": [PROMPTS], "tile_height": 32, "tile_width": 32, "tile_col_overlap": 16, "model": "b"}
    region = {"row_init": 8, "row_end": 32, "col_init": 16, "col_end": 40, "prompt": "a red star", "model": "a"}
    recipe = {**_mod([a, b], [region]), "params": {"regions": [region], "tiles": tiles, "tile_batch_size": 2}}
    recipe["sampling"] = {k: v for k, v in recipe["sampling"].items() if k not in ("height", "width")}  # the tiles' canvas
    steps = []
    out = run(recipe, models=[a, b], callback=steps.append, progress=False).latents
    assert out.shape == (2, 4, 8, 12) and len(steps) == 4
    canvas = (8, 12)
    parts = [
        (a, "a red star", (2, 8, 4, 10)),
        (b, PROMPTS[0], (0, 8, 0, 8)),
        (b, PROMPTS[1], (0, 8, 4, 12)),
    ]  # regions, then tiles
    own = [m.guide(p, batch_size=2).windowed(box, canvas) for m, p, box in parts]
    boxes = [box for _, _, box in parts]
    weights = [region_weight(box[1] - box[0], box[3] - box[2]) for box in boxes]
    for step in steps:
        x, t = step.model_input[0], step.t[0]
        preds = [g(x[:, :, r0:r1, c0:c1], t) for g, (r0, r1, c0, c1) in zip(own, boxes)]
        # float64 by hand against float32 and a batch of two tiles in the library
        torch.testing.assert_close(step.eps[0].double(), mixed(preds, boxes, weights, canvas), rtol=1e-5, atol=1e-6)


def test_an_sdxl_model_and_an_sd_model_are_refused_before_loading(tiny_sdxl_dir, tiny_a, monkeypatch):
    import multifusion.api as api

    monkeypatch.setattr(api, "load_recipe_models", lambda r: pytest.fail("models were loaded"))
    for method in ("average", "snb", "amdm"):
        with pytest.raises(
            IncompatibleModelsError,
            match=r"models\[1\].model: models\[1\] is SDXL and models\[0\] Stable "
            r"Diffusion 1.x/2.x: their VAEs encode different latent spaces \(VAE scaling_factor 0.13025 vs 0.18215\)",
        ):
            mf.fuse(method, [tiny_a, str(tiny_sdxl_dir / "a")], PROMPTS, progress=False)


def test_loaded_sdxl_and_sd_models_are_refused_with_the_reason(sdxl, tiny_a):
    """The check after loading (models whose configs were not local, such as Hub ids)."""
    from multifusion.families import check_same_latent_space

    [sd] = load_models([tiny_a])
    with pytest.raises(
        IncompatibleModelsError,
        match=r"model '.*' is Stable Diffusion 1.x/2.x and model 'a' SDXL: their VAEs encode different latent spaces",
    ):
        check_same_latent_space([sdxl[0], sd])


def test_offload_runs_several_sdxl_models_one_module_at_a_time(tiny_sdxl_dir):
    """Both text encoders of each model, then the UNets in turn, then the VAE; the latents equal
    a run without offload."""
    paths = [str(tiny_sdxl_dir / k) for k in "ac"]
    ha, hc = load_models(paths, offload=True)
    order = []
    activate = ha.offloader.activate

    def recording(module):
        if module is not ha.offloader.active:
            order.append(type(module).__name__)
        activate(module)

    ha.offloader.activate = recording
    ref = mf.average([ha, hc], PROMPTS, num_inference_steps=2, progress=False, height=32, width=48).latents
    # c retrains both text encoders; the negatives are zeros (no encoder run)
    assert order == ["CLIPTextModel", "CLIPTextModelWithProjection"] * 2 + ["UNet2DConditionModel"] * 4 + ["AutoencoderKL"]
    plain = mf.average(load_models(paths), PROMPTS, num_inference_steps=2, progress=False, height=32, width=48).latents
    assert torch.equal(ref, plain)


def test_large_sdxl_canvas_decodes_tiled_on_the_vae_device(sdxl, monkeypatch):
    """Above 4x the native area (32 px here, 1024 px for SDXL) the VAE decodes in tiles, on
    runtime.vae_device in float32."""
    a = sdxl[0]
    tiled = []
    real = a.vae._decode
    monkeypatch.setattr(a.vae, "_decode", lambda z, *k, **kw: (tiled.append(a.vae.use_tiling), real(z, *k, **kw))[1])
    out = mf.single(a, PROMPTS[0], num_inference_steps=2, progress=False, height=96, width=128, runtime={"vae_device": "cpu"})
    assert out.images[0].size == (128, 96) and True in tiled and a.vae.dtype == torch.float32


def test_the_sdxl_refiner_is_refused_before_loading(tiny_sdxl_dir, tmp_path, monkeypatch):
    import json
    import shutil

    import multifusion.api as api
    from multifusion import ModelLoadError

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl_dir / "a", refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    monkeypatch.setattr(api, "load_recipe_models", lambda r: pytest.fail("models were loaded"))
    with pytest.raises(
        ModelLoadError,
        match=r"models\[0\].model: .* is a StableDiffusionXLImg2ImgPipeline \(the SDXL refiner "
        r"refines images and is not supported\); the models that can be combined are: .*StableDiffusionPipeline, "
        r"StableDiffusionXLPipeline",
    ):
        mf.single(str(refiner), PROMPTS[0], progress=False)


def test_an_sdxl_pipeline_without_its_first_text_encoder_is_refused_on_loading(tiny_sdxl_dir, tmp_path):
    import json
    import shutil

    from multifusion import ModelLoadError

    folder = tmp_path / "no_te"
    shutil.copytree(tiny_sdxl_dir / "a", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None], "tokenizer": [None, None]}))
    with pytest.raises(ModelLoadError, match=r"models\[0\].model: this SDXL pipeline has no first text encoder"):
        load_models([str(folder)], fields=["models[0].model"])


def test_an_snb_or_average_region_conditions_its_models_on_the_window(sdxl):
    """Combinators painting a region pass the window on to their models; over the whole canvas
    the region is the combinator itself, exactly."""
    from multifusion.noise.average import Average
    from multifusion.noise.snb import SNB

    a, _, c = sdxl
    ga, gc = a.guide(PROMPTS[0], batch_size=1), c.guide(PROMPTS[1], batch_size=1)
    for fn in (SNB([ga, gc], [1.0, 1.0]), Average([ga, gc], [0.5, 0.5])):
        canvas = Canvas(
            [
                Region((0, 8, 4, 12), fn, region_weights(8, 8, "constant")),
                Region((0, 8, 0, 4), ga, region_weights(8, 4, "constant")),
            ],
            (8, 12),
        )
        inner = canvas.regions[0].fn
        members = inner.guided if isinstance(inner, SNB) else inner.fns
        assert all(g.positive.extra["time_ids"].tolist() == [[32, 48, 0, 16, 32, 32]] for g in members)
        whole = Canvas([Region((0, 8, 0, 12), fn, region_weights(8, 12))], (8, 12))
        x = initial_noise((4, 8, 12), [torch.Generator().manual_seed(0)])
        assert torch.equal(whole(x, torch.tensor(500)), fn(x, torch.tensor(500)))


def test_a_half_precision_vae_that_asks_for_float32_gets_it(tiny_sdxl_dir):
    """force_upcast (SDXL base's VAE overflows in float16): decoded in float32, as the pipeline
    does; a VAE without the flag (the fp16-fix one) and bfloat16 keep their dtype."""
    [h] = load_models([str(tiny_sdxl_dir / "a")], dtype="float16")
    assert h.vae.config.force_upcast and h.ready_vae().dtype == torch.float32
    [h] = load_models([str(tiny_sdxl_dir / "a")], dtype="bfloat16")
    assert h.ready_vae().dtype == torch.bfloat16
    [h] = load_models([str(tiny_sdxl_dir / "a")], dtype="float16")
    h.vae.register_to_config(force_upcast=False)
    assert h.ready_vae().dtype == torch.float16
