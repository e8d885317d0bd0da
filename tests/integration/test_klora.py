"""K-LoRA (issue 27; features/klora.py) on a tiny Stable Diffusion pipeline with random test
LoRAs of one base: the degenerate cases equal `single`, a subject + style pair recomputed from the
LoRA files (top-K sums, gamma and the per-step choice written out here, each layer's adapter set by
hand), and bad inputs refused naming the field before any model loads."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

from multifusion.api import Run, run
from multifusion.errors import RecipeError
from multifusion.handles import Guided
from multifusion.loop import Trajectory, initial_noise, sample
from multifusion.method import Batch
from multifusion.recipe import parse_recipe
from multifusion.validate import validate

PROMPT = "a red circle in a snowy field"
STEPS = 6
SCALE = 0.8


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    """Random UNet LoRAs of tiny pipeline `a`: `subject` (rank 4), `style` (rank 2, other seed),
    `copy` (the subject's file under another folder) and `zero` (an update of zeros)."""
    from multifusion.testing.lora import write_random_lora

    root = tmp_path_factory.mktemp("klora")
    a = tiny_dir / "a"
    subject = write_random_lora(a, root / "subject", seed=1)
    (root / "copy").mkdir()
    shutil.copy(subject, root / "copy" / subject.name)
    return {
        "a": str(a),
        "subject": subject,
        "style": write_random_lora(a, root / "style", seed=2, rank=2, std=0.12),
        "copy": root / "copy" / subject.name,
        "zero": write_random_lora(a, root / "zero", seed=3, std=0.0),
    }


def _recipe(method: str, loras, files, params: dict | None = None, **sampling) -> dict:
    model = {"model": loras["a"], "loras": [{"path": str(loras[f]), "scale": SCALE} for f in files]}
    return {
        "method": method,
        "models": [model],
        "params": params or {},
        "prompt": PROMPT,
        "sampling": {"num_inference_steps": STEPS, "seed": 3, "num_images": 2, **sampling},
    }


def _latents(recipe: dict) -> torch.Tensor:
    return run(recipe, progress=False).latents


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_the_same_lora_twice_equals_single(loras, scheduler):
    """Subject and style the same LoRA (two copies of one file): every layer runs that LoRA's
    update, whichever it picks, so the run is `single` with it, exactly."""
    ours = _latents(_recipe("k-lora", loras, ["subject", "copy"], scheduler=scheduler))
    assert torch.equal(ours, _latents(_recipe("single", loras, ["subject"], scheduler=scheduler)))
    assert not torch.allclose(ours, _latents(_recipe("single", loras, [], scheduler=scheduler)), atol=1e-3)


def test_a_style_of_zero_update_leaves_every_layer_to_the_subject(loras):
    """A style LoRA whose update is zero: S_s = 0 on every layer, so every layer picks the subject
    at every step and the run is `single` with the subject LoRA alone."""
    used = []
    recipe = _recipe("k-lora", loras, ["subject", "zero"])
    ours = run(recipe, progress=False, callback=lambda step: used.append(step.record["k-lora/subject_layers"])).latents
    r = Run(recipe)
    assert used == [len(r.prepared.chosen.layers)] * STEPS and used[0] > 0
    assert torch.equal(ours, _latents(_recipe("single", loras, ["subject"])))


def _expected_choices(loras, k: int | None, calls: int) -> dict[str, list[bool]]:
    """From the files alone: for each attention projection (its module path), whether the
    subject runs at each of the `calls` denoiser calls. dW = scale * (alpha / r) B A with alpha = r (the test LoRAs)."""
    sub, sty = load_file(str(loras["subject"])), load_file(str(loras["style"]))
    layers = sorted(key[: -len(".lora.down.weight")] for key in sub if key.endswith(".lora.down.weight"))
    deltas = {}
    for key in layers:
        dc = SCALE * sub[key + ".lora.up.weight"].float() @ sub[key + ".lora.down.weight"].float()
        ds = SCALE * sty[key + ".lora.up.weight"].float() @ sty[key + ".lora.down.weight"].float()
        kk = k or sub[key + ".lora.down.weight"].shape[0] * sty[key + ".lora.down.weight"].shape[0]
        deltas[key] = (
            dc.abs().flatten().sort(descending=True).values[:kk].sum(),
            ds.abs().flatten().sort(descending=True).values[:kk].sum(),
            dc.abs().sum() / ds.abs().sum(),
        )
    ratios = [float(r) for _, _, r in deltas.values()]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    out = {}
    for key, (sc, ss, _) in deltas.items():
        out[key.removeprefix("unet.")] = [float(sc) / gamma > float(ss) * (1.5 * (i + 0.5) / calls + 0.5) for i in range(calls)]
    return out


@pytest.mark.parametrize("k, scheduler, calls", [(None, "ddim", STEPS), (3, "heun", 2 * STEPS - 1)])
def test_subject_and_style_recomputed_from_the_files(loras, k, scheduler, calls):
    """The run equals the shared loop with each layer's adapter set by hand at each step from the
    choices computed here from the LoRA files; the choices both change over the run and differ
    between layers (so the test sees the schedule and the per-layer comparison). Heun's n steps
    are 2n - 1 denoiser calls, and the progress counts calls."""
    recipe = _recipe("k-lora", loras, ["subject", "style"], {} if k is None else {"k": k}, scheduler=scheduler)
    ours = _latents(recipe)
    expected = _expected_choices(loras, k, calls)
    columns = {tuple(c) for c in expected.values()}
    assert len(columns) > 1 and any(len(set(c)) > 1 for c in columns)

    r = Run(recipe)
    handle = r.handles[0]
    subject, style = handle.adapters.names
    unet = handle.unet
    seeds = [3, 4]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    batch = Batch(seeds, [0, 1], initial_noise(r.latent_shape, generators))
    g = r.ctx.guide(0, [PROMPT] * 2)
    bare = Guided(dataclasses.replace(handle, adapters=None), g.positive, g.negative, g.guidance_scale, g.prompts)
    step = iter(range(calls))

    def by_hand(x_t, t, record=None):
        i = next(step)
        for path, picks in expected.items():
            layer = unet.get_submodule(path)
            name = subject if picks[i] else style
            layer.set_adapter([name])
            layer.set_scale(name, SCALE)
        return bare(x_t, t)

    scheduler = handle.scheduler(r.recipe.sampling.scheduler, r.latent_shape[1:])
    tr = Trajectory(by_hand, scheduler=scheduler, noise=batch.noise)
    assert torch.equal(ours, sample([tr], num_inference_steps=STEPS, generators=generators, progress=False)[0])
    for alone in ("subject", "style"):
        assert not torch.allclose(ours, _latents(_recipe("single", loras, [alone])), atol=1e-3)


@pytest.mark.parametrize(
    "files, params, field",
    [
        (["subject", "style", "copy"], {}, "models[0].loras: method 'k-lora' takes exactly 2 LoRAs per model"),
        (["subject"], {}, "models[0].loras: method 'k-lora' takes exactly 2 LoRAs per model"),
        ([], {}, "models[0].loras: method 'k-lora' takes exactly 2 LoRAs per model, in this order: subject, style"),
        (["subject", "style"], {"k": 0}, "params.k"),
        (["subject", "style"], {"schedule": "t"}, "params.schedule"),
        (["subject", "style"], {"alpha": 0}, "params.alpha"),
    ],
)
def test_bad_inputs_are_refused_before_loading(loras, files, params, field):
    with pytest.raises(RecipeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate(parse_recipe(_recipe("k-lora", loras, files, params)))


def test_from_python_on_a_shared_base(loras):
    """Handles of one base from `load_models`: `fuse("k-lora", ...)` equals the recipe's run; the
    other models of the base run as before after it (its per-layer state is not mistaken for
    theirs); a handle with one LoRA is refused naming models[0].loras before sampling."""
    from multifusion import fuse, load_models, single

    lora = [{"path": str(loras[f]), "scale": SCALE} for f in ("subject", "style")]
    base, subject, both = load_models([loras["a"]] * 3, loras=[[], lora[:1], lora])
    kw = dict(num_inference_steps=STEPS, seed=3, num_images=2, progress=False)
    before = single(subject, PROMPT, **kw).latents
    plain = single(base, PROMPT, **kw).latents
    ours = fuse("k-lora", [both], PROMPT, **kw).latents
    assert torch.equal(ours, _latents(_recipe("k-lora", loras, ["subject", "style"])))
    assert torch.equal(single(subject, PROMPT, **kw).latents, before)
    assert torch.equal(single(base, PROMPT, **kw).latents, plain)
    with pytest.raises(
        RecipeError, match=r"models\[0\]\.loras.*takes exactly 2 LoRAs per model, in this order: subject, style; the model has 1"
    ):
        fuse("k-lora", [subject], PROMPT, **kw)


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def family(request, tmp_path_factory):
    """A tiny pipeline of another family with a random denoiser LoRA, a copy of it and a zero one."""
    from multifusion.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline
    from multifusion.testing.lora import write_random_lora

    name = request.param
    build = {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}[name]
    root = tmp_path_factory.mktemp(f"klora_{name}")
    base = root / "base"
    build(base, seed=0)
    subject = write_random_lora(base, root / "subject", seed=1)
    (root / "copy").mkdir()
    shutil.copy(subject, root / "copy" / subject.name)
    return {
        "name": name,
        "a": str(base),
        "subject": subject,
        "copy": root / "copy" / subject.name,
        "zero": write_random_lora(base, root / "zero", seed=3, std=0.0),
    }


def test_degenerate_cases_on_sdxl_sd3_flux(family):
    """SDXL (the paper's model), SD3 and FLUX (the reference's FLUX code chooses on the same
    projections by name; FLUX's single-stream blocks have no to_out): the same LoRA twice, and a
    style of zero update, equal `single` with the subject LoRA, exactly."""
    sampling = {} if family["name"] == "sdxl" else {"scheduler": "flow_euler", "height": 16, "width": 16}
    alone = _latents(_recipe("single", family, ["subject"], **sampling))
    assert torch.equal(_latents(_recipe("k-lora", family, ["subject", "copy"], **sampling)), alone)
    assert torch.equal(_latents(_recipe("k-lora", family, ["subject", "zero"], **sampling)), alone)
    assert not torch.allclose(alone, _latents(_recipe("single", family, [], **sampling)), atol=1e-4)


def test_loras_off_the_attention_projections_are_refused_before_sampling(loras, tmp_path):
    """Two LoRAs on the feed-forward layers only: nothing for K-LoRA to choose on, refused naming
    models[0].loras when the model has loaded, before any step."""
    from multifusion.errors import IncompatibleModelsError
    from multifusion.testing.lora import write_random_lora

    ff = {
        name: write_random_lora(loras["a"], tmp_path / name, seed=s, denoiser_targets=["ff.net.2"])
        for name, s in (("ff1", 4), ("ff2", 5))
    }
    steps = []
    with pytest.raises(IncompatibleModelsError, match=r"models\[0\]\.loras .*neither LoRA applies to an attention projection"):
        run(_recipe("k-lora", {**loras, **ff}, ["ff1", "ff2"]), progress=False, callback=steps.append)
    assert steps == []
