import json

import pytest

from multifusion.errors import ModelLoadError, PickleRefusedError, RecipeError
from multifusion.recipe import parse_recipe
from multifusion.validate import validate_recipe


def recipe(**over):
    base = {"method": "single", "models": [{"model": "owner/some-model", "prompt": "a red circle"}]}
    base.update(over)
    return base


def test_valid_recipe_and_defaults():
    r = parse_recipe(recipe(sampling={"seed": 5, "num_images": 3}))
    assert r.seeds() == [5, 6, 7] and r.guidance_of(0) == 7.5 and r.negative_of(0) == ""


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "r.yaml").write_text("method: average\nprompt: a cat\nmodels:\n  - model: owner/x\n  - model: owner/y\n")
    (tmp_path / "r.json").write_text(json.dumps(recipe()))
    assert parse_recipe(tmp_path / "r.yaml").prompts_of(1, [0, 1]) == ["a cat", "a cat"]
    assert parse_recipe(tmp_path / "r.json").method == "single"
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        parse_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "data, field",
    [
        (recipe(sampling={"num_inference_steps": -3}), "sampling.num_inference_steps"),
        (recipe(sampling={"num_inference_steps": "many"}), "sampling.num_inference_steps"),
        (recipe(sampling={"guidance_scale": -1}), "sampling.guidance_scale"),
        (recipe(samplng={}), "samplng: unknown field"),
        (recipe(models=[]), "models"),
        (recipe(runtime={"dtype": "float8"}), "runtime.dtype"),
        (recipe(runtime={"device": "tpu"}), "runtime.device: 'tpu'"),
        (recipe(version=2), "version"),
    ],
)
def test_structural_errors_name_the_field(data, field):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert field in str(info.value)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(RecipeError, match="did you mean 'average'"):
        validate_recipe(parse_recipe(recipe(method="averge")))


def test_method_model_count_and_params():
    two = [{"model": "owner/x", "prompt": "a"}, {"model": "owner/y", "prompt": "b"}]
    with pytest.raises(RecipeError, match="exactly 1"):
        validate_recipe(parse_recipe(recipe(models=two)))
    with pytest.raises(RecipeError, match=r"params.weights: .*3 entries for 2 models"):
        validate_recipe(parse_recipe(recipe(method="average", models=two, params={"weights": [1, 1, 1]})))
    with pytest.raises(RecipeError, match="params.weights: .*>= 0"):
        validate_recipe(parse_recipe(recipe(method="average", models=two, params={"weights": [1, -2]})))
    with pytest.raises(RecipeError, match="unknown parameter of method 'average'"):
        validate_recipe(parse_recipe(recipe(method="average", models=two, params={"wieghts": [1, 1]})))
    _, params = validate_recipe(parse_recipe(recipe(method="average", models=two, params={"weights": [3, 1]})))
    assert params.weights == [3, 1]


def test_unknown_models_and_pickles_are_refused_before_loading(tmp_path):
    with pytest.raises(ModelLoadError, match=r"models\[0\].model: unknown zoo model 'zoo:nope'"):
        validate_recipe(parse_recipe(recipe(models=[{"model": "zoo:nope", "prompt": "a"}])))
    with pytest.raises(ModelLoadError, match="cannot find model"):
        validate_recipe(parse_recipe(recipe(models=[{"model": str(tmp_path / "nowhere"), "prompt": "a"}])))
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        validate_recipe(parse_recipe(recipe(models=[{"model": str(ckpt), "prompt": "a"}])))


def test_missing_prompt_is_checked_for_methods_that_need_one():
    with pytest.raises(RecipeError, match=r"models\[0\]: no prompt"):
        validate_recipe(parse_recipe(recipe(models=[{"model": "owner/x"}])))


def test_unknown_scheduler():
    with pytest.raises(RecipeError, match="sampling.scheduler.*did you mean 'euler'"):
        validate_recipe(parse_recipe(recipe(sampling={"scheduler": "eulr"})))


def test_compile_off_reads_back_as_unset():
    """runtime.compile: false and an unset compile are one setting (off), so a form's unticked box
    and a recipe that never set it compare equal and keep the recipe JSON it had."""
    base = {"method": "single", "models": [{"model": "zoo:general", "prompt": "a red circle"}]}
    off, unset = parse_recipe({**base, "runtime": {"compile": False}}), parse_recipe(base)
    assert off == unset and off.runtime.compile is None and "compile" not in off.to_json()
    assert parse_recipe({**base, "runtime": {"compile": True}}).runtime.compile is True
