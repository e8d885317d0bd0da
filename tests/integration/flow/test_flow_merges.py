"""Weight merges of SD3 and FLUX pipelines: their block ids (FLUX in SuperMerger's notation), the
folder and the in-memory merge alike (T5 merged with the other text encoders), a block weight
touching only its block, degenerate merges equal to `single`, and bad block weights refused
naming the field."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multifusion import fuse, load_models, run, single
from multifusion.errors import RecipeError
from multifusion.families.flux import flux_layout
from multifusion.families.sd3 import sd3_layout
from multifusion.recipe import parse_recipe
from multifusion.validate import validate
from multifusion.weights import MergeSpec, merge_in_memory, merge_models
from multifusion.weights.export import merge

PROMPT, OTHER = "a red circle in a snowy field", "a blue square"
KW = dict(num_inference_steps=3, seed=5, num_images=2, height=16, width=16, guidance_scale=3.5, progress=False)
FAMILIES = ["sd3", "flux"]
TEXT = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"), "flux": ("text_encoder", "text_encoder_2")}
T5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
# SuperMerger's FLUX ids (hako-mikan/sd-webui-supermerger, BLOCKIDFLUX), written out.
SUPERMERGER_FLUX = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, flow_dir):
    """Per family: a (from the shared fixture), c: another transformer with retrained text
    encoders (T5 included), one VAE."""
    from multifusion.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("flow_merge")
    build_tiny_sd3_pipeline(root / "sd3_c", seed=3, text_seed=9, vae_seed=0)
    build_tiny_flux_pipeline(root / "flux_c", seed=3, text_seed=9, vae_seed=0)
    return {f: [str(flow_dir / f"{f}_a"), str(flow_dir / f"{f}_b"), str(root / f"{f}_c")] for f in FAMILIES}


def _meta(cls, config):
    with torch.device("meta"):
        return cls(**config)


@pytest.mark.parametrize("name", ["FLUX.1 dev", "SD3.5 Large", "SD3.5 Medium"])
def test_every_transformer_parameter_has_exactly_one_block(name):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from multifusion.memory import FLUX_DEV, SD35_LARGE, SD35_MEDIUM

    cls, config, layout_of = {
        "FLUX.1 dev": (FluxTransformer2DModel, FLUX_DEV, flux_layout),
        "SD3.5 Large": (SD3Transformer2DModel, SD35_LARGE, sd3_layout),
        "SD3.5 Medium": (SD3Transformer2DModel, SD35_MEDIUM, sd3_layout),
    }[name]
    model = _meta(cls, config)
    layout = layout_of(model.config)
    owners = {}
    for param in model.state_dict():
        holders = [b for b, prefixes in layout.members.items() for p in prefixes if param.startswith(p + ".")]
        assert len(holders) == 1, (param, holders)
        assert layout.block_of(param) == holders[0]
        owners.setdefault(holders[0], []).append(param)
    assert set(owners) == set(layout.ids)  # no block id without parameters
    if name == "FLUX.1 dev":
        assert [*layout.leads[1], *layout.ids] == SUPERMERGER_FLUX and len(SUPERMERGER_FLUX) == 61
        assert layout.describe() == "IN, D00..D18, S00..S37, OUT"
    else:
        n = config["num_layers"]
        assert layout.ids == ("IN", *(f"J{i:02d}" for i in range(n)), "OUT")


# --- degenerate merges are `single` of the first model --------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_merges_of_all_a_are_single_of_the_first_model(retrained, family):
    a, _, c = retrained[family]
    ref = single(a, PROMPT, **KW).latents
    assert torch.equal(ref, fuse("merge", [a, c], [PROMPT, "unused"], weights=[1, 0], **KW).latents)
    assert torch.equal(ref, fuse("mbw", [a, c], PROMPT, blocks=[0.0] * 5, **KW).latents)  # BASE + IN, 2 blocks, OUT
    assert torch.equal(ref, fuse("mbw", [a, c], PROMPT, blocks="ALL_A", **KW).latents)
    assert torch.equal(ref, fuse("merge", retrained[family], PROMPT, merge_method="add_difference", alpha=0.0, **KW).latents)
    fused = fuse("merge", [a, c], PROMPT, **KW).latents
    assert not torch.allclose(fused, ref, atol=1e-4) and not torch.allclose(fused, single(c, PROMPT, **KW).latents, atol=1e-4)


def test_a_named_flux_merge_of_all_a_is_single(retrained):
    a, _, c = retrained["flux"]
    recipe = {
        "method": "single",
        "prompt": PROMPT,
        "merges": {"m": {"models": [a, c], "weights": [1, 0]}},
        "models": [{"model": "merge:m", "guidance_scale": 3.5}],
        "sampling": {"num_inference_steps": 3, "seed": 5, "num_images": 2, "height": 16, "width": 16},
    }
    assert torch.equal(run(recipe, progress=False).latents, single(a, PROMPT, **KW).latents)


# --- folder and in-memory merges agree, text encoders (T5 too) merged by BASE ----------------------


def _states(handle, family):
    return {part: getattr(handle, part).state_dict() for part in ("unet", "vae", *TEXT[family])}


@pytest.mark.parametrize(
    "family, spec",
    [
        ("sd3", MergeSpec(weights=(0.3, 0.7))),
        ("flux", MergeSpec(weights=(0.3, 0.7))),
        ("sd3", MergeSpec(blocks="0.5,0.2,0.4,0.6,0.8")),  # BASE, IN, J00, J01, OUT
        ("flux", MergeSpec(blocks="0.5,0.2,0.4,0.6,0.8")),  # BASE, IN, D00, S00, OUT
        ("flux", MergeSpec(blocks="0.25,0.75,0.2,0.4,0.6,0.8")),  # SuperMerger's CLIP, T5 leads
    ],
)
def test_folder_and_in_memory_merges_agree_bit_for_bit(retrained, tmp_path, family, spec):
    a, _, c = retrained[family]
    folder = merge_models([a, c], tmp_path / "m", spec)
    [loaded] = load_models([str(folder)])
    ha, hc = load_models([a, c], share=False)
    from_handles = merge_in_memory([ha, hc], spec)
    from_names = merge_in_memory([a, c], spec)
    want = _states(loaded, family)
    for got in (_states(from_handles, family), _states(from_names, family)):
        for part, state in want.items():
            assert state.keys() == got[part].keys() and all(torch.equal(state[k], got[part][k]) for k in state), part
    # Each text encoder at its weight: BASE for all, or CLIP and T5 apart (the SuperMerger form).
    blocks = json.loads((folder / "merge.json").read_text()).get("blocks")
    for part in TEXT[family]:
        w = 0.7 if blocks is None else (blocks.get("t5", blocks["base"]) if part == T5[family] else blocks["base"])
        x, y, m = (getattr(h, part).state_dict() for h in (ha, hc, from_handles))
        k = next(k for k in m if k.endswith("weight") and m[k].dim() == 2 and not torch.equal(x[k], y[k]))
        assert torch.allclose(m[k], (1 - w) * x[k] + w * y[k], atol=1e-6), (part, k)
    # The merged T5 keeps its embedding tied (one tensor under two names).
    t5 = getattr(from_handles, T5[family])
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def handles(retrained):
    return {f: load_models([retrained[f][0], retrained[f][2]], share=False) for f in FAMILIES}


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), block=st.integers(0, 3), w=st.floats(0.05, 1.0))
def test_a_block_weight_touches_only_its_blocks_tensors(handles, family, block, w):
    a, c = handles[family]
    layout = (flux_layout if family == "flux" else sd3_layout)(a.unet.config)
    values = [0.0] * len(layout.ids)
    values[block] = w
    merged = merge_in_memory([a, c], MergeSpec(blocks=tuple(values)))
    sa, sc, sm = a.unet.state_dict(), c.unet.state_dict(), merged.unet.state_dict()
    touched = 0
    for k in sa:
        if layout.block_of(k) == layout.ids[block] and not torch.equal(sa[k], sc[k]):
            assert torch.allclose(sm[k], (1 - w) * sa[k] + w * sc[k], atol=1e-6), k
            touched += 1
        else:
            assert torch.equal(sm[k], sa[k]), k
    assert touched > 0
    for part in TEXT[family]:  # no BASE given: the first model's text encoders
        assert getattr(merged, part) is getattr(a, part)


# --- bad block weights, refused naming the field -----------------------------------------------


def _recipe(models, blocks, merge_method="weighted_sum"):
    return parse_recipe(
        {
            "method": "mbw",
            "prompt": PROMPT,
            "models": [{"model": m} for m in models],
            "params": {"blocks": blocks, "merge_method": merge_method},
        }
    )


@pytest.mark.parametrize(
    "family, blocks, match",
    [
        (
            "flux",
            [0.5] * 3,
            r"params.blocks: block weights: 3 values given; this FLUX transformer expects 4 \(IN, D00, S00, OUT\) "
            r"or 5 \(with a leading BASE\) or 6 \(with a leading CLIP, T5, as SuperMerger writes them\)",
        ),
        (
            "sd3",
            [0.5] * 6,
            r"params.blocks: block weights: 6 values given; this SD3 transformer expects 4 \(IN, J00..J01, OUT\) "
            r"or 5 \(with a leading BASE\)$",
        ),
        (
            "flux",
            "GRAD_V",
            r"params.blocks: preset GRAD_V is a curve over a UNet's IN, M00 and OUT blocks; a FLUX transformer has "
            r"blocks IN, D00, S00, OUT: give its 4 values",
        ),
        ("sd3", [25 * 0.5] * 25, r"params.blocks: block weights: 25 values given; this SD3 transformer expects 4"),
        ("flux", "0.5,1.5,0,0,0,0", r"params.blocks: block weight 1.5 for T5 is outside \[0, 1\]"),
        ("sd3", "0,0,0,1.2,0", r"params.blocks: block weight 1.2 for J01 is outside \[0, 1\]"),
    ],
)
def test_bad_block_weights_are_refused_before_loading_naming_the_field(retrained, family, blocks, match):
    a, _, c = retrained[family]
    with pytest.raises(RecipeError, match=match):
        validate(_recipe([a, c], blocks))


def test_constant_presets_and_own_counts_pass(retrained):
    for family in FAMILIES:
        a, _, c = retrained[family]
        for blocks in ("FLAT_25", "ALL_B", [0.5] * 4, [0.5] * 5):
            validate(_recipe([a, c], blocks))
    validate(_recipe(retrained["flux"][::2], [0.5] * 6))  # CLIP, T5, IN, D00, S00, OUT
    validate(_recipe(retrained["flux"], [1.5] * 4, "add_difference"))  # add-difference extrapolates


def test_a_bad_named_merge_names_its_entry(retrained):
    a, _, c = retrained["flux"]
    recipe = parse_recipe(
        {
            "method": "single",
            "prompt": PROMPT,
            "merges": {"m": {"models": [a, c], "blocks": [0.5] * 7}},
            "models": [{"model": "merge:m"}],
        }
    )
    with pytest.raises(RecipeError, match=r"merges.m: block weights: 7 values given; this FLUX transformer expects 4"):
        validate(recipe)


def test_flow_merges_write_folders_but_no_single_file(retrained, tmp_path):
    a, _, c = retrained["sd3"]
    recipe = {"method": "merge", "prompt": PROMPT, "models": [{"model": a}, {"model": c}]}
    with pytest.raises(
        RecipeError,
        match="single_file: the single-file \\(LDM\\) layout .* a (Stable Diffusion 3|FLUX.1) merge is written as a "
        "diffusers folder only",
    ):
        merge(recipe, tmp_path / "m", single_file=True)
    assert not (tmp_path / "m").exists()
    folder = merge(recipe, tmp_path / "m")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "merge.json").read_text())["components"]["text_encoder_3"] == "merge: weighted_sum"
