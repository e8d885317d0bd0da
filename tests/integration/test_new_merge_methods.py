"""The registered merge methods from a recipe (`method: merge` / `mbw` with `merge_method`, and
`merges:` entries) and through `multifusion merge`: the written folder loads and equals the
in-memory merge; a random merge's seed is in merge.json and fixes the result."""

import json

import pytest
import torch
import yaml

from multifusion import load_models
from multifusion.cli import main
from multifusion.errors import RecipeError
from multifusion.recipe import parse_recipe
from multifusion.validate import validate
from multifusion.weights import MergeSpec, merge_in_memory


def _same(h1, h2, parts=("unet", "text_encoder")):
    for part in parts:
        a, b = getattr(h1, part).state_dict(), getattr(h2, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def _recipe(tmp_path, models, method="merge", **params):
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "method": method, "params": params, "models": [{"model": m} for m in models]}))
    return path


@pytest.mark.parametrize(
    "method, models, params",
    [
        ("merge", "abc", {"merge_method": "ties", "density": 0.5, "alpha": 0.8}),
        ("merge", "abc", {"merge_method": "dare", "drop_rate": 0.3, "merge_seed": 5}),
        ("merge", "abc", {"merge_method": "dare_ties", "drop_rate": 0.3}),
        ("merge", "abc", {"merge_method": "model_stock"}),
        ("merge", "ab", {"merge_method": "slerp", "t": 0.3}),
        ("merge", "abc", {"merge_method": "geometric_median", "iterations": 20}),
        ("mbw", "ab", {"merge_method": "slerp", "blocks": "GRAD_V"}),
        ("mbw", "abc", {"merge_method": "ties", "blocks": "GRAD_V", "density": 0.5}),
    ],
)
def test_merge_command_writes_what_the_in_memory_merge_holds(tiny_dir, tmp_path, capsys, method, models, params):
    paths = [str(tiny_dir / m) for m in models]
    recipe = _recipe(tmp_path, paths, method, **params)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "m" / "merge.json").read_text())
    spec = MergeSpec(**written["spec"])
    assert spec.method == params["merge_method"]
    if params["merge_method"] in ("dare", "dare_ties"):
        assert written["hyper"]["merge_seed"] == params.get("merge_seed", 0)
    [from_folder] = load_models([str(tmp_path / "m")])
    handles = load_models(paths)
    _same(from_folder, merge_in_memory(handles, spec))
    a = handles[0].unet.state_dict()
    merged = from_folder.unet.state_dict()
    assert any(not torch.equal(a[k], merged[k]) for k in a)  # it merged something


def test_a_dare_merge_is_fixed_by_its_seed(tiny_dir):
    handles = load_models([str(tiny_dir / m) for m in "abc"])
    one = merge_in_memory(handles, MergeSpec("dare", options={"merge_seed": 1}))
    again = merge_in_memory(handles, MergeSpec("dare", options={"merge_seed": 1}))
    other = merge_in_memory(handles, MergeSpec("dare", options={"merge_seed": 2}))
    _same(one, again, parts=("unet",))
    k = "conv_in.weight"
    assert not torch.equal(one.unet.state_dict()[k], other.unet.state_dict()[k])


def test_recipe_merges_take_the_new_methods(tiny_dir, tmp_path):
    a, b, c = (str(tiny_dir / m) for m in "abc")
    recipe = {
        "version": 1,
        "method": "average",
        "merges": {"t": {"models": [a, b, c], "method": "ties", "density": 0.4}},
        "models": [{"model": "merge:t", "prompt": "p"}, {"model": a, "prompt": "p"}],
    }
    validate(parse_recipe(recipe))
    recipe["merges"]["t"]["density"] = 0.0
    with pytest.raises(RecipeError, match=r"merges.t.density: 0.0 is not a finite number in \(0, 1\]"):
        validate(parse_recipe(recipe))
    recipe["merges"]["t"] = {"models": [a, b], "method": "model_stock"}
    with pytest.raises(RecipeError, match=r"merges.t: model_stock merges at least 3 models"):
        validate(parse_recipe(recipe))


@pytest.mark.parametrize(
    "method, n, params, match",
    [
        ("merge", 3, {"merge_method": "ties", "density": 1.5}, r"params.density: 1.5 is not a finite number in \(0, 1\]"),
        ("merge", 3, {"merge_method": "ties", "alpha": -1}, r"params.alpha: -1.0 is not a finite number >= 0"),
        ("merge", 3, {"merge_method": "dare", "drop_rate": 1}, r"params.drop_rate: .* in \[0, 1\)"),
        ("merge", 2, {"merge_method": "model_stock"}, r"params.merge_method: model_stock merges at least 3 models"),
        ("merge", 3, {"merge_method": "slerp"}, r"params.merge_method: slerp merges two models"),
        ("merge", 2, {"merge_method": "slerp", "density": 0.5}, r"params.density: slerp takes `t`, not `density`"),
        ("merge", 2, {"merge_method": "slerp", "t": 1.5}, r"params.t: 1.5 is not a finite number in \[0, 1\]"),
        ("merge", 3, {"merge_method": "geometric_median", "iterations": 0}, r"params.iterations: 0 is not .* in \[1, 10000\]"),
        ("merge", 3, {"merge_method": "dare", "merge_seed": -1}, r"params.merge_seed: -1 is not .* >= 0"),
        # Not finite: refused by name whatever the method.
        ("merge", 3, {"merge_method": "ties", "density": float("nan")}, r"params.density: .*finite number \(got nan\)"),
        ("merge", 3, {"merge_method": "ties", "alpha": float("inf")}, r"params.alpha: .*finite number \(got inf\)"),
        ("merge", 3, {"merge_method": "dare_ties", "drop_rate": float("nan")}, r"params.drop_rate: .*finite number \(got nan\)"),
        ("merge", 2, {"merge_method": "slerp", "t": float("inf")}, r"params.t: .*finite number \(got inf\)"),
        ("merge", 2, {"weights": [float("nan"), 1]}, r"params.weights\[0\]: .*finite number \(got nan\)"),
        ("merge", 2, {"weights": [1, float("-inf")]}, r"params.weights\[1\]: .*finite number \(got -inf\)"),
        ("mbw", 2, {"blocks": [0.5] * 8 + [float("nan")]}, r"params.blocks\[8\]: .*finite number \(got nan\)"),
        (
            "mbw",
            2,
            {"merge_method": "slerp", "blocks": [1.5] * 9},
            r"params.blocks: block weight 1.5 for IN00 is outside \[0, 1\]",
        ),
        (
            "mbw",
            3,
            {"merge_method": "ties", "blocks": [-1.0] * 9},
            r"params.blocks: block weight -1.0 for IN00 is outside \[0, inf\)",
        ),
    ],
)
def test_bad_params_of_the_new_methods_are_refused_before_loading(tiny_dir, monkeypatch, method, n, params, match):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    recipe = {"method": method, "models": [{"model": str(tiny_dir / m), "prompt": "p"} for m in "abc"[:n]], "params": params}
    with pytest.raises(RecipeError, match=match):
        validate(parse_recipe(recipe))


@pytest.fixture(scope="module")
def narrow_dir(tiny_dir, tmp_path_factory):
    """`narrow`: the latent space of `a`, `b` and `c` (same VAE) but another architecture (a text
    encoder and cross-attention of width 16, not 32)."""
    from multifusion.zoo.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("narrow")
    build_tiny_pipeline(root / "narrow", seed=5, text_seed=0, vae_seed=0, cross_attention_dim=16)
    return root / "narrow"


def _no_tensor_read(monkeypatch):
    import multifusion.loading as loading
    import multifusion.weights.models as models

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(models, "merged_tensors", lambda *a, **k: pytest.fail("a tensor was read"))


@pytest.mark.parametrize("method, params", [("merge", {"merge_method": m}) for m in ("ties", "dare", "model_stock")])
def test_models_of_two_architectures_are_refused_by_name_before_a_tensor_is_read(
    tiny_dir, narrow_dir, monkeypatch, method, params
):
    from multifusion.errors import IncompatibleModelsError

    _no_tensor_read(monkeypatch)
    models = [str(tiny_dir / "a"), str(tiny_dir / "b"), str(narrow_dir)]
    recipe = {"method": method, "models": [{"model": m, "prompt": "p"} for m in models], "params": params}
    with pytest.raises(IncompatibleModelsError, match=r"^models: .* has shape .* in .*narrow.*; merges need one architecture"):
        validate(parse_recipe(recipe))
    merges = {
        "version": 1,
        "method": "average",
        "merges": {"t": {"models": models, "method": params["merge_method"]}},
        "models": [{"model": "merge:t", "prompt": "p"}, {"model": models[0], "prompt": "p"}],
    }
    with pytest.raises(IncompatibleModelsError, match=r"^merges.t: .* in .*narrow.*; merges need one architecture"):
        validate(parse_recipe(merges))


def test_the_merge_command_refuses_two_architectures_and_writes_nothing(tiny_dir, narrow_dir, tmp_path, capsys, monkeypatch):
    _no_tensor_read(monkeypatch)
    recipe = _recipe(tmp_path, [str(tiny_dir / "a"), str(tiny_dir / "b"), str(narrow_dir)], merge_method="ties")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "m")]) != 0
    assert "merges need one architecture" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
