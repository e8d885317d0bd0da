"""The weight-merge methods `merge` and `mbw` (merged in memory, sampled as `single`), merges
named in recipes (`merges:` + `model: merge:NAME`), `multifusion merge` (folder and single
file), and the bench's merge rows."""

import json

import pytest
import torch
import yaml

from multifusion import fuse, load_models, run, single
from multifusion.cli import main
from multifusion.errors import IncompatibleModelsError, RecipeError
from multifusion.method import Method, Params
from multifusion.recipe import parse_recipe
from multifusion.validate import validate
from multifusion.weights import MergeSpec, merge_in_memory, merge_models
from multifusion.weights.export import merge
from multifusion.weights.presets import block_weights

PROMPT = "a red circle in a snowy field"
KW = dict(num_inference_steps=4, seed=5, num_images=2, progress=False)


def _same_modules(h1, h2, parts=("unet", "text_encoder", "vae")):
    for part in parts:
        a, b = getattr(h1, part).state_dict(), getattr(h2, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


# --- degenerate cases: exactly the first model -----------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpm++"])
def test_merge_with_weights_one_zero_is_single_of_the_first_model_bit_for_bit(tiny_a, tiny_b, scheduler):
    ref = single(tiny_a, PROMPT, scheduler=scheduler, **KW).latents
    got = fuse("merge", [tiny_a, tiny_b], [PROMPT, "another prompt, unused"], weights=[1, 0], scheduler=scheduler, **KW).latents
    assert torch.equal(ref, got)


def test_mbw_all_a_is_single_of_the_first_model_bit_for_bit(tiny_a, tiny_b):
    ref = single(tiny_a, PROMPT, **KW).latents
    assert torch.equal(ref, fuse("mbw", [tiny_a, tiny_b], PROMPT, blocks="ALL_A", **KW).latents)
    assert torch.equal(ref, fuse("mbw", [tiny_a, tiny_b], PROMPT, blocks=[0.0] * 9, **KW).latents)


def test_add_difference_alpha_zero_is_single_of_a(tiny_dir):
    models = [str(tiny_dir / n) for n in "abc"]
    ref = single(models[0], PROMPT, **KW).latents
    assert torch.equal(ref, fuse("merge", models, PROMPT, merge_method="add_difference", alpha=0.0, **KW).latents)


def test_a_real_merge_differs_from_both_models(tiny_a, tiny_b):
    a, b = single(tiny_a, PROMPT, **KW).latents, single(tiny_b, PROMPT, **KW).latents
    for method, params in (("merge", {}), ("mbw", {"blocks": "GRAD_V"})):
        got = fuse(method, [tiny_a, tiny_b], PROMPT, **params, **KW).latents
        assert not torch.equal(got, a) and not torch.equal(got, b)


# --- merged from the run's loaded handles: nothing loaded twice, nothing changed ------------------------


@pytest.mark.parametrize("spec", [MergeSpec(weights=(0.3, 0.7)), MergeSpec(blocks="RING08_SOFT")])
def test_in_memory_merge_of_loaded_handles_equals_the_written_folder(tiny_a, tiny_b, tmp_path, spec):
    ha, hb = load_models([tiny_a, tiny_b])
    before = {k: v.clone() for k, v in ha.unet.state_dict().items()}
    merged = merge_in_memory([ha, hb], spec)
    [folder] = load_models([str(merge_models([tiny_a, tiny_b], tmp_path / "m", spec))])
    _same_modules(merged, folder)
    assert all(torch.equal(before[k], v) for k, v in ha.unet.state_dict().items())  # the inputs are untouched
    assert merged.unet is not ha.unet and merged.vae is ha.vae  # only merged parts are new


def test_in_memory_merge_of_handles_merges_different_text_encoders_too(tiny_a, tmp_path):
    from multifusion.testing import build_tiny_pipeline

    d = str(build_tiny_pipeline(tmp_path / "d", seed=5, text_seed=7, vae_seed=0))
    spec = MergeSpec(weights=(1.0, 2.0))
    ha, hd = load_models([tiny_a, d])
    merged = merge_in_memory([ha, hd], spec)
    [folder] = load_models([str(merge_models([tiny_a, d], tmp_path / "m", spec))])
    _same_modules(merged, folder)
    assert merged.text_encoder is not ha.text_encoder


def test_the_method_merges_the_handles_the_run_loaded(tiny_a, tiny_b, monkeypatch):
    import multifusion.loading as loading

    handles = load_models([tiny_a, tiny_b])
    calls = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: calls.append(a) or pytest.fail("loaded again"))
    fuse("merge", handles, PROMPT, **KW)
    assert calls == []


def test_mixing_handles_and_names_is_refused(tiny_a, tiny_b):
    [ha] = load_models([tiny_a])
    with pytest.raises(RecipeError, match="either all loaded ModelHandles or all model names"):
        merge_in_memory([ha, tiny_b])


# --- bad input, refused before loading and naming the field -------------------------------------------


def _validate(method, models, params):
    return validate(parse_recipe({"method": method, "models": [{"model": m, "prompt": "p"} for m in models], "params": params}))


@pytest.mark.parametrize(
    "method, n, params, match",
    [
        ("merge", 2, {"weights": [1, 2, 3]}, r"params.weights: has 3 entries for 2 models"),
        ("merge", 2, {"weights": [1, -1]}, r"params.weights: weight -1.0 of model 1 is not a finite number >= 0"),
        ("merge", 2, {"weights": [0, 0]}, r"params.weights: weights \[0.0, 0.0\] sum to zero"),
        ("merge", 2, {"alpha": 0.5}, r"params.alpha: belongs to add_difference"),
        ("merge", 2, {"merge_method": "add_difference"}, r"params.merge_method: add_difference merges three models"),
        ("merge", 3, {"merge_method": "add_difference", "weights": [1, 1, 1]}, r"params.weights: add_difference takes `alpha`"),
        ("merge", 2, {"merge_method": "add_differense"}, r"params.merge_method"),
        ("merge", 2, {"wieghts": [1, 1]}, r"params.wieghts: unknown parameter"),
        ("mbw", 2, {"blocks": "RING08_SOFTT"}, r"params.blocks: unknown block-weight preset .*did you mean 'RING08_SOFT'"),
        (
            "mbw",
            2,
            {"blocks": "0.5,0.5,0.5"},
            r"params.blocks: block weights: 3 values given; this UNet expects 9 \(IN00..IN03, M00, OUT00..OUT03\) or 10",
        ),
        ("mbw", 2, {"blocks": [1.5] * 9}, r"params.blocks: block weight 1.5 for IN00 is outside \[0, 1\]"),
        ("mbw", 2, {"blocks": "0.5,x,0.5"}, r"params.blocks: block weights: 'x' is not a number"),
        (
            "mbw",
            3,
            {"blocks": "GRAD_V"},
            r"params.merge_method: a block-weighted weighted_sum merges 2 models, the recipe names 3; use add_difference",
        ),
        ("mbw", 2, {}, r"params.blocks: Field required"),
    ],
)
def test_bad_params_are_refused_before_loading_naming_the_field(tiny_dir, monkeypatch, method, n, params, match):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError, match=match):
        _validate(method, [str(tiny_dir / x) for x in "abc"[:n]], params)


def test_block_weight_lengths_are_checked_against_the_zoo_unet_before_loading():
    with pytest.raises(RecipeError, match=r"params.blocks: block weights: 9 values given; this UNet expects 13"):
        _validate("mbw", ["zoo:slice0", "zoo:slice1"], {"blocks": [0.5] * 9})
    _validate("mbw", ["zoo:slice0", "zoo:slice1"], {"blocks": [0.5] * 13})
    _validate("mbw", ["zoo:slice0", "zoo:slice1"], {"blocks": [0.5] * 26})  # BASE + the 25 SD-1 values


def test_incompatible_models_are_named_after_loading(tiny_dir):
    with pytest.raises(IncompatibleModelsError, match=r"models: .*predicts epsilon and .* predicts v_prediction"):
        fuse("merge", [str(tiny_dir / "a"), str(tiny_dir / "v")], PROMPT, **KW)


def test_method_is_reserved_as_a_parameter_name():
    class P(Params):
        method: str = "x"

    with pytest.raises(ValueError, match="clash with the API's own keywords"):
        Method("m", "", "weights", P, lambda p, b: None)


def test_sd1_strings_are_resampled_like_presets_and_other_lengths_must_match():
    from multifusion.weights.models import local_layout

    layout = local_layout("zoo:slice0")
    grad = ",".join(f"{v:.10f}" for v in (1 - i / 12 for i in range(12)))
    sd1 = f"{grad},0,{','.join(f'{1 - i / 12:.10f}' for i in range(11, -1, -1))}"
    by_string, note = block_weights(sd1, layout)
    by_preset, _ = block_weights("GRAD_V", layout)
    assert note == "given as 25 SD-1 values, resampled from 25 to 13 blocks"
    assert all(abs(x - y) < 1e-9 for x, y in zip(by_string.values, by_preset.values)) and len(by_string.values) == 13
    assert block_weights("0," + sd1, layout)[0].base == 0.0
    with pytest.raises(RecipeError, match="9 values given; this UNet expects 13"):
        block_weights([0.5] * 9, layout)


# --- merges named in recipes -----------------------------------------------------------------------------


def _recipe(models, merges, method="single", **params):
    return {
        "method": method,
        "merges": merges,
        "params": params,
        "models": [{"model": m, "prompt": PROMPT} for m in models],
        "sampling": {"num_inference_steps": 4, "seed": 5, "num_images": 2},
    }


def test_a_recipe_merge_with_weights_one_zero_is_the_first_model(tiny_a, tiny_b):
    ref = single(tiny_a, PROMPT, **KW).latents
    got = run(_recipe(["merge:ab"], {"ab": {"models": [tiny_a, tiny_b], "weights": [1, 0]}}), progress=False).latents
    assert torch.equal(ref, got)


def test_merged_models_can_be_fused(tiny_a, tiny_b, tiny_dir):
    """average of a merge and a model, with one merge named twice (merged once)."""
    merges = {"ab": {"models": [tiny_a, tiny_b], "blocks": "GRAD_V"}}
    out = run(_recipe(["merge:ab", str(tiny_dir / "c")], merges, "average"), progress=False)
    assert out.latents.shape == (2, 4, 8, 8)
    from multifusion.api import load_recipe_models

    h1, h2 = load_recipe_models(parse_recipe(_recipe(["merge:ab", "merge:ab"], merges, "average")))
    assert h1.unet is h2.unet and h1.vae is h2.vae


@pytest.mark.parametrize(
    "models, merges, match",
    [
        (
            ["merge:abx"],
            {"ab": {"models": ["A", "B"]}},
            r"models\[0\].model: no merge named 'abx' \(merges: ab\); did you mean 'ab'",
        ),
        (["merge:ab"], {}, r"models\[0\].model: no merge named 'ab'; define it under `merges:`"),
        (
            ["merge:ab"],
            {"ab": {"models": ["A", "B"], "blocks": "GRADV"}},
            r"merges.ab: unknown block-weight preset .*did you mean 'GRAD_V'",
        ),
        (["merge:ab"], {"ab": {"models": ["A", "B"], "weights": [1, 2, 3]}}, r"merges.ab: 3 weights for 2 models"),
        (["merge:ab"], {"ab": {"models": ["A", "merge:ab"]}}, r"merges.ab.models\[1\]: 'merge:ab' is this merge itself"),
        (
            ["merge:a"],
            {"a": {"models": ["A", "merge:b"]}, "b": {"models": ["merge:c", "B"]}, "c": {"models": ["B", "merge:a"]}},
            r"merges.c.models\[1\]: 'merge:a' makes a cycle \(a -> b -> c -> a\)",
        ),
        (
            ["merge:a"],
            {"a": {"models": ["A", "merge:bb"]}, "b": {"models": ["A", "B"]}, "c": {"models": ["A", "B"]}},
            r"merges.a.models\[1\]: no merge named 'bb' \(merges: a, b, c\); did you mean 'b'",
        ),
        (
            ["merge:a"],
            {"a": {"models": ["A", "merge:b"]}, "b": {"models": ["A", "B"], "weights": [1, 2, 3]}},
            r"merges.b: 3 weights for 2 models",
        ),
        (
            ["merge:a"],
            {"a": {"models": ["A", "merge:b"]}, "b": {"models": ["A", "V"]}},
            r"merges.a: merges.b: .*predicts epsilon and .* predicts v_prediction",
        ),
        (
            ["merge:a"],
            {"a": {"models": ["V", "merge:b"]}, "b": {"models": ["A", "B"]}},
            r"merges.a: .*predicts v_prediction and 'merges.b' predicts epsilon",
        ),
        (["merge:ab"], {"ab": {"models": ["A", "B"], "wieghts": [1, 1]}}, r"merges.ab.wieghts"),
        (["merge:ab"], {"ab": {"models": ["A", "V"]}}, r"merges.ab: .*predicts epsilon and .* predicts v_prediction"),
    ],
)
def test_recipe_merges_are_checked_before_loading(tiny_dir, monkeypatch, models, merges, match):
    import multifusion.loading as loading

    paths = {"A": str(tiny_dir / "a"), "B": str(tiny_dir / "b"), "V": str(tiny_dir / "v")}
    merges = json.loads(
        json.dumps(merges)
        .replace('"A"', json.dumps(paths["A"]))
        .replace('"B"', json.dumps(paths["B"]))
        .replace('"V"', json.dumps(paths["V"]))
    )
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises((RecipeError, IncompatibleModelsError), match=match):
        validate(parse_recipe(_recipe(models, merges)))


# --- writing merges: Python and CLI, folder and single file ---------------------------------------------------


def _merge_recipe(tmp_path, models, method="mbw", **params):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "method": method, "params": params, "models": [{"model": m} for m in models]}))
    return path


def test_merge_writes_the_recipes_merge_and_a_single_file_that_loads_back(tiny_a, tiny_b, tmp_path):
    recipe = _merge_recipe(tmp_path, [tiny_a, tiny_b], blocks="GRAD_V")
    folder = merge(recipe, tmp_path / "out", single_file=True)
    assert json.loads((folder / "merge.json").read_text())["spec"]["blocks"] == "GRAD_V"
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "out.safetensors") == mode(folder / "merge.json")  # not safetensors' private 0600
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    [from_folder] = load_models([str(folder)])
    [from_file] = load_models([str(tmp_path / "out.safetensors")], configs=[str(folder)])
    _same_modules(from_folder, from_file, parts=("unet",))
    [ha, hb] = load_models([tiny_a, tiny_b])
    _same_modules(from_folder, merge_in_memory([ha, hb], MergeSpec(blocks="GRAD_V")))  # what `mbw` samples
    with pytest.raises(RecipeError, match="already exists"):
        merge(recipe, tmp_path / "out", single_file=True)


def test_merge_command(tiny_a, tiny_b, tmp_path, capsys):
    recipe = _merge_recipe(tmp_path, [tiny_a, tiny_b], "merge", weights=[1, 3])
    assert main(["merge", str(recipe), "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["spec"]["weights"] == [1.0, 3.0]
    bad = _merge_recipe(tmp_path, [tiny_a, tiny_b], "average")
    assert main(["merge", str(bad), "--out", str(tmp_path / "n")]) == 2
    assert "a merge recipe has method merge or mbw" in capsys.readouterr().err
    bad = _merge_recipe(tmp_path, [tiny_a, tiny_b], "merge", weights=[1])
    assert main(["merge", str(bad), "--out", str(tmp_path / "n")]) == 2
    assert "params.weights: has 1 entries for 2 models" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


# --- the bench rows ----------------------------------------------------------------------------------------------


def test_merge_rows_take_the_first_roles_prompt_in_the_apps_where_a_merge_makes_sense():
    from multifusion.bench.apps import APPS, MBW_PRESET

    for app_id in ("fine-grained", "cross-domain", "ensemble"):
        app = APPS[app_id]
        rows = {r.id: r for r in app.rows()[0]}
        assert {"merge", "mbw"} <= set(rows)
        refs = {r: f"zoo:{r}" for r in app.roles}
        prompt = app.prompt(0)
        for row_id, params in (("merge", {}), ("mbw", {"blocks": MBW_PRESET})):
            recipe = rows[row_id].build(prompt, refs)
            assert recipe["method"] == row_id and recipe["params"] == params
            assert recipe["models"][0] == {
                "model": refs[app.roles[0]],
                "name": app.roles[0],
                "prompt": prompt.prompts[app.roles[0]],
            }
    for app_id in ("regional", "aggregation"):
        assert not {"merge", "mbw"} & {r.id for r in APPS[app_id].rows()[0]}


def test_task_vector_rows_put_the_base_first_and_prompt_it_as_the_merge_row_is_prompted():
    from multifusion.bench.apps import APPS, DARE_PARAMS, TIES_PARAMS
    from multifusion.recipe import parse_recipe
    from multifusion.validate import validate_recipe

    expected = {  # app: (models in recipe order, the role whose prompt they all get, has model-stock)
        "ensemble": (("general", "slice0", "slice1"), "slice0", True),
        "cross-domain": (("general", "cartoon"), "cartoon", False),
        "fine-grained": (("general", "expert"), "general", False),
    }
    for app_id, (models, prompt_role, stock) in expected.items():
        app = APPS[app_id]
        rows = {r.id: r for r in app.rows()[0]}
        assert ("model-stock" in rows) == stock
        assert "single-general" not in rows or app_id != "ensemble"  # the base is no baseline of ensemble
        refs = {r: f"zoo:{r}" for r in app.roles}
        prompt = app.prompt(1)
        want = {"ties": TIES_PARAMS, "dare": DARE_PARAMS, "model-stock": {"merge_method": "model_stock"}}
        for row_id in ("ties", "dare", "model-stock") if stock else ("ties", "dare"):
            recipe = rows[row_id].build(prompt, refs)
            assert rows[row_id].models == models
            assert recipe["method"] == "merge" and recipe["params"] == want[row_id]
            assert [m["name"] for m in recipe["models"]] == list(models)
            assert {m["prompt"] for m in recipe["models"]} == {prompt.prompts[prompt_role]}
            _, params = validate_recipe(parse_recipe({"version": 1, **recipe}))  # checked against the zoo's configs
            assert params.spec().method == want[row_id]["merge_method"]
    # DARE at alpha 0.5 has the equal-weight merge as its expectation; TIES keeps the paper's defaults.
    assert DARE_PARAMS["alpha"] == 0.5 and TIES_PARAMS["density"] == 0.2 and TIES_PARAMS["alpha"] == 1.0
