"""AFA on tiny models: the zero-initialised ensemble of copies of one UNet is that UNet (one
forward, and the whole sampling path against `single`), shapes and aggregation counts for 2-,
3- and 4-level UNets, per-pixel convex weights, save/load, exact training resume, the map
export, and bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from handmade import ONE_HOT, set_constant_logits
from PIL import Image

import multifusion as mf
from multifusion import IncompatibleModelsError, RecipeError, load_models
from multifusion.features.afa import AFAAggregators
from multifusion.features.ensemble import model_hash
from multifusion.features.train import AFATrainConfig, load_trained, train_afa
from multifusion.features.unet import AFAEnsemble
from multifusion.features.walkers import aggregation_channels, fresh_aggregators
from multifusion.training import load_tensors

PROMPT = "a blue square"
KW = dict(num_inference_steps=8, seed=1, num_images=2, progress=False)


def small_unet(levels: int, seed: int = 0, layers: int = 1, channels=(8, 16, 16, 16)) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels[:levels],
        layers_per_block=layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=4,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.normal_(0.0, 0.05)  # a visible output at random initialisation
    return unet


def aggregators_for(unets, randomise: bool = False, seed: int = 0) -> AFAAggregators:
    torch.manual_seed(seed)
    agg = fresh_aggregators(unets, [f"h{i}" for i in range(len(unets))], [f"m{i}" for i in range(len(unets))], width=8)
    if randomise:  # a "trained" aggregator: non-zero logits
        with torch.no_grad():
            for p in agg.points:
                p.conv_out.weight.normal_(0.0, 1.0)
    return agg


@pytest.mark.parametrize("levels", [2, 3, 4])
@pytest.mark.parametrize("n", [2, 3])
def test_zero_init_ensemble_of_copies_is_the_unet(levels, n):
    unet = small_unet(levels, layers=2 if levels == 3 else 1)
    ens = AFAEnsemble([unet] * n, aggregators_for([unet] * n)).eval()
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = unet(x, torch.tensor(321), encoder_hidden_states=c).sample
        got = ens(x, torch.tensor(321), torch.cat([c] * n, dim=1)).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if n == 2:
        assert torch.equal(got, want)  # weights of exactly 1/2


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_shapes_and_aggregation_counts(levels):
    unets = [small_unet(levels, seed=s) for s in (0, 1)]
    ens = AFAEnsemble(unets, aggregators_for(unets, randomise=True)).eval()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        out = ens(x, 10, torch.randn(3, 10, 16), return_dict=False)[0]
    assert out.shape == x.shape
    expected = 1 + (levels + levels - 1) + 1 + 2 * levels  # conv_in, down, mid, up (last one after the head)
    assert len(ens.last_weights) == len(aggregation_channels(unets[0])) == expected
    sides = [w.shape[-1] for w in ens.last_weights]
    assert sides[0] == sides[-1] == 8 and min(sides) == 8 // 2 ** (levels - 1)
    for w in ens.last_weights:  # per pixel: a convex combination of the two models
        assert w.shape[:2] == (3, 2) and (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]))
    assert any(w.std() > 0.01 for w in ens.last_weights)  # the randomised aggregators do weight


def test_odd_latent_sizes_follow_diffusers_upsampling():
    unet = small_unet(3)
    ens = AFAEnsemble([unet, unet], aggregators_for([unet, unet])).eval()
    x, c = torch.randn(1, 4, 10, 6), torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(ens(x, 5, torch.cat([c, c], 1)).sample, unet(x, 5, encoder_hidden_states=c).sample)


class LogitMap(torch.nn.Module):
    """Stands in for a SABW's output convolution: hand-set logits (B, 2, H, W) at any feature
    size, l(r, c) = 3 (c / (W - 1) - 1/2) + (r / (H - 1) - 1/2) for model 0 and 0 for model 1
    (lopsided in rows and columns, so a transposed or mirrored map would show)."""

    @staticmethod
    def logit(h: int, w: int) -> torch.Tensor:
        rows = torch.arange(h, dtype=torch.float32) / max(h - 1, 1) - 0.5
        cols = torch.arange(w, dtype=torch.float32) / max(w - 1, 1) - 0.5
        return 3 * cols[None, :] + rows[:, None]  # (H, W)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, _, h, w = hidden.shape
        return torch.stack([self.logit(h, w).expand(b, h, w), torch.zeros(b, h, w)], dim=1)


def test_a_hand_set_logit_map_blends_the_models_by_its_softmax():
    """Two UNets that differ only in their output head compute the same features up to the last
    aggregation point, so there the ensemble is sigma(l) * head_a + (1 - sigma(l)) * head_b per
    pixel, sigma(l) = 1 / (1 + exp(-l)) the two-model softmax of the hand-set map: the blend is
    recomputed from each model's own output. Every point's recorded weights are sigma(l) too."""
    import copy

    unet_a = small_unet(2)
    unet_b = copy.deepcopy(unet_a)
    with torch.no_grad():
        unet_b.conv_out.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(7))
    agg = aggregators_for([unet_a, unet_b])
    for point in agg.points:
        point.conv_out = LogitMap()
    ens = AFAEnsemble([unet_a, unet_b], agg).eval()
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        out = ens(x, torch.tensor(321), torch.cat([c, c], dim=1)).sample
        own = [u(x, torch.tensor(321), encoder_hidden_states=c).sample for u in (unet_a, unet_b)]
    w = 1 / (1 + torch.exp(-LogitMap.logit(8, 8).double()))  # (8, 8): model 0's weight
    assert (own[0] - own[1]).abs().mean() > 1e-2  # the heads differ, so the blend is visible
    # The features before the head agree only up to rounding (w f + (1 - w) f need not be f).
    torch.testing.assert_close(out.double(), w * own[0].double() + (1 - w) * own[1].double(), rtol=1e-5, atol=1e-6)
    for weights in ens.last_weights:
        h, wd = weights.shape[-2:]
        torch.testing.assert_close(
            weights[:, 0].double(), (1 / (1 + torch.exp(-LogitMap.logit(h, wd).double()))).expand(2, h, wd), rtol=1e-6, atol=1e-7
        )


@pytest.fixture(scope="module")
def models(tiny_a, tiny_b):
    return load_models([tiny_a, tiny_a, tiny_b], names=["a", "a2", "b"])


@pytest.fixture(scope="module")
def copies_dir(models, tmp_path_factory):
    ha, ha2, _ = models
    folder = tmp_path_factory.mktemp("afa") / "aa"
    fresh_aggregators([ha.unet, ha2.unet], [model_hash(ha), model_hash(ha2)], ["a", "a2"]).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler_a", "heun"])
def test_zero_init_afa_of_copies_samples_as_single(models, copies_dir, scheduler):
    ha, ha2, _ = models
    ref = mf.single(ha, PROMPT, scheduler=scheduler, **KW).latents
    out = mf.afa([ha, ha2], PROMPT, aggregator=copies_dir, scheduler=scheduler, **KW).latents
    assert torch.equal(out, ref)


@pytest.mark.parametrize("which", [0, 1])
def test_one_hot_aggregators_sample_as_that_model(models, tmp_path, which):
    """Saved aggregators whose logits are one-hot at every pixel of every point (exactly, in
    float32) make the ensemble of two different models that model, each on its own prompt: a
    sign or order error in the per-pixel softmax picks the other one."""
    ha, _, hb = models
    prompts = [PROMPT, "a red circle"]
    logits = [ONE_HOT if k == which else 0.0 for k in range(2)]
    folder = tmp_path / "onehot"
    set_constant_logits(
        fresh_aggregators([ha.unet, hb.unet], [model_hash(ha), model_hash(hb)], ["a", "b"], width=8), logits
    ).save_pretrained(folder)
    kw = {**KW, "num_inference_steps": 4}
    out = mf.afa([ha, hb], prompts, aggregator=str(folder), **kw).latents
    assert torch.equal(out, mf.single([ha, hb][which], prompts[which], **kw).latents)
    assert not torch.allclose(out, mf.single([ha, hb][1 - which], prompts[1 - which], **kw).latents, atol=1e-3)


def test_maps_reach_the_step_record_and_the_recorder(models, copies_dir, tmp_path):
    from multifusion.viz import AFAMapRecorder

    ha, ha2, _ = models
    rec = AFAMapRecorder()
    mf.afa([ha, ha2], PROMPT, aggregator=copies_dir, callback=rec, **KW)
    assert rec.steps == list(range(8))
    maps = rec.maps[0]
    assert len(maps) == len(aggregation_channels(ha.unet))
    assert maps[0].shape == (2, 2, 1, 8, 8)  # (N, B, 1, h, w)
    torch.testing.assert_close(maps[3].sum(0), torch.ones_like(maps[3][0]))
    (png,) = rec.save(tmp_path / "img", model_names=["a", "a2"])
    assert Image.open(png).size[1] > 32 * len(maps)


def test_save_load_round_trip(models, tmp_path):
    ha, _, hb = models
    agg = fresh_aggregators([ha.unet, hb.unet], [model_hash(ha), model_hash(hb)], ["a", "b"])
    with torch.no_grad():
        for p in agg.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    agg.save_pretrained(tmp_path / "agg")
    loaded = load_trained(tmp_path / "agg", [ha, hb])
    for (k, v), (k2, v2) in zip(agg.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads((tmp_path / "agg" / "config.json").read_text())["models"] == [model_hash(ha), model_hash(hb)]
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 32, 32)
    with torch.no_grad():
        a = AFAEnsemble([ha.unet, hb.unet], agg)(x, 3, c).sample
        b = AFAEnsemble([ha.unet, hb.unet], loaded)(x, 3, c).sample
    assert torch.equal(a, b)


def test_mismatched_saved_aggregators_are_refused(models, copies_dir, tmp_path):
    ha, ha2, hb = models
    with pytest.raises(IncompatibleModelsError, match="other models"):
        mf.afa([ha, hb], PROMPT, aggregator=copies_dir, **KW)
    fresh_aggregators([ha.unet, hb.unet], [model_hash(ha), model_hash(hb)], ["a", "b"]).save_pretrained(tmp_path / "ab")
    with pytest.raises(IncompatibleModelsError, match="order"):
        mf.afa([hb, ha], PROMPT, aggregator=str(tmp_path / "ab"), **KW)
    with pytest.raises(IncompatibleModelsError, match="trained for 2 models"):
        mf.afa([ha, hb, ha2], PROMPT, aggregator=str(tmp_path / "ab"), **KW)
    other = [small_unet(2), small_unet(2, seed=1)]
    with pytest.raises(IncompatibleModelsError, match="aggregators fit|configuration"):
        AFAEnsemble(other, aggregators_for([ha.unet, hb.unet]))
    with pytest.raises(RecipeError, match="no trained aggregators"):
        mf.afa([ha, hb], PROMPT, aggregator=str(tmp_path / "nowhere"), **KW)
    # the error lists the pairs that have shipped aggregators
    with pytest.raises(RecipeError, match=r"no shipped aggregators .*\(shipped: zoo:slice0 \+ zoo:slice1 \(zoo:afa-slices\)\)"):
        mf.afa([ha, hb], PROMPT, **KW)


def test_bad_models_are_refused(models, copies_dir):
    ha, _, _ = models
    with pytest.raises(IncompatibleModelsError, match="one configuration"):
        AFAEnsemble([small_unet(2), small_unet(3)], aggregators_for([small_unet(2)] * 2))
    with pytest.raises(IncompatibleModelsError, match="at least 2"):
        AFAEnsemble([small_unet(2)], aggregators_for([small_unet(2)] * 2))
    with pytest.raises(RecipeError):
        mf.afa([ha], PROMPT, aggregator=copies_dir, **KW)


def _jsonl(folder, n=24, size=32):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": ["a red circle", "a blue square"][i % 2]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder)


def test_training_killed_and_resumed_equals_uninterrupted(models, tmp_path):
    ha, _, hb = models
    data = _jsonl(tmp_path)
    cfg = AFATrainConfig(steps=6, batch_size=2, heldout_size=4, checkpoint_every=2, log_every=1, width=8)
    whole = train_afa([ha, hb], data, tmp_path / "whole", cfg, progress=False)
    part = train_afa([ha, hb], data, tmp_path / "part", cfg, progress=False, stop=3)  # "killed" after step 3
    assert part["steps"] == 3 and not (tmp_path / "part" / "aggregator").exists()
    resumed = train_afa([ha, hb], data, tmp_path / "part", cfg, progress=False)
    assert resumed["steps"] == whole["steps"] == 6
    a = load_tensors(tmp_path / "whole" / "checkpoint.safetensors")[0]
    b = load_tensors(tmp_path / "part" / "checkpoint.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / "loss.csv").read_text().count("\n") == 7  # header + one row per step, none twice
    assert resumed["heldout"] == whole["heldout"] and set(whole["heldout"]["0-200"]) == {
        "afa",
        "feature average",
        "a",
        "b",
        "eps average",
    }
    assert (tmp_path / "whole" / "loss.png").exists()
    mf.afa([ha, hb], PROMPT, aggregator=str(tmp_path / "whole"), **KW)  # what training writes is what afa loads
    with pytest.raises(Exception, match="other models"):
        train_afa([hb, ha], data, tmp_path / "whole", cfg, progress=False)


def test_cli_trains_and_resumes(tiny_a, tiny_b, tmp_path, capsys):
    from multifusion.cli import main

    data = _jsonl(tmp_path)
    args = [
        "afa",
        "train",
        tiny_a,
        tiny_b,
        "--data",
        data,
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        "--width",
        "8",
        "--checkpoint-every",
        "1",
        "--no-progress",
    ]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3"]) == 0  # more steps continue the run
    out = capsys.readouterr().out
    assert "trained 3 steps" in out
    summary = json.loads((tmp_path / "run" / "afa.json").read_text())
    assert summary["steps"] == 3 and summary["aggregator_parameters"] > 0
    assert main(["afa", "train", tiny_a, "--data", data, "--out", str(tmp_path / "one")]) == 2  # one model: a clear error
    assert "at least 2" in capsys.readouterr().err
