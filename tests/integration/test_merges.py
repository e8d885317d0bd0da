"""Weight merges of whole models: block coverage on real UNets, streaming vs in-memory, round
trips through load_models, and every bad input refused before anything is written."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multifusion.errors import IncompatibleModelsError, ModelLoadError, RecipeError
from multifusion.loading import load_models, resolve
from multifusion.testing import build_tiny_pipeline
from multifusion.weights import MergeSpec, layout_table, merge_in_memory, merge_models, plan_merge, unet_layout
from multifusion.weights import models as merge_module

SMALL = dict(norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, sample_size=8)
UNETS = {
    "2-level (tiny test)": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
    ),
    "3-level (zoo)": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
    ),
    "4-level (SD-1.5)": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=2),
    "SDXL": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
        use_linear_projection=True,
    ),
}
N_BLOCKS = {"2-level (tiny test)": 9, "3-level (zoo)": 13, "4-level (SD-1.5)": 25, "SDXL": 19}


def _unet(name):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SMALL, **UNETS[name])


@pytest.mark.parametrize("name", sorted(UNETS))
def test_every_unet_parameter_has_exactly_one_block(name):
    unet = _unet(name)
    layout = unet_layout(unet.config)
    assert len(layout.ids) == N_BLOCKS[name]
    owners = {}
    for param in unet.state_dict():
        holders = [b for b, prefixes in layout.members.items() for p in prefixes if param.startswith(p + ".")]
        assert len(holders) == 1, (param, holders)
        assert layout.block_of(param) == holders[0]
        owners.setdefault(holders[0], []).append(param)
    assert set(owners) == set(layout.ids)  # no block id without parameters


# SD-1.5 in A1111's notation: input_blocks.k / middle_block / output_blocks.k of the LDM UNet,
# written out by hand in diffusers' names (downsamplers at input_blocks 3, 6, 9; upsamplers in
# output_blocks 2, 5, 8).
SD15_A1111 = {
    "IN00": "conv_in, time_embedding",
    "IN01": "down_blocks.0.resnets.0, down_blocks.0.attentions.0",
    "IN02": "down_blocks.0.resnets.1, down_blocks.0.attentions.1",
    "IN03": "down_blocks.0.downsamplers",
    "IN04": "down_blocks.1.resnets.0, down_blocks.1.attentions.0",
    "IN05": "down_blocks.1.resnets.1, down_blocks.1.attentions.1",
    "IN06": "down_blocks.1.downsamplers",
    "IN07": "down_blocks.2.resnets.0, down_blocks.2.attentions.0",
    "IN08": "down_blocks.2.resnets.1, down_blocks.2.attentions.1",
    "IN09": "down_blocks.2.downsamplers",
    "IN10": "down_blocks.3.resnets.0",
    "IN11": "down_blocks.3.resnets.1",
    "M00": "mid_block",
    "OUT00": "up_blocks.0.resnets.0",
    "OUT01": "up_blocks.0.resnets.1",
    "OUT02": "up_blocks.0.resnets.2, up_blocks.0.upsamplers",
    "OUT03": "up_blocks.1.resnets.0, up_blocks.1.attentions.0",
    "OUT04": "up_blocks.1.resnets.1, up_blocks.1.attentions.1",
    "OUT05": "up_blocks.1.resnets.2, up_blocks.1.attentions.2, up_blocks.1.upsamplers",
    "OUT06": "up_blocks.2.resnets.0, up_blocks.2.attentions.0",
    "OUT07": "up_blocks.2.resnets.1, up_blocks.2.attentions.1",
    "OUT08": "up_blocks.2.resnets.2, up_blocks.2.attentions.2, up_blocks.2.upsamplers",
    "OUT09": "up_blocks.3.resnets.0, up_blocks.3.attentions.0",
    "OUT10": "up_blocks.3.resnets.1, up_blocks.3.attentions.1",
    "OUT11": "up_blocks.3.resnets.2, up_blocks.3.attentions.2, conv_norm_out, conv_out",
}


def test_sd15_layout_is_the_a1111_assignment():
    unet = _unet("4-level (SD-1.5)")
    assert dict(layout_table(unet_layout(unet.config), unet.state_dict())) == SD15_A1111


def _mbw_block(ldm_key: str, n_in: int) -> str:
    """The block the merge-block-weighted loop (scripts/mbw/merge_block_weighted.py) gives an
    LDM UNet key: time_embed with IN00, out.* with the last OUT, else the block index."""
    if ldm_key.startswith("time_embed."):
        return "IN00"
    if ldm_key.startswith("out."):
        return f"OUT{n_in - 1:02d}"
    kind, index = ldm_key.split(".")[:2]
    return {"input_blocks": f"IN{int(index):02d}", "output_blocks": f"OUT{int(index):02d}"}.get(kind, "M00")


@pytest.mark.parametrize("name", ["2-level (tiny test)", "3-level (zoo)", "4-level (SD-1.5)"])
def test_block_ids_agree_with_the_mbw_rule_on_ldm_names(name):
    from multifusion.testing.ldm import rename, unet_prefixes

    unet = _unet(name)
    layout = unet_layout(unet.config)
    prefixes = unet_prefixes(dict(unet.config))
    for key in unet.state_dict():
        assert layout.block_of(key) == _mbw_block(rename(key, prefixes), layout.n_in), key


def test_sdxl_layout_gives_the_20_value_notation():
    unet = _unet("SDXL")
    table = dict(layout_table(unet_layout(unet.config), unet.state_dict()))
    assert len(table) + 1 == 20  # with BASE
    assert table["IN00"] == "conv_in, time_embedding, add_embedding"
    assert (
        table["IN03"] == "down_blocks.0.downsamplers" and table["IN08"] == "down_blocks.2.resnets.1, down_blocks.2.attentions.1"
    )
    assert table["OUT08"] == "up_blocks.2.resnets.2, conv_norm_out, conv_out"


# --- whole-model merges on tiny pipelines ------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    """Tiny pipelines by name: a, b, c (one text encoder and VAE), v (v-prediction), wide (8
    latent channels), d (another text encoder); zoo:NAME as given."""
    d = build_tiny_pipeline(tmp_path_factory.mktemp("merge") / "d", seed=5, text_seed=7, vae_seed=0)

    def path(name):
        return name if name.startswith("zoo:") else str(d if name == "d" else tiny_dir / name)

    return path


def _unet_tensors(folder):
    return load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors")


def _same_state(h1, h2):
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(h1, part).state_dict(), getattr(h2, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_weights_one_zero_give_the_first_model_exactly(tiny_dir, tmp_path):
    out = merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], tmp_path / "m", MergeSpec(weights=(1.0, 0.0)))
    merged, first = _unet_tensors(out), _unet_tensors(tiny_dir / "a")
    assert merged.keys() == first.keys() and all(torch.equal(merged[k], first[k]) for k in first)


def test_add_difference_with_alpha_zero_gives_a(tiny_dir, tmp_path):
    models = [str(tiny_dir / n) for n in ("a", "b", "c")]
    out = merge_models(models, tmp_path / "m", MergeSpec("add_difference", alpha=0.0))
    merged, first = _unet_tensors(out), _unet_tensors(tiny_dir / "a")
    assert all(torch.equal(merged[k], first[k]) for k in first)
    out = merge_models(models, tmp_path / "m1", MergeSpec("add_difference", alpha=0.7))
    a, b, c = (_unet_tensors(tiny_dir / n) for n in ("a", "b", "c"))
    k = "conv_in.weight"
    assert torch.allclose(_unet_tensors(out)[k], a[k] + 0.7 * (b[k] - c[k]), atol=1e-6)


def test_block_weights_all_at_w_equal_the_weighted_sum_at_w(tiny_dir, tmp_path):
    models = [str(tiny_dir / "a"), str(tiny_dir / "b")]
    w = 0.3
    mbw = merge_models(models, tmp_path / "mbw", MergeSpec(blocks=",".join([str(w)] * 10)))  # BASE + 9 blocks
    plain = merge_models(models, tmp_path / "ws", MergeSpec(weights=(1 - w, w)))
    x, y = _unet_tensors(mbw), _unet_tensors(plain)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x["conv_in.weight"], _unet_tensors(tiny_dir / "a")["conv_in.weight"])


@pytest.mark.parametrize(
    "models, spec",
    [
        (["zoo:slice0", "zoo:slice1"], MergeSpec(blocks="RING08_SOFT")),
        (["zoo:slice0", "zoo:slice1"], MergeSpec(weights=(0.3, 0.7))),
        (["a", "b", "c"], MergeSpec("add_difference", blocks="0.5," + ",".join(["1.5"] * 9))),
        (["a", "d"], MergeSpec(weights=(1.0, 2.0))),  # different text encoders: merged too
    ],
)
def test_streaming_and_in_memory_merges_agree_bit_for_bit(folders, tmp_path, models, spec):
    models = [folders(m) for m in models]
    folder = merge_models(models, tmp_path / "m", spec)
    [loaded] = load_models([str(folder)])
    in_memory = merge_in_memory(models, spec)
    _same_state(loaded, in_memory)


def test_text_encoders_merge_with_the_weights_or_stay_the_first(folders, tmp_path):
    models = [folders("a"), folders("d")]
    k = "embeddings.token_embedding.weight"
    te = [load_file(f"{m}/text_encoder/model.safetensors")[k] for m in models]
    merged = merge_models(models, tmp_path / "m", MergeSpec(weights=(1.0, 3.0)))
    assert torch.allclose(load_file(f"{merged}/text_encoder/model.safetensors")[k], 0.25 * te[0] + 0.75 * te[1], atol=1e-6)
    kept = merge_models(models, tmp_path / "k", MergeSpec(weights=(1.0, 3.0), text_encoder="first"))
    assert torch.equal(load_file(f"{kept}/text_encoder/model.safetensors")[k], te[0])
    recipe = json.loads((kept / "merge.json").read_text())
    assert recipe["components"]["text_encoder"].startswith("copy") and recipe["components"]["vae"].startswith("copy")


def test_a_merged_folder_round_trips_and_records_its_recipe(tiny_dir, tmp_path):
    models = [str(tiny_dir / "a"), str(tiny_dir / "b")]
    spec = MergeSpec(blocks="GRAD_V")
    folder = merge_models(models, tmp_path / "m", spec)
    assert resolve(str(folder)).kind == "folder"
    [h] = load_models([str(folder)])
    assert list(h.unet.config.block_out_channels) == [16, 32]
    recipe = json.loads((folder / "merge.json").read_text())
    assert MergeSpec(**recipe["spec"]) == spec
    assert recipe["models"] == models and len(recipe["fingerprints"]) == 2
    assert recipe["blocks"]["source"] == "preset GRAD_V, resampled from 25 to 9 blocks"
    assert recipe["components"]["text_encoder"] == "copy: model 0's (BASE weight 0)"


def test_a_model_merged_with_itself_is_copied_unchanged(tiny_a, tmp_path):
    plan = plan_merge([tiny_a, tiny_a], MergeSpec(weights=(1.0, 2.0)))
    assert {c.name: c.action for c in plan.components}["unet"] == "copy"
    folder = merge_models([tiny_a, tiny_a, tiny_a], tmp_path / "m", MergeSpec(weights=(1.0, 1.0, 1.0)))
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (folder / weights).read_bytes() == (resolve(tiny_a).location / Path(weights)).read_bytes()


# --- bad input, refused before anything is written -----------------------------------------------


def _nothing_written(tmp_path):
    return list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "models, spec, error, match",
    [
        (
            ["a", "wide"],
            MergeSpec(),
            IncompatibleModelsError,
            r"unet tensor 'conv_in.weight' has shape \(16, 4, 3, 3\) in .* and \(16, 8, 3, 3\)",
        ),
        (["a", "v"], MergeSpec(), IncompatibleModelsError, "predicts epsilon and .* predicts v_prediction"),
        (
            ["a", "b"],
            MergeSpec(blocks=",".join(["0.5"] * 13)),
            RecipeError,
            r"13 values given; this UNet expects 9 \(IN00..IN03, M00, OUT00..OUT03\) or 10",
        ),
        (["a", "b"], MergeSpec(blocks="RING08_SOFTT"), RecipeError, "did you mean 'RING08_SOFT'"),
        (["a", "b"], MergeSpec(blocks="0,0,0,0,1.5,0,0,0,0"), RecipeError, r"block weight 1.5 for M00 is outside \[0, 1\]"),
        (["a", "b"], MergeSpec(weights=(1.0, 2.0, 3.0)), RecipeError, "3 weights for 2 models"),
        (["a", "b"], MergeSpec("add_difference"), RecipeError, "add_difference merges three models"),
        (["a", "b", "c"], MergeSpec(blocks="GRAD_V"), RecipeError, "block-weighted sum merges two models"),
        (
            ["a", "zoo:slice0"],
            MergeSpec(),
            IncompatibleModelsError,
            r"text_encoder tensor '.*' has shape \(16, 32\) in .* and \(32, 64\) in 'zoo:slice0'",
        ),
        (["a", "zoo:slice0"], MergeSpec(text_encoder="first"), IncompatibleModelsError, r"unet tensor '.*' has shape"),
    ],
)
def test_bad_inputs_are_refused_before_writing(folders, tmp_path, models, spec, error, match):
    models = [folders(m) for m in models]
    with pytest.raises(error, match=match):
        merge_models(models, tmp_path / "out", spec)
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=(1.0, float("nan"))), "not a finite number >= 0"),
        (dict(weights=(1.0, -1.0)), "not a finite number >= 0"),
        (dict(weights=(0.0, 0.0)), "sum to zero"),
        (dict(method="add_diference"), "did you mean 'add_difference'"),
        (dict(method="add_difference", alpha=float("nan")), "not a finite number"),
        (dict(method="add_difference", weights=(1.0, 1.0, 1.0)), "takes `alpha`"),
        (dict(alpha=0.5), "not `alpha`"),
        (dict(weights=(1.0, 1.0), blocks="GRAD_V"), "either block weights"),
        (dict(text_encoder="second"), "text_encoder must be one of"),
    ],
)
def test_merge_specs_check_themselves(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        MergeSpec(**kwargs)


def test_single_file_models_and_existing_outputs_are_refused(tiny_dir, tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="merges read diffusers pipeline folders"):
        merge_models([str(tiny_dir / "a"), str(single)], tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(RecipeError, match="already exists"):
        merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], tmp_path / "out")
    with pytest.raises(RecipeError, match="is one of the models"):
        merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], tiny_dir / "a", overwrite=True)
    with pytest.raises(RecipeError, match="holds no merge"):  # overwrite replaces an earlier merge, never a user's folder
        merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], tmp_path / "out", overwrite=True)
    out = merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], tmp_path / "merged")
    out = merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], out, overwrite=True)
    assert (out / "merge.json").is_file()


def test_an_interrupted_merge_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def interrupted(plan, component):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "merged_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_models([str(tiny_dir / "a"), str(tiny_dir / "b")], tmp_path / "out")
    assert _nothing_written(tmp_path)
