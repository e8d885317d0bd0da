"""LoRAs in the weights: a fine-tune extracted as a LoRA (read back by diffusers' own
`load_lora_weights`), and a LoRA merged into a checkpoint with block weights (against diffusers'
`fuse_lora`); bad ranks, architectures and files refused before anything is written."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from multifusion.cli import main
from multifusion.errors import IncompatibleModelsError, ModelLoadError, RecipeError
from multifusion.loading import resolve
from multifusion.weights import MergeSpec, merge_models
from multifusion.weights.lora import extract_lora, lora_delta, lora_layers, merge_lora, read_lora
from multifusion.weights.models import Merge

BASE, TUNED = "zoo:general", "zoo:toon"  # toon is a fine-tune of general (docs/zoo.md)
FP16 = dict(rtol=2**-10, atol=2**-24)  # one float16 step: a merge stores the sum in the base's dtype (the zoo's float16)


def _pipe(model):
    return StableDiffusionPipeline.from_pretrained(resolve(model).location, safety_checker=None, dtype=torch.float32)


def _state(model, component="unet"):
    return {k: v.clone() for k, v in getattr(_pipe(model), component).state_dict().items()}


@pytest.fixture(scope="module")
def toon_lora(tmp_path_factory):
    return extract_lora(BASE, TUNED, tmp_path_factory.mktemp("lora") / "toon.safetensors", rank=8)


@pytest.fixture(scope="module")
def tiny_d(tiny_dir, tmp_path_factory):
    from multifusion.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("d") / "d", seed=5, text_seed=7, vae_seed=0))


def test_a_full_rank_lora_loaded_by_diffusers_gives_the_fine_tunes_weights(tmp_path):
    path = extract_lora(BASE, TUNED, tmp_path / "full.safetensors", rank=100_000)
    pipe = _pipe(BASE)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    got, want, base = pipe.unet.state_dict(), _state(TUNED), _state(BASE)
    layers = {
        f"{m}.weight" for m in lora_layers(resolve(BASE).location and __import__("pathlib").Path(resolve(BASE).location), "unet")
    }
    assert got.keys() == want.keys()
    covered = [k for k in want if k in layers]
    assert len(covered) > 50
    for k in covered:  # every Linear and Conv weight is the fine-tune's
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6)
    for k in set(want) - set(covered):  # biases and norms are not LoRA layers: the base's
        assert torch.equal(got[k], base[k]), k


def test_the_text_encoders_are_extracted_on_request(tiny_a, tiny_d, tmp_path):
    path = extract_lora(tiny_a, tiny_d, tmp_path / "te.safetensors", rank=10_000, text_encoder=True)
    keys = read_lora(path).keys()
    assert set(keys) == {"unet", "text_encoder"}
    pipe = _pipe(tiny_a)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    want, base = _state(tiny_d, "text_encoder"), _state(tiny_a, "text_encoder")
    got = pipe.text_encoder.state_dict()
    linear = [k for k in want if k.endswith(("proj.weight", "fc1.weight", "fc2.weight"))]
    assert len(linear) > 4 and all(not torch.equal(want[k], base[k]) for k in linear)
    for k in linear:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6)
    assert set(read_lora(extract_lora(tiny_a, tiny_d, tmp_path / "u.safetensors", rank=4)).keys()) == {"unet"}


def test_the_error_decreases_with_rank():
    """Frobenius error of the extracted deltas against the fine-tune's: non-increasing in the
    rank (each rank's truncated SVD is the best of its rank, Eckart-Young), about 0 at full rank."""
    import tempfile

    from safetensors.torch import load_file

    def weights(model):
        folder = Path(resolve(model).location) / "unet"
        return load_file(next(folder.glob("*.safetensors")))

    base, tuned = weights(BASE), weights(TUNED)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (1, 2, 4, 8, 16, 32, 64, 100_000):
            layers = read_lora(extract_lora(BASE, TUNED, Path(tmp) / f"r{rank}.safetensors", rank=rank))["unet"]
            assert all(layer.rank <= rank for layer in layers.values())
            err = sum(
                float(((tuned[f"{m}.weight"].float() - base[f"{m}.weight"].float()) - lora_delta(layer)).pow(2).sum())
                for m, layer in layers.items()
            )
            errors.append(math.sqrt(err))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 10 * errors[-2] > 0 and errors[-1] < 1e-3 * errors[0], errors


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "8"])
def test_a_bad_rank_is_refused(rank, tmp_path):
    with pytest.raises(RecipeError, match=r"rank: .* is not a positive integer"):
        extract_lora(BASE, TUNED, tmp_path / "x.safetensors", rank=rank)
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_extractions_are_refused(tiny_a, tmp_path):
    with pytest.raises(IncompatibleModelsError, match=r"models: .*one architecture"):
        extract_lora(BASE, tiny_a, tmp_path / "x.safetensors", rank=4)
    with pytest.raises(RecipeError, match="there is no LoRA to extract"):
        extract_lora(BASE, BASE, tmp_path / "x.safetensors", rank=4)
    with pytest.raises(RecipeError, match=r"must end in .safetensors"):
        extract_lora(BASE, TUNED, tmp_path / "x.bin", rank=4)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(RecipeError, match="already exists"):
        extract_lora(BASE, TUNED, tmp_path / "x.safetensors", rank=4)


# --- a LoRA merged into a checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.7, -0.5])
def test_a_lora_merge_with_all_block_weights_one_is_diffusers_fuse_lora(toon_lora, tmp_path, scale):
    pipe = _pipe(BASE)
    pipe.load_lora_weights(str(toon_lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    want = pipe.unet.state_dict()
    for blocks in (None, ",".join(["1"] * 14)):
        folder = merge_lora(BASE, toon_lora, tmp_path / f"m{blocks is None}", scale=scale, blocks=blocks)
        got = _state(str(folder))
        assert got.keys() == want.keys()
        for k in want:  # diffusers sums in float32; the folder holds that sum rounded to the file's float16
            torch.testing.assert_close(got[k], want[k], **FP16)
        assert json.loads((folder / "merge.json").read_text())["lora"]["scale"] == scale


def test_a_block_weight_of_zero_keeps_that_block_the_bases(toon_lora, tmp_path):
    from multifusion.families.sd import SDHandle
    from multifusion.weights.models import _config

    layout = SDHandle.block_layout(_config(Path(resolve(BASE).location) / "unet"))
    weights = {b: 1.0 for b in layout.ids}
    weights["M00"], weights["IN03"] = 0.0, 0.5
    folder = merge_lora(BASE, toon_lora, tmp_path / "m", blocks=[weights[b] for b in layout.ids])
    full = merge_lora(BASE, toon_lora, tmp_path / "full")
    got, base, one = _state(str(folder)), _state(BASE), _state(str(full))
    layers = read_lora(toon_lora)["unet"]
    moved = {f"{m}.weight" for m in layers}
    for k in got:
        block = layout.block_of(k)
        if block == "M00" or k not in moved:
            assert torch.equal(got[k], base[k]), k
        elif block == "IN03":
            torch.testing.assert_close(got[k], base[k] + 0.5 * lora_delta(layers[k.removesuffix(".weight")]), **FP16)
        else:
            assert torch.equal(got[k], one[k]), k
    assert any(layout.block_of(k) == "M00" for k in moved)  # the test touches a block the LoRA changes


def test_the_base_weight_scales_a_text_encoder_lora(tiny_a, tiny_d, tmp_path):
    lora = extract_lora(tiny_a, tiny_d, tmp_path / "te.safetensors", rank=10_000, text_encoder=True)
    n = 10  # the tiny UNet: IN00..IN03, M00, OUT00..OUT03 (9) and BASE
    kept = merge_lora(tiny_a, lora, tmp_path / "kept", blocks=[0.0] + [1.0] * (n - 1))
    moved = merge_lora(tiny_a, lora, tmp_path / "moved")
    te_a, te_kept, te_moved = (_state(m, "text_encoder") for m in (tiny_a, str(kept), str(moved)))
    assert all(torch.equal(te_a[k], te_kept[k]) for k in te_a)
    assert any(not torch.equal(te_a[k], te_moved[k]) for k in te_a)
    assert all(torch.equal(a, b) for a, b in zip(_state(str(kept)).values(), _state(str(moved)).values()))


def test_a_lora_merged_into_a_merge_equals_merging_then_adding(toon_lora, tmp_path):
    spec = MergeSpec(weights=(0.6, 0.4))
    folder = merge_lora(Merge((BASE, "zoo:cartoon"), spec), toon_lora, tmp_path / "nested", scale=0.5)
    merged = merge_models([BASE, "zoo:cartoon"], tmp_path / "merged", spec)
    two_steps = merge_lora(str(merged), toon_lora, tmp_path / "two", scale=0.5)
    a, b = _state(str(folder)), _state(str(two_steps))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lora_merges_are_refused_before_writing(toon_lora, tiny_a, tmp_path):
    with pytest.raises(IncompatibleModelsError, match=r"another architecture"):
        merge_lora(tiny_a, toon_lora, tmp_path / "x")
    with pytest.raises(RecipeError, match=r"scale: nan is not a finite number"):
        merge_lora(BASE, toon_lora, tmp_path / "x", scale=float("nan"))
    with pytest.raises(RecipeError, match=r"blocks: .*3 values given; this UNet expects 13"):
        merge_lora(BASE, toon_lora, tmp_path / "x", blocks="1,1,1")
    with pytest.raises(RecipeError, match=r"blocks: block weights: inf is not a finite number"):
        merge_lora(BASE, toon_lora, tmp_path / "x", blocks=[math.inf] + [1.0] * 12)
    with pytest.raises(ModelLoadError, match="no such file"):
        merge_lora(BASE, tmp_path / "missing.safetensors", tmp_path / "x")
    not_lora = tmp_path / "not.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(not_lora))
    with pytest.raises(ModelLoadError, match=r"key 'unet.conv_in.weight' is not a LoRA layer's"):
        merge_lora(BASE, not_lora, tmp_path / "x")
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(half))
    with pytest.raises(ModelLoadError, match=r"not a LoRA layout diffusers reads"):
        merge_lora(BASE, half, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_commands(tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    assert main(["extract-lora", BASE, TUNED, "--out", str(lora), "--rank", "4"]) == 0
    assert read_lora(lora)["unet"]
    out = tmp_path / "merged"
    assert (
        main(["merge", "--base", BASE, "--lora", str(lora), "--scale", "0.5", "--lora-blocks", "GRAD_V", "--out", str(out)]) == 0
    )
    assert json.loads((out / "merge.json").read_text())["lora"]["blocks"] == "GRAD_V"
    capsys.readouterr()
    assert main(["extract-lora", BASE, TUNED, "--out", str(tmp_path / "z.safetensors"), "--rank", "0"]) == 2
    assert "rank: 0 is not a positive integer" in capsys.readouterr().err
    assert main(["merge", "--base", BASE, "--out", str(tmp_path / "y")]) == 2
    assert "--base: a base model takes a LoRA" in capsys.readouterr().err


def test_a_kohya_lora_with_alphas_merges_as_diffusers_fuses_it(toon_lora, tmp_path):
    """kohya's key layout (`lora_unet_<module>.lora_down.weight`, `.alpha`: scale alpha / r),
    made from the extracted LoRA, read through diffusers' conversion."""
    from safetensors.torch import save_file

    state = {}
    for module, layer in read_lora(toon_lora)["unet"].items():
        key = "lora_unet_" + module.replace(".", "_")
        state |= {f"{key}.lora_down.weight": layer.down, f"{key}.lora_up.weight": layer.up, f"{key}.alpha": torch.tensor(4.0)}
    kohya = tmp_path / "kohya.safetensors"
    save_file(state, str(kohya))
    layers = read_lora(kohya)["unet"]
    assert len(layers) == len(state) // 3 and all(layer.alpha == 4.0 for layer in layers.values())
    pipe = _pipe(BASE)
    pipe.load_lora_weights(str(kohya))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    want = pipe.unet.state_dict()
    got = _state(str(merge_lora(BASE, kohya, tmp_path / "m", scale=0.8)))
    for k in want:
        torch.testing.assert_close(got[k], want[k], **FP16)


def test_sdxl_loras_with_both_text_encoders(tiny_sdxl_dir, tmp_path):
    """SDXL: extracted from a fine-tune with retrained encoders, loaded by
    StableDiffusionXLPipeline.load_lora_weights (keys unet., text_encoder., text_encoder_2.), and
    merged with block weights (SDXL's ids; BASE weighs both encoders) as diffusers fuses it."""
    from diffusers import StableDiffusionXLPipeline

    a, c = str(tiny_sdxl_dir / "a"), str(tiny_sdxl_dir / "c")
    lora = extract_lora(a, c, tmp_path / "xl.safetensors", rank=10_000, text_encoder=True)
    assert set(read_lora(lora, "StableDiffusionXLPipeline")) == {"unet", "text_encoder", "text_encoder_2"}

    def fused(scale):
        pipe = StableDiffusionXLPipeline.from_pretrained(a, dtype=torch.float32)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
        return pipe

    want = StableDiffusionXLPipeline.from_pretrained(c, dtype=torch.float32)
    full = fused(1.0)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        got, tuned = getattr(full, part).state_dict(), getattr(want, part).state_dict()
        layers = {f"{m}.weight" for m in lora_layers(Path(a), part)}
        keys = [k for k in tuned if k in layers]
        assert keys and all(torch.allclose(got[k], tuned[k], rtol=0, atol=2e-6) for k in keys), part

    pipe = fused(0.6)
    folder = merge_lora(a, lora, tmp_path / "m", scale=0.6)
    kept = merge_lora(a, lora, tmp_path / "kept", scale=0.6, blocks=[0.0] + [1.0] * 9)  # BASE 0, the tiny SDXL UNet's 9 ids 1
    loaded = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    base = StableDiffusionXLPipeline.from_pretrained(a, dtype=torch.float32)
    no_te = StableDiffusionXLPipeline.from_pretrained(str(kept), dtype=torch.float32)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        got, ref = getattr(loaded, part).state_dict(), getattr(pipe, part).state_dict()
        assert all(torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6) for k in ref), part
    for part in ("text_encoder", "text_encoder_2"):
        assert all(torch.equal(v, getattr(base, part).state_dict()[k]) for k, v in getattr(no_te, part).state_dict().items())
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in no_te.unet.state_dict().items())


def test_flux_loras_with_supermergers_block_ids(tmp_path):
    """FLUX (a tiny FluxPipeline): the transformer's LoRA extracted (PEFT keys `transformer.`),
    loaded by FluxPipeline; merged with FLUX's block ids (IN, D00, S00, OUT), OUT at 0."""
    from diffusers import FluxPipeline

    from multifusion.families.flux import FluxHandle
    from multifusion.testing import build_tiny_flux_pipeline
    from multifusion.weights.models import _config

    a = build_tiny_flux_pipeline(tmp_path / "a", seed=0)
    b = build_tiny_flux_pipeline(tmp_path / "b", seed=1, text_seed=0, vae_seed=0)
    lora = extract_lora(str(a), str(b), tmp_path / "l.safetensors", rank=10_000)

    def fused(scale):
        pipe = FluxPipeline.from_pretrained(a, dtype=torch.float32)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
        return pipe.transformer.state_dict()

    layers = {f"{m}.weight" for m in lora_layers(a, "transformer")}
    full, tuned = fused(1.0), FluxPipeline.from_pretrained(b, dtype=torch.float32).transformer.state_dict()
    assert all(torch.allclose(full[k], tuned[k], rtol=0, atol=2e-6) for k in tuned if k in layers)
    layout = FluxHandle.block_layout(_config(a / "transformer"))
    assert layout.ids == ("IN", "D00", "S00", "OUT")
    want = fused(0.7)
    got = FluxPipeline.from_pretrained(
        merge_lora(str(a), lora, tmp_path / "m", scale=0.7, blocks=[1.0, 1.0, 1.0, 0.0]), dtype=torch.float32
    )
    base = FluxPipeline.from_pretrained(a, dtype=torch.float32).transformer.state_dict()
    got = got.transformer.state_dict()
    assert any(layout.block_of(k) == "OUT" for k in layers)
    for k in want:
        if layout.block_of(k) == "OUT":
            assert torch.equal(got[k], base[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
