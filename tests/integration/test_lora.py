"""LoRAs as models (issue 26, section 1) on tiny Stable Diffusion pipelines: `single` with one and
two LoRAs equals diffusers' pipeline with `load_lora_weights` + `set_adapters`; every method over
(base, base + LoRA) equals the same method over (base, the LoRA fused into a full copy); models on
one base hold it once; bad LoRAs are refused naming `models[i].loras[j]` before sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from multifusion import RecipeError, load_models, single
from multifusion.api import Run, run
from multifusion.errors import ModelLoadError, MultifusionError, PickleRefusedError
from multifusion.loading import held_bytes
from multifusion.recipe import parse_recipe
from multifusion.schedulers import scheduler_class
from multifusion.validate import validate

PROMPT = "a red circle in a snowy field"
STEPS = 5


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    """LoRAs of tiny pipeline `a`: `te` on the UNet and the text encoder, `unet` on the UNet only,
    `kohya` the `te` LoRA in kohya/A1111 key names, and `fused`: `a` with `te` fused in at 0.8."""
    from multifusion.testing.lora import to_kohya, write_fused, write_random_lora

    root = tmp_path_factory.mktemp("loras")
    a = tiny_dir / "a"
    te = write_random_lora(a, root / "te", seed=1, text_encoders=True)
    unet = write_random_lora(a, root / "unet", seed=2)
    kohya = to_kohya(te, root / "te_kohya.safetensors")
    fused = write_fused(a, te, root / "fused", scale=0.8)
    return {"a": str(a), "te": te, "unet": unet, "kohya": kohya, "fused": str(fused), "root": root}


def _diffusers_latents(base: str, applied: list[tuple[Path, float]], seeds: list[int], scheduler: str = "ddim") -> torch.Tensor:
    """diffusers' own pipeline with the LoRAs loaded and set as a user does."""
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    for k, (file, _) in enumerate(applied):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=f"l{k}")
    if applied:
        pipe.set_adapters([f"l{k}" for k in range(len(applied))], adapter_weights=[s for _, s in applied])
    pipe.scheduler = scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images


def _lora(file, scale=1.0, **kw) -> dict:
    return {"path": str(file), "scale": scale, **kw}


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_single_with_one_and_two_loras_equals_diffusers(loras, scheduler):
    """Tolerance 1e-5 (as `single` against the plain pipeline): the same peft layers at the same
    scales run the same operations; measured 0 on CPU."""
    one = [(loras["te"], 0.8)]
    two = [(loras["te"], 0.5), (loras["unet"], 1.2)]
    base, h1, h2 = load_models([loras["a"]] * 3, loras=[[], [_lora(f, s) for f, s in one], [_lora(f, s) for f, s in two]])
    kw = dict(num_inference_steps=STEPS, scheduler=scheduler, seed=7, num_images=2, progress=False)
    for h, applied in ((h1, one), (h2, two), (base, [])):  # the base after its LoRA models: adapters switched off
        ours = single(h, PROMPT, **kw).latents
        theirs = _diffusers_latents(loras["a"], applied, [7, 8], scheduler)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    plain = single(load_models([loras["a"]])[0], PROMPT, **kw).latents
    assert not torch.allclose(single(h1, PROMPT, **kw).latents, plain, atol=1e-2)  # the LoRA changes the image


def test_kohya_file_equals_diffusers_and_the_peft_file(loras):
    [h] = load_models([loras["a"]], loras=[[_lora(loras["kohya"], 0.8)]])
    kw = dict(num_inference_steps=STEPS, seed=2, progress=False)
    ours = single(h, PROMPT, **kw).latents
    torch.testing.assert_close(ours, _diffusers_latents(loras["a"], [(loras["kohya"], 0.8)], [2]), atol=1e-5, rtol=1e-5)
    [peft] = load_models([loras["a"]], loras=[[_lora(loras["te"], 0.8)]])
    # The same tensors in two layouts; 1e-4 covers the float order of diffusers' conversions.
    torch.testing.assert_close(ours, single(peft, PROMPT, **kw).latents, atol=1e-4, rtol=1e-4)


def test_models_on_one_base_hold_it_once(loras):
    """N LoRA models cost one base plus N LoRAs: every module is the base's, counted once."""
    [plain] = load_models([loras["a"]])
    handles = load_models([loras["a"]] * 3, loras=[[], [_lora(loras["te"])], [_lora(loras["unet"]), _lora(loras["te"], 0.3)]])
    assert all(h.unet is handles[0].unet and h.text_encoder is handles[0].text_encoder for h in handles)
    lora_bytes = sum(f.stat().st_size for f in (loras["te"], loras["unet"]))  # float32 files: their tensors' bytes
    assert held_bytes(handles) <= held_bytes([plain]) + lora_bytes
    assert held_bytes(handles) < 1.5 * held_bytes([plain])
    two_full = load_models([loras["a"], loras["fused"]], share=False)
    assert held_bytes(handles) < held_bytes(two_full)


def test_models_of_one_base_share_denoiser_calls(loras):
    """Average and SNB's models on one base (`predict_many`): the base and models with one LoRA
    each run in ONE denoiser call (peft's mixed batch) and give what each gives alone (1e-5: only
    the batch differs); a model with two LoRAs, or a LoRA at a second weight, runs apart; and the
    models alone give the same afterwards (the mixed call leaves no scale or adapter behind)."""
    from multifusion.handles import predict_many

    handles = load_models(
        [loras["a"]] * 5,
        loras=[
            [],
            [_lora(loras["te"], 0.8)],
            [_lora(loras["unet"], 0.6)],
            [_lora(loras["unet"], 0.3)],
            [_lora(loras["unet"]), _lora(loras["te"])],
        ],
        names=["base", "te", "unet", "unet-weak", "both"],
    )
    guided = [h.guide(PROMPT, negative_prompt="blurry", guidance_scale=5.0, batch_size=2) for h in handles]
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    alone = [g.predict(x, t, need_uncond=True) for g in guided]
    assert all(not torch.allclose(alone[0].eps, p.eps, atol=1e-3) for p in alone[1:])  # five different models
    calls = []
    hook = handles[0].unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        for members, batches in (([0, 1, 2], [12]), ([0, 1, 2, 3], [12, 4]), ([1, 4, 2], [8, 4])):
            calls.clear()
            preds = predict_many([guided[i] for i in members], x, t, need_uncond=True)
            assert sorted(calls, reverse=True) == batches, (members, calls)  # 2 images x 2 halves per model
            for i, p in zip(members, preds):
                for part in ("eps", "uncond", "cond"):
                    torch.testing.assert_close(getattr(p, part), getattr(alone[i], part), atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()
    for g, before in zip(guided, alone):
        assert torch.equal(g.predict(x, t, need_uncond=True).eps, before.eps)
    guided[4].predict(x, t)  # its two adapters active; a mixed call; then it again, as it was
    predict_many(guided[:3], x, t)
    assert torch.equal(guided[4].predict(x, t, need_uncond=True).eps, alone[4].eps)


def test_a_dora_adapter_keeps_its_models_apart(loras):
    """peft refuses DoRA adapters in a mixed batch: models of one base with one are not grouped
    (`per_sample_names` None), and `per_sample_adapters` refuses them naming DoRA."""
    from multifusion.lora import per_sample_adapters, per_sample_names

    base, unet = load_models([loras["a"]] * 2, loras=[[], [_lora(loras["unet"])]], names=["base", "unet"])
    name = unet.adapters.names[0]
    assert per_sample_names([base.adapters, unet.adapters], unet.unet) is not None
    layers = [m for m in unet.unet.modules() if hasattr(m, "use_dora") and name in m.use_dora]
    assert layers
    try:
        layers[0].use_dora[name] = True  # one layer is enough to refuse the batch
        assert per_sample_names([base.adapters, unet.adapters], unet.unet) is None
        with pytest.raises(ValueError, match="DoRA"), per_sample_adapters(unet.unet, ["__base__", name], {name: 1.0}):
            pass
    finally:
        layers[0].use_dora[name] = False


def _recipe(method: str, models: list[dict], params: dict | None = None, **sampling) -> dict:
    return {
        "method": method,
        "models": models,
        "params": params or {},
        "prompt": PROMPT,
        "sampling": {"num_inference_steps": STEPS, "seed": 3, "num_images": 2, **sampling},
    }


REGIONS = [
    {"row_init": 0, "row_end": 1, "col_init": 0, "col_end": 0.5, "units": "fraction", "prompt": PROMPT, "model": "m0"},
    {"row_init": 0, "row_end": 1, "col_init": 0.5, "col_end": 1, "units": "fraction", "prompt": "a blue square", "model": "m1"},
]
METHODS = [
    ("average", {"weights": [0.4, 0.6]}, {}),
    ("snb", {}, {}),
    ("amdm", {"specified": 1}, {}),
    ("mod", {"regions": REGIONS}, {"width": 64}),
]


@pytest.mark.parametrize("method, params, sampling", METHODS, ids=[m[0] for m in METHODS])
def test_methods_over_base_and_lora_equal_the_fused_model(loras, method, params, sampling):
    """(base, base + LoRA at 0.8) against (base, the LoRA fused into a full copy at 0.8): the
    adapter switched per call must give what a separate model gives. 1e-4: fusing adds s B A into
    W in float32, the adapter adds it to W x after the matmul."""
    lora_model = {"model": loras["a"], "name": "m1", "loras": [_lora(loras["te"], 0.8)]}
    with_lora = run(_recipe(method, [{"model": loras["a"], "name": "m0"}, lora_model], params, **sampling), progress=False)
    fused = run(
        _recipe(method, [{"model": loras["a"], "name": "m0"}, {"model": loras["fused"], "name": "m1"}], params, **sampling),
        progress=False,
    )
    torch.testing.assert_close(with_lora.latents, fused.latents, atol=1e-4, rtol=1e-4)
    alone = run(
        _recipe(method, [{"model": loras["a"], "name": "m0"}, {"model": loras["a"], "name": "m1"}], params, **sampling),
        progress=False,
    )
    assert not torch.allclose(with_lora.latents, alone.latents, atol=1e-3)  # the LoRA model took part


def test_mod_paints_each_region_with_its_own_lora(loras):
    """Four regions, four models on one base: the base and three LoRA sets, against the same
    regions painted by full models (the two LoRAs fused, and the base twice)."""
    quarter = [(0, 0.5, 0, 0.5), (0, 0.5, 0.5, 1), (0.5, 1, 0, 0.5), (0.5, 1, 0.5, 1)]
    regions = [
        {"row_init": r0, "row_end": r1, "col_init": c0, "col_end": c1, "units": "fraction", "prompt": PROMPT, "model": f"m{k}"}
        for k, (r0, r1, c0, c1) in enumerate(quarter)
    ]
    lora_models = [
        {"model": loras["a"], "name": "m0"},
        {"model": loras["a"], "name": "m1", "loras": [_lora(loras["te"], 0.8)]},
        {"model": loras["a"], "name": "m2", "loras": [_lora(loras["unet"], 1.0)]},
        {"model": loras["a"], "name": "m3", "loras": [_lora(loras["te"], 0.8), _lora(loras["unet"], 0.0)]},
    ]
    full = [
        {"model": loras["a"], "name": "m0"},
        {"model": loras["fused"], "name": "m1"},
        {"model": loras["a"], "name": "m2", "loras": [_lora(loras["unet"], 1.0)]},
        {"model": loras["fused"], "name": "m3"},
    ]
    params = {"regions": regions}
    ours = run(_recipe("mod", lora_models, params, height=64, width=64), progress=False).latents
    theirs = run(_recipe("mod", full, params, height=64, width=64), progress=False).latents
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_region_attention_draws_every_region_with_the_lora_model(loras):
    """region-attention (one model draws all regions, issue 28) over base + LoRA equals it over the
    LoRA fused into a full copy: the regional processors call the model's own (here peft-wrapped)
    projections, so the adapter takes part in every region's attention."""
    regions = [{k: v for k, v in r.items() if k != "model"} for r in REGIONS]
    params = {"regions": regions, "base_prompt": PROMPT, "base_ratio": 0.3}
    lora_model = [{"model": loras["a"], "loras": [_lora(loras["te"], 0.8)]}]
    ours = run(_recipe("region-attention", lora_model, params), progress=False).latents
    theirs = run(_recipe("region-attention", [{"model": loras["fused"]}], params), progress=False).latents
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    base = run(_recipe("region-attention", [{"model": loras["a"]}], params), progress=False).latents
    assert not torch.allclose(ours, base, atol=1e-3)  # the LoRA took part


# --- refused before sampling ---------------------------------------------------------------


def _bad(loras, lora: dict, method: str = "single", allow_pickle: bool = False) -> dict:
    r = _recipe(method, [{"model": loras["a"], "loras": [_lora(loras["unet"]), lora]}])
    r["runtime"] = {"allow_pickle": allow_pickle}
    return r


@pytest.fixture(scope="module")
def bad_files(loras, tmp_path_factory):
    from safetensors.torch import save_file

    from multifusion.testing import build_tiny_sdxl_pipeline
    from multifusion.testing.lora import write_random_lora

    root = tmp_path_factory.mktemp("bad_loras")
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    pickled = root / "lora.bin"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, pickled)
    nothing = root / "nothing.safetensors"
    save_file(
        {"unet.no_such_block.to_q.lora_A.weight": torch.ones(4, 32), "unet.no_such_block.to_q.lora_B.weight": torch.ones(32, 4)},
        nothing,
    )
    prefix = root / "flux_prefix.safetensors"  # keys for a `transformer`, which this pipeline does not have
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32)}, prefix)
    part = root / "part.safetensors"  # the UNet LoRA plus one layer the UNet does not have
    from safetensors.torch import load_file

    extra = {
        "unet.no_such_block.to_q.lora.down.weight": torch.ones(4, 32),
        "unet.no_such_block.to_q.lora.up.weight": torch.ones(32, 4),
    }
    save_file({**load_file(str(loras["unet"])), **extra}, part)
    full = root / "full.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2)}, full)
    sdxl = build_tiny_sdxl_pipeline(root / "sdxl", seed=0)
    other = write_random_lora(sdxl, root / "sdxl_lora", seed=3)
    return {
        "garbage": garbage,
        "pickle": pickled,
        "nothing": nothing,
        "full": full,
        "prefix": prefix,
        "part": part,
        "other": other,
        "missing": root / "absent.safetensors",
    }


BEFORE_LOADING = [  # (case, file key, error type, what the message names)
    ("missing file", "missing", ModelLoadError, "models[0].loras[1].path"),
    ("garbage file", "garbage", ModelLoadError, "models[0].loras[1].path"),
    ("pickle file", "pickle", PickleRefusedError, "models[0].loras[1].path"),
    ("a full checkpoint", "full", ModelLoadError, "models[0].loras[1].path"),
]


@pytest.mark.parametrize("case, key, kind, field", BEFORE_LOADING, ids=[c[0] for c in BEFORE_LOADING])
def test_bad_lora_files_are_refused_before_loading(loras, bad_files, case, key, kind, field):
    with pytest.raises(kind) as err:
        validate(parse_recipe(_bad(loras, _lora(bad_files[key]))))
    assert str(err.value).startswith(field), str(err.value)


AT_LOADING = [  # (case, file key, what the message says after naming models[0].loras[1])
    ("a LoRA of another architecture", "other", "does not apply"),
    ("keys matching no layer", "nothing", "matches a layer"),
    ("keys for another component", "prefix", "matches a layer"),
    ("keys matching in part", "part", "only in part"),
]


@pytest.mark.parametrize("case, key, says", AT_LOADING, ids=[c[0] for c in AT_LOADING])
def test_loras_that_do_not_fit_are_refused_when_they_load(loras, bad_files, case, key, says):
    """Known only once the base is loaded (diffusers converts the keys), still before sampling."""
    with pytest.raises(ModelLoadError) as err:
        Run(_bad(loras, _lora(bad_files[key])))
    message = str(err.value)
    assert message.startswith("models[0].loras[1]: ") and says in message, message


def test_a_pickle_lora_loads_when_pickles_are_allowed(loras, bad_files, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "te.bin"
    torch.save(load_file(str(loras["te"])), pickled)
    r = _recipe("single", [{"model": loras["a"], "loras": [_lora(pickled, 0.8)]}])
    r["runtime"] = {"allow_pickle": True}
    ref = run(_recipe("single", [{"model": loras["a"], "loras": [_lora(loras["te"], 0.8)]}]), progress=False).latents
    torch.testing.assert_close(run(r, progress=False).latents, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e6])
def test_a_scale_that_is_not_a_finite_number_is_refused(loras, scale):
    with pytest.raises(RecipeError) as err:
        parse_recipe(_bad(loras, _lora(loras["te"], scale)))
    assert "models[0].loras[1].scale" in str(err.value)


def test_one_name_for_two_lora_files_is_refused(loras):
    r = _recipe("single", [{"model": loras["a"], "loras": [_lora(loras["te"], name="x"), _lora(loras["unet"], name="x")]}])
    with pytest.raises(ModelLoadError, match=r"^models\[0\]\.loras\[1\]\.name"):
        Run(r)


def test_two_unnamed_models_of_one_base_with_other_loras_need_names(loras):
    r = _recipe("average", [{"model": loras["a"]}, {"model": loras["a"], "loras": [_lora(loras["te"])]}])
    with pytest.raises(RecipeError, match=r"models\[1\]\.name"):
        parse_recipe(r)


@pytest.mark.parametrize("method", ["afa", "merge"])
def test_methods_needing_own_denoisers_refuse_lora_models_with_the_reason(loras, method):
    models = [{"model": loras["a"], "name": "m0"}, {"model": loras["a"], "name": "m1", "loras": [_lora(loras["te"])]}]
    with pytest.raises(RecipeError) as err:
        validate(parse_recipe(_recipe(method, models)))
    assert str(err.value).startswith("models[1].loras") and "fuse the LoRA" in str(err.value)
    # Handles given from Python are refused too, before the method prepares.
    handles = load_models([loras["a"]] * 2, loras=[[], [_lora(loras["te"])]])
    with pytest.raises(MultifusionError, match=r"^models\[0\]"):
        Run(_recipe(method, [{"model": loras["a"]}, {"model": loras["a"]}]), models=handles)


@pytest.mark.parametrize("key", ["other", "garbage"])
def test_cli_refuses_a_bad_lora_with_the_field_and_writes_nothing(loras, bad_files, key, tmp_path, capsys):
    import yaml

    from multifusion.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_bad(loras, _lora(bad_files[key]))))
    code = main(["generate", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "models[0].loras[1]" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_a_text_encoder_lora_stays_with_its_models(loras, tiny_dir):
    """Model b shares a's text encoder weights (held once when both are plain); with a LoRA on a's
    encoder, b keeps its own encoder, in any order, and runs as it does alone."""
    b = str(tiny_dir / "b")
    kw = dict(num_inference_steps=3, seed=1, progress=False)
    alone = single(load_models([b])[0], PROMPT, **kw).latents
    for refs, sets, k in (
        ([loras["a"], b, loras["a"]], [[], [], [_lora(loras["te"])]], 1),
        ([b, loras["a"]], [[], [_lora(loras["te"])]], 0),
    ):
        handles = load_models(refs, loras=sets)
        for h in handles:
            if h is not handles[k]:
                single(h, PROMPT, **kw)  # the other models run first, switching the shared modules
        assert torch.equal(single(handles[k], PROMPT, **kw).latents, alone)
        assert handles[k].text_encoder is not handles[-1].text_encoder


def test_offload_and_load_model_take_loras(loras):
    from multifusion.loading import load_model

    kw = dict(num_inference_steps=3, seed=1, progress=False)
    h = load_model(loras["a"], loras=[_lora(loras["te"], 0.8)])
    ref = single(h, PROMPT, **kw).latents
    base, offloaded = load_models([loras["a"]] * 2, loras=[[], [_lora(loras["te"], 0.8)]], offload=True)
    single(base, PROMPT, **kw)
    torch.testing.assert_close(single(offloaded, PROMPT, **kw).latents, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ModelLoadError, match=r"^loras\[0\]\.path"):
        load_model(loras["a"], loras=[_lora(loras["root"] / "absent.safetensors")])


def test_python_handles_with_loras_write_a_recipe_that_regenerates_them(loras):
    """`average([base, lora_model])` from Python: unnamed models of one base are told apart by
    their adapters, and the run's recipe (what each PNG's metadata holds) names the LoRAs, so
    running it alone, from files, gives the same latents."""
    from multifusion import average

    base, with_lora = load_models([loras["a"]] * 2, loras=[[], [_lora(loras["te"], 0.8)]])
    assert base.name == loras["a"] and with_lora.name == f"{loras['a']}+te"
    result = average([base, with_lora], PROMPT, weights=[0.5, 0.5], num_inference_steps=3, seed=2, progress=False)
    assert result.recipe.models[1].loras[0].path == str(loras["te"]) and result.recipe.models[1].loras[0].scale == 0.8
    assert not result.recipe.models[0].loras
    assert torch.equal(run(result.recipe, progress=False).latents, result.latents)


def test_a_lora_folder_names_its_one_file(loras, tmp_path):
    """A folder is read as diffusers saves one (pytorch_lora_weights.safetensors), or by its only
    .safetensors file; a folder of several is refused, asking for the file."""
    import shutil

    from multifusion.lora import lora_file

    assert lora_file(str(loras["te"].parent)) == loras["te"]
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(loras["kohya"], one / "style.safetensors")
    assert lora_file(str(one)) == one / "style.safetensors"
    shutil.copy(loras["te"], one / "other.safetensors")
    with pytest.raises(ModelLoadError, match="several .safetensors files"):
        lora_file(str(one))
    [by_folder] = load_models([loras["a"]], loras=[[_lora(loras["te"].parent, 0.8)]])
    [by_file] = load_models([loras["a"]], loras=[[_lora(loras["te"], 0.8)]])
    kw = dict(num_inference_steps=2, seed=0, progress=False)
    assert by_folder.name == by_file.name == f"{loras['a']}+te"
    assert torch.equal(single(by_folder, PROMPT, **kw).latents, single(by_file, PROMPT, **kw).latents)
