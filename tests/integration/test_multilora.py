"""LoRA Switch and LoRA Composite (issue 27; noise/multilora.py) on tiny Stable Diffusion
pipelines with random test LoRAs of one base: the degenerate cases equal `single`, two LoRA models
recomputed from their parts (the per-step schedule run by hand; the reference code's average of
the unconditional and conditional predictions), one Switch per batch, and bad inputs refused
naming the field before any model loads."""

from __future__ import annotations

import pytest
import torch

from multifusion.api import Run, run
from multifusion.errors import MultifusionError, RecipeError
from multifusion.loop import Trajectory, initial_noise, sample
from multifusion.method import Batch
from multifusion.recipe import parse_recipe
from multifusion.validate import validate

PROMPT = "a red circle in a snowy field"
STEPS = 5


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    """Two random LoRAs of tiny pipeline `a`: `te` on the UNet and the text encoder, `unet` on the
    UNet only."""
    from multifusion.testing.lora import write_random_lora

    root = tmp_path_factory.mktemp("multilora")
    a = tiny_dir / "a"
    return {
        "a": str(a),
        "te": write_random_lora(a, root / "te", seed=1, text_encoders=True),
        "unet": write_random_lora(a, root / "unet", seed=2),
        "wide": str(tiny_dir / "wide"),
    }


def _model(loras, name: str, *files, scale: float = 0.8) -> dict:
    return {"model": loras["a"], "name": name, "loras": [{"path": str(loras[f]), "scale": scale} for f in files]}


def _recipe(method: str, models: list[dict], params: dict | None = None, **sampling) -> dict:
    return {
        "method": method,
        "models": models,
        "params": params or {},
        "prompt": PROMPT,
        "sampling": {"num_inference_steps": STEPS, "seed": 3, "num_images": 2, **sampling},
    }


def _two(loras) -> list[dict]:
    return [_model(loras, "style", "te"), _model(loras, "texture", "unet")]


def _latents(recipe: dict, **kw) -> torch.Tensor:
    return run(recipe, progress=False, **kw).latents


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_degenerate_cases_equal_single(loras, scheduler):
    """Exact: one model, Switch with tau >= steps (the first model in `order` throughout), and
    Composite of one LoRA model (its weight normalised to exactly 1) call the same model on the
    same inputs as `single` does."""
    one, (style, texture) = [_model(loras, "style", "te")], _two(loras)
    single_style = _latents(_recipe("single", one, scheduler=scheduler))
    single_texture = _latents(_recipe("single", [texture], scheduler=scheduler))
    assert not torch.allclose(single_style, single_texture, atol=1e-3)  # the two LoRA models differ
    assert torch.equal(_latents(_recipe("lora-switch", one, {"tau": 1}, scheduler=scheduler)), single_style)
    assert torch.equal(_latents(_recipe("lora-composite", one, scheduler=scheduler)), single_style)
    both = [style, texture]
    assert torch.equal(_latents(_recipe("lora-switch", both, {"tau": STEPS}, scheduler=scheduler)), single_style)
    assert torch.equal(_latents(_recipe("lora-switch", both, {"tau": 99}, scheduler=scheduler)), single_style)
    flipped = {"tau": STEPS, "order": ["texture", "style"]}
    assert torch.equal(_latents(_recipe("lora-switch", both, flipped, scheduler=scheduler)), single_texture)


def _by_hand(recipe: dict, noise_fn) -> torch.Tensor:
    """The recipe's models conditioned as the run conditions them, sampled by the shared loop with
    `noise_fn(guided) -> (x_t, t) -> eps` instead of the method's own combiner."""
    r = Run(recipe)
    seeds = [recipe["sampling"]["seed"] + i for i in range(recipe["sampling"]["num_images"])]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    batch = Batch(seeds, list(range(len(seeds))), initial_noise(r.latent_shape, generators))
    scheduler = r.handles[0].scheduler(r.recipe.sampling.scheduler, r.latent_shape[1:])
    tr = Trajectory(noise_fn(r.ctx.guided(batch)), scheduler=scheduler, noise=batch.noise)
    return sample([tr], num_inference_steps=STEPS, generators=generators, progress=False)[0]


@pytest.mark.parametrize(
    "params, schedule",
    [
        ({"tau": 2}, [0, 0, 1, 1, 0]),
        ({"tau": 1, "order": [1, 0]}, [1, 0, 1, 0, 1]),
        ({"tau": 3, "order": ["texture", "style"]}, [1, 1, 1, 0, 0]),
    ],
)
def test_switch_of_two_lora_models_is_the_schedule_run_by_hand(loras, params, schedule):
    """The schedule is written out here from the paper's rule (each model for tau steps, in turn):
    the run must equal the loop driven by that list of models, step by step."""
    recipe = _recipe("lora-switch", _two(loras), params)
    ours = _latents(recipe)

    def scheduled(guided):
        turns = iter(schedule)
        return lambda x_t, t, record=None: guided[next(turns)](x_t, t, record)

    assert torch.equal(ours, _by_hand(recipe, scheduled))
    assert not torch.allclose(ours, _latents(_recipe("single", [_two(loras)[schedule[0]]])), atol=1e-3)  # both took part
    used = []
    run(recipe, progress=False, callback=lambda step: used.append(step.record["switch/model"]))
    assert used == schedule


def test_composite_of_two_lora_models_is_the_reference_codes_average(loras):
    """The reference code averages the unconditional and the conditional predictions over the
    LoRAs, then guides once; by linearity that is the average of each LoRA model's guided
    prediction (what `average` with equal weights computes), up to float rounding (1e-5)."""
    recipe = _recipe("lora-composite", _two(loras))
    ours = _latents(recipe)

    def reference(guided):
        def fn(x_t, t, record=None):
            parts = [g.predict(x_t, t, need_uncond=True) for g in guided]
            u = torch.stack([p.uncond for p in parts]).mean(0)
            c = torch.stack([p.cond for p in parts]).mean(0)
            return u + guided[0].guidance_scale * (c - u)

        return fn

    torch.testing.assert_close(ours, _by_hand(recipe, reference), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours, _latents(_recipe("average", _two(loras), {"weights": [1.0, 1.0]})))
    for alone in _two(loras):
        assert not torch.allclose(ours, _latents(_recipe("single", [alone])), atol=1e-3)


def test_switch_starts_its_turns_again_in_every_batch(loras):
    """One Switch per batch: images sampled one at a time equal images sampled together. 1e-4:
    the UNet's float rounding differs with the batch size (measured 1.2e-5); a Switch whose turns
    ran on from the first batch would give the second image another schedule (differences ~0.1)."""
    recipe = _recipe("lora-switch", _two(loras), {"tau": 2}, num_images=2)
    together = _latents(recipe, batch_size=2)
    torch.testing.assert_close(_latents(recipe, batch_size=1), together, atol=1e-4, rtol=1e-4)


BAD = [
    ({"tau": 0}, r"^invalid recipe:\n  params\.tau: Input should be greater than or equal to 1"),
    ({"tau": 2.5}, r"params\.tau: Input should be a valid integer"),
    ({"tau": "2"}, r"params\.tau: Input should be a valid integer"),
    ({"order": ["style"]}, r"params\.order: model 1 \('texture'\) is missing"),
    ({"order": ["style", "colour"]}, r"params\.order: entry 1 \('colour'\) names no model \(names: style, texture\)"),
    ({"order": [0, 2]}, r"params\.order: entry 1 is index 2 but the recipe has 2 model\(s\)"),
    ({"order": [1, 1]}, r"params\.order: model 1 takes two turns"),
    ({"period": 2}, r"params\.period: unknown parameter of method 'lora-switch' \(it takes: tau, order\)"),
]


@pytest.mark.parametrize("params, says", BAD, ids=[str(p) for p, _ in BAD])
def test_bad_switch_params_are_refused_before_loading(loras, params, says):
    with pytest.raises(RecipeError, match=says):
        validate(parse_recipe(_recipe("lora-switch", _two(loras), params)))


@pytest.mark.parametrize("method", ["lora-switch", "lora-composite"])
def test_models_of_another_latent_space_are_refused_before_loading(loras, method):
    """Any models sharing a latent space may take turns or be averaged (LoRAs of one base, or
    checkpoints); models that cannot meet at noise level are refused by the one check."""
    models = [_model(loras, "style", "te"), {"model": loras["wide"], "name": "wide"}]
    with pytest.raises(MultifusionError, match=r"models\[1\]"):
        validate(parse_recipe(_recipe(method, models)))


@pytest.mark.parametrize("method", ["lora-switch", "lora-composite"])
def test_a_missing_lora_file_is_refused_before_loading(loras, tmp_path, method):
    models = [_model(loras, "style", "te"), {**_model(loras, "texture"), "loras": [{"path": str(tmp_path / "gone.safetensors")}]}]
    with pytest.raises(MultifusionError, match=r"^models\[1\]\.loras\[0\]\.path: LoRA file .* does not exist"):
        validate(parse_recipe(_recipe(method, models)))


def test_composite_takes_no_params(loras):
    with pytest.raises(RecipeError, match=r"params\.tau: unknown parameter of method 'lora-composite'"):
        validate(parse_recipe(_recipe("lora-composite", _two(loras), {"tau": 2})))


def test_python_functions_equal_the_recipe(loras):
    """`multifusion.lora_switch` / `lora_composite` on loaded LoRA models give the recipe's latents."""
    import multifusion as mf

    handles = mf.load_models(
        [loras["a"]] * 2,
        loras=[[{"path": str(loras["te"]), "scale": 0.8}], [{"path": str(loras["unet"]), "scale": 0.8}]],
        names=["style", "texture"],
    )
    kw = dict(num_inference_steps=STEPS, seed=3, num_images=2, progress=False)
    switch = mf.lora_switch(handles, [PROMPT] * 2, tau=2, order=["texture", "style"], **kw).latents
    assert torch.equal(switch, _latents(_recipe("lora-switch", _two(loras), {"tau": 2, "order": ["texture", "style"]})))
    composite = mf.lora_composite(handles, [PROMPT] * 2, **kw).latents
    assert torch.equal(composite, _latents(_recipe("lora-composite", _two(loras))))


def test_under_heun_a_turn_counts_the_loops_steps(loras):
    """Heun's timesteps hold 2n - 1 entries for n steps (each inner step repeated); the loop calls
    the noise function once per entry and tau counts those: the first model throughout only when
    tau >= 2n - 1."""
    both, n = _two(loras), 2 * STEPS - 1
    first = _latents(_recipe("single", both[:1], scheduler="heun"))
    assert torch.equal(_latents(_recipe("lora-switch", both, {"tau": n}, scheduler="heun")), first)
    assert not torch.allclose(_latents(_recipe("lora-switch", both, {"tau": STEPS}, scheduler="heun")), first, atol=1e-3)
