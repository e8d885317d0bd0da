"""Merges of merges (`Merge` inputs, `merge:NAME` inside `merges:`): streamed without writing the
inner merge, equal to writing the inner merge and merging it, and to the maths recomputed from
the input tensors; cycles, self-references and unknown names refused before any tensor is read."""

import json

import pytest
import torch
from safetensors.torch import load_file

from multifusion.api import load_recipe_models
from multifusion.errors import RecipeError
from multifusion.recipe import parse_recipe
from multifusion.weights import MergeSpec, merge_in_memory, merge_models
from multifusion.weights import models as merge_module
from multifusion.weights.models import Merge, merge_tree


@pytest.fixture(scope="module")
def tiny_d(tiny_dir, tmp_path_factory):
    """A fine-tune of `a`'s base with its own text encoder (so text encoders are merged)."""
    from multifusion.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("d") / "d", seed=5, text_seed=7, vae_seed=0))


def _tensors(folder, component="unet"):
    return load_file(next((folder / component).glob("*.safetensors")))


def _same_folders(x, y, components=("unet", "text_encoder")):
    for c in components:
        a, b = _tensors(x, c), _tensors(y, c)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), c


@pytest.mark.parametrize(
    "inner_spec, outer_spec, first_is_merge",
    [
        (MergeSpec(weights=(0.3, 0.7)), MergeSpec(weights=(1.0, 1.0)), True),
        (MergeSpec(blocks="GRAD_V"), MergeSpec("ties", options={"density": 0.5}), False),
        (MergeSpec("dare", options={"drop_rate": 0.3, "merge_seed": 3}), MergeSpec(blocks="GRAD_V"), True),
        (MergeSpec(weights=(1.0, 2.0)), MergeSpec(weights=(1.0, 1.0), text_encoder="first"), True),
    ],
)
def test_a_merge_of_a_merge_equals_writing_the_inner_merge_first(
    tiny_a, tiny_b, tiny_d, tmp_path, inner_spec, outer_spec, first_is_merge
):
    inner_models = (tiny_b, tiny_d)
    inner = Merge(inner_models, inner_spec, "merges.inner")
    written = merge_models(list(inner_models), tmp_path / "inner", inner_spec)
    nested_inputs, written_inputs = (
        ([inner, tiny_a], [str(written), tiny_a])
        if first_is_merge
        else (
            [tiny_a, inner],
            [tiny_a, str(written)],
        )
    )
    nested = merge_models(nested_inputs, tmp_path / "nested", outer_spec)
    two_steps = merge_models(written_inputs, tmp_path / "two_steps", outer_spec)
    _same_folders(nested, two_steps)
    recorded = json.loads((nested / "merge.json").read_text())
    inner_json = recorded["models"][0 if first_is_merge else 1]
    assert inner_json["merge"] == "merges.inner" and inner_json["hyper"] == json.loads(json.dumps(inner_spec.resolved()))
    assert MergeSpec(**inner_json["spec"]) == inner_spec
    assert len(recorded["fingerprints"]) == 3  # a, b and d were read


def test_a_merge_of_merges_recomputed_from_the_input_tensors(tiny_a, tiny_b, tiny_d, tmp_path):
    """(0.3 b + 0.7 d) and (a + b) / 2, merged 1 : 3 (a weighted sum normalises its weights)."""
    left = Merge((tiny_b, tiny_d), MergeSpec(weights=(0.3, 0.7)))
    right = Merge((tiny_a, tiny_b), MergeSpec())
    out = merge_models([left, right], tmp_path / "out", MergeSpec(weights=(1.0, 3.0)))
    a, b, d = (_tensors(merge_module.Path(f)) for f in (tiny_a, tiny_b, tiny_d))
    got = _tensors(out)
    for k in got:
        expected = 0.25 * (0.3 * b[k] + 0.7 * d[k]) + 0.75 * (a[k] + b[k]) / 2
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)
    te = [_tensors(merge_module.Path(f), "text_encoder") for f in (tiny_a, tiny_b, tiny_d)]
    got_te = _tensors(out, "text_encoder")  # a's and b's text encoders are one; d's differs
    for k in got_te:
        expected = 0.25 * (0.3 * te[1][k] + 0.7 * te[2][k]) + 0.75 * te[0][k]
        torch.testing.assert_close(got_te[k], expected, rtol=1e-5, atol=1e-6)


def test_the_in_memory_merge_of_a_merge_equals_the_folder(tiny_a, tiny_b, tiny_d, tmp_path):
    inner = Merge((tiny_b, tiny_d), MergeSpec(weights=(0.3, 0.7)))
    folder = merge_models([inner, tiny_a], tmp_path / "out", MergeSpec(blocks="GRAD_V"))
    handle = merge_in_memory([inner, tiny_a], MergeSpec(blocks="GRAD_V"))
    for part in ("unet", "text_encoder"):
        want = _tensors(folder, part)
        state = getattr(handle, part).state_dict()
        for k, v in want.items():
            key = k if k in state else k.removeprefix("text_model.")
            assert torch.equal(state[key], v), (part, k)


def test_a_merge_of_merges_reads_each_input_once_per_tensor_and_writes_nothing_inner(
    tiny_a, tiny_b, tiny_d, tmp_path, monkeypatch
):
    """Streamed: each output tensor reads that tensor once from each leaf model, and the only
    file written is the output's (the inner merge is never written)."""
    reads, writes = [], []
    read, write = merge_module.FileSource.reader, merge_module.write_safetensors

    def counting(self, stack):
        get = read(self, stack)
        return lambda name: reads.append(name) or get(name)

    monkeypatch.setattr(merge_module.FileSource, "reader", counting)
    monkeypatch.setattr(merge_module, "write_safetensors", lambda path, *a: writes.append(path) or write(path, *a))
    inner = Merge((tiny_b, tiny_d), MergeSpec())
    merge_models([inner, tiny_a], tmp_path / "out", MergeSpec())
    unet_names = _tensors(merge_module.Path(tiny_a)).keys()
    assert all(reads.count(k) == 3 for k in unet_names)
    assert sorted(p.parent.name for p in writes) == ["text_encoder", "unet"] and sorted(x.name for x in tmp_path.iterdir()) == [
        "out"
    ]


def test_recipes_name_merges_inside_merges(tiny_a, tiny_b, tiny_d, tmp_path):
    merges = {
        "inner": {"models": [tiny_b, tiny_d], "weights": [0.3, 0.7]},
        "outer": {"models": ["merge:inner", tiny_a], "blocks": "GRAD_V"},
    }
    recipe = parse_recipe(
        {"version": 1, "method": "single", "prompt": "a red circle", "models": [{"model": "merge:outer"}], "merges": merges}
    )
    (handle,) = load_recipe_models(recipe)
    inner = merge_models([tiny_b, tiny_d], tmp_path / "inner", MergeSpec(weights=(0.3, 0.7)))
    folder = merge_models([str(inner), tiny_a], tmp_path / "outer", MergeSpec(blocks="GRAD_V"))
    want = _tensors(folder)
    state = handle.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in want.items())


def test_merge_tree_refuses_loops_before_reading_anything(monkeypatch):
    monkeypatch.setattr(merge_module, "plan_merge", lambda *a, **k: pytest.fail("a merge was planned"))
    entries = parse_recipe(
        {
            "version": 1,
            "method": "single",
            "prompt": "x",
            "models": [{"model": "merge:a"}],
            "merges": {"a": {"models": ["m", "merge:b"]}, "b": {"models": ["merge:a", "m"]}, "s": {"models": ["merge:s"]}},
        }
    ).merges
    with pytest.raises(RecipeError, match=r"merges.b.models\[0\]: 'merge:a' makes a cycle \(a -> b -> a\)"):
        merge_tree("a", entries)
    with pytest.raises(RecipeError, match=r"merges.s.models\[0\]: 'merge:s' is this merge itself"):
        merge_tree("s", entries)
    with pytest.raises(RecipeError, match=r"no merge named 'c' \(merges: a, b, s\)"):
        merge_tree("c", entries)


def test_a_merge_method_run_over_a_recipes_merge_samples_the_merge_of_merges(tiny_a, tiny_b, tiny_d, tmp_path):
    from multifusion.api import run

    inner = merge_models([tiny_b, tiny_d], tmp_path / "inner", MergeSpec(weights=(0.3, 0.7)))
    folder = merge_models([str(inner), tiny_a], tmp_path / "outer", MergeSpec(blocks="GRAD_V"))
    sampling = {"num_inference_steps": 2, "seed": 3}
    nested = {
        "version": 1,
        "method": "mbw",
        "prompt": "a red circle",
        "params": {"blocks": "GRAD_V"},
        "models": [{"model": "merge:inner"}, {"model": tiny_a}],
        "merges": {"inner": {"models": [tiny_b, tiny_d], "weights": [0.3, 0.7]}},
        "sampling": sampling,
    }
    single = {
        "version": 1,
        "method": "single",
        "prompt": "a red circle",
        "models": [{"model": str(folder)}],
        "sampling": sampling,
    }
    assert torch.equal(run(nested, progress=False).latents, run(single, progress=False).latents)


def test_multifusion_merge_writes_a_recipe_whose_models_are_merges(tiny_a, tiny_b, tiny_d, tmp_path):
    from multifusion.weights.export import merge

    recipe = {
        "version": 1,
        "method": "merge",
        "params": {"merge_method": "ties", "density": 0.5},
        "models": [{"model": tiny_a}, {"model": "merge:inner"}],
        "merges": {"inner": {"models": [tiny_b, tiny_d], "method": "slerp", "t": 0.3}},
    }
    written = merge(recipe, tmp_path / "nested")
    inner = merge_models([tiny_b, tiny_d], tmp_path / "inner", MergeSpec("slerp", options={"t": 0.3}))
    want = merge_models([tiny_a, str(inner)], tmp_path / "two", MergeSpec("ties", options={"density": 0.5}))
    _same_folders(written, want)
    bad = {**recipe, "merges": {"inner": {"models": [tiny_b, "merge:inner"]}}}
    with pytest.raises(RecipeError, match=r"merges.inner.models\[1\]: 'merge:inner' is this merge itself"):
        merge(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
