"""AFA over tiny SD3 transformers: the ensemble walks the joint blocks (copies of one model
under any aggregator are that model; weights of exactly one model reproduce that model with its
own conditioning), zero-initialised aggregators over two copies sample as `single`, two
different models fuse end to end, training writes aggregators that load back and give the same
output, and FLUX and bad inputs are refused with the reason."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import multifusion as mf
from multifusion import IncompatibleModelsError, load_models
from multifusion.families import SD3Handle
from multifusion.features.ensemble import EnsembleHandle, model_hash, split_conditioning
from multifusion.features.mmdit import SD3Ensemble
from multifusion.features.train import AFATrainConfig, load_trained, train_afa
from multifusion.features.unet import AFAEnsemble
from multifusion.features.walkers import aggregation_channels, build_ensemble, fresh_aggregators
from multifusion.training import load_checkpoint

PROMPT, OTHER = "a red circle in a snowy field", "a blue square"
KW = dict(num_inference_steps=4, seed=3, num_images=2, height=16, width=32, progress=False)


@pytest.fixture(scope="module")
def models(flow_dir):
    return load_models([str(flow_dir / k) for k in ("sd3_a", "sd3_a", "sd3_b", "sd3_no_t5")], names=["a", "a2", "b", "c"])


def _fresh(handles, folder=None, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    agg = fresh_aggregators([h.unet for h in handles], [model_hash(h) for h in handles], [h.name for h in handles], width=8)
    if seed is not None:  # random aggregators: every weight moved, the output layer included
        with torch.no_grad():
            for p in agg.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    if folder is not None:
        agg.save_pretrained(folder)
    return agg


def _inputs(handles, batch=2):
    torch.manual_seed(0)
    x = torch.randn(batch, 16, 8, 12)
    t = torch.full((batch,), 700.0)
    own = [h.encode_prompt([PROMPT, OTHER][:batch]) for h in handles]
    return x, t, own


def _call(denoiser, x, t, cond):
    with torch.no_grad():
        return denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.extra["pooled"],
            return_dict=False,
        )[0]


def test_copies_under_random_aggregators_are_the_model(models):
    a, a2, _, _ = models
    ensemble = build_ensemble([a.unet, a2.unet], _fresh([a, a2], seed=1)).eval()
    assert isinstance(ensemble, SD3Ensemble)
    handle = EnsembleHandle.of([a, a2], ensemble)
    x, t, (own, _) = _inputs([a, a2])
    out = _call(ensemble, x, t, handle.encode_prompt([PROMPT, OTHER]))
    # any convex weights of two equal features give that feature (to float rounding: w f + (1 - w) f)
    torch.testing.assert_close(out, _call(a.unet, x, t, own), rtol=1e-5, atol=1e-6)
    assert len(ensemble.last_weights) == len(aggregation_channels(a.unet)) == 1 + 2  # patch embedding, block 0, output
    assert [tuple(w.shape) for w in ensemble.last_weights] == [(2, 2, 4, 6), (2, 2, 4, 6), (2, 2, 8, 12)]
    assert not torch.allclose(ensemble.last_weights[0], torch.full_like(ensemble.last_weights[0], 0.5))  # weights really moved


@pytest.mark.parametrize("chosen", [0, 1])
def test_weights_of_one_model_give_that_model_with_its_own_conditioning(models, chosen):
    """Models a and c differ in transformer, text encoders (c has no T5) and pooled embedding:
    aggregators that put all weight on one model reproduce that model called alone."""
    a, _, _, c = models
    agg = _fresh([a, c])
    logits = torch.tensor([30.0, -30.0] if chosen == 0 else [-30.0, 30.0])
    for point in agg.points:  # per-pixel logits (B, N, H, W) favouring the chosen model
        point.logits = lambda features, prepared: logits.view(1, 2, 1, 1).expand(features.shape[1], 2, *features.shape[-2:])
    ensemble = build_ensemble([a.unet, c.unet], agg).eval()
    handle = EnsembleHandle.of([a, c], ensemble)
    x, t, own = _inputs([a, c])
    joined = handle.encode_prompt([PROMPT, OTHER])
    parts = split_conditioning(joined, 2)
    assert all(torch.equal(p.embeds, o.embeds) and torch.equal(p.extra["pooled"], o.extra["pooled"]) for p, o in zip(parts, own))
    assert joined.extra["pooled"].shape == (2, 64)  # each model's pooled (B, 32) side by side
    assert torch.equal(_call(ensemble, x, t, joined), _call((a, c)[chosen].unet, x, t, own[chosen]))


def test_zero_init_afa_of_copies_samples_as_single(models, tmp_path):
    a, a2, _, _ = models
    _fresh([a, a2], tmp_path / "aa")
    ref = mf.single(a, PROMPT, **KW).latents
    out = mf.afa([a, a2], PROMPT, aggregator=str(tmp_path / "aa"), **KW).latents
    assert torch.equal(out, ref)


def test_two_different_models_fuse_end_to_end_with_maps(models, tmp_path):
    from multifusion.viz import AFAMapRecorder

    a, _, b, _ = models
    _fresh([a, b], tmp_path / "ab", seed=2)
    rec = AFAMapRecorder()
    out = mf.afa([a, b], [PROMPT, OTHER], aggregator=str(tmp_path / "ab"), callback=rec, **KW)
    assert torch.isfinite(out.latents).all() and len(out.images) == 2
    for ref in (mf.single(a, PROMPT, **KW).latents, mf.single(b, OTHER, **KW).latents):
        assert not torch.allclose(out.latents, ref, atol=1e-3)
    maps = rec.maps[0]
    assert rec.steps == list(range(4)) and [tuple(m.shape) for m in maps] == [(2, 2, 1, 4, 8)] * 2 + [(2, 2, 1, 8, 16)]
    torch.testing.assert_close(maps[1].sum(0), torch.ones_like(maps[1][0]))


def _jsonl(folder, n=12, size=16):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[..., i % 3] = 200  # flat red, green or blue pictures: something the models can learn
        img[rng.integers(0, size), :] = 255
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": ["a red circle", "a green square", "a blue square"][i % 3]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder)


def test_training_writes_aggregators_that_load_back_and_predict_the_same(models, tmp_path):
    a, _, b, _ = models
    cfg = AFATrainConfig(steps=40, batch_size=4, lr=3e-3, warmup=1, heldout_size=2, checkpoint_every=20, log_every=1, width=8)
    summary = train_afa([a, b], _jsonl(tmp_path), tmp_path / "run", cfg, progress=False)
    losses = [float(r.split(",")[1]) for r in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert set(summary["heldout"]["0-200"]) == {"afa", "feature average", "a", "b", "eps average"}
    # the saved aggregators are the trained ones: same tensors as the run's last checkpoint ...
    loaded = load_trained(tmp_path / "run", [a, b])
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").modules["model"]
    state = loaded.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)
    # ... they moved away from feature averaging, and the ensemble gives one output from either
    fresh = _fresh([a, b])
    x, t, _ = _inputs([a, b])
    joined = EnsembleHandle.of([a, b], build_ensemble([a.unet, b.unet], fresh)).encode_prompt([PROMPT, OTHER])
    from_file = _call(build_ensemble([a.unet, b.unet], loaded), x, t, joined)
    again = fresh_aggregators([a.unet, b.unet], [model_hash(a), model_hash(b)], ["a", "b"], width=8)
    again.load_state_dict({k: trained[k] for k in state})
    assert torch.equal(from_file, _call(build_ensemble([a.unet, b.unet], again.eval()), x, t, joined))
    assert not torch.allclose(from_file, _call(build_ensemble([a.unet, b.unet], fresh), x, t, joined), atol=1e-5)
    first = mf.afa([a, b], PROMPT, aggregator=str(tmp_path / "run"), **KW).latents
    assert torch.equal(first, mf.afa([a, b], PROMPT, aggregator=str(tmp_path / "run" / "aggregator"), **KW).latents)


def test_flux_and_bad_inputs_are_refused(models, flux_a, flux_b, tmp_path):
    a, a2, _, _ = models
    flux = load_models([flux_a, flux_b])
    _fresh([a, a2], tmp_path / "aa")
    with pytest.raises(IncompatibleModelsError, match="single-stream blocks"):
        mf.afa(flux, PROMPT, aggregator=str(tmp_path / "aa"), height=16, width=16, num_inference_steps=2, progress=False)
    with pytest.raises(IncompatibleModelsError, match="single-stream blocks"):
        train_afa(flux, _jsonl(tmp_path), tmp_path / "run", AFATrainConfig(steps=1, width=8), progress=False)
    with pytest.raises(IncompatibleModelsError, match="one kind"):
        fresh_aggregators([a.unet, flux[0].unet], ["x", "y"], ["a", "flux"], width=8)
    with pytest.raises(IncompatibleModelsError, match="build_ensemble"):
        AFAEnsemble([a.unet, a2.unet], _fresh([a, a2]))
    ensemble = build_ensemble([a.unet, a2.unet], _fresh([a, a2]))
    x, t, (own, _) = _inputs([a, a2])
    with pytest.raises(ValueError, match="pooled_projections has width 32, not 64 "):
        ensemble(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=torch.cat([own.embeds] * 2, 1),
            pooled_projections=own.extra["pooled"],
        )
    with pytest.raises(TypeError, match="skip_layers"):
        ensemble(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=torch.cat([own.embeds] * 2, 1),
            pooled_projections=torch.cat([own.extra["pooled"]] * 2, 1),
            skip_layers=[0],
        )
    assert isinstance(EnsembleHandle.of([a, a2], ensemble), SD3Handle)


def test_cli_trains_sd3_aggregators(flow_dir, tmp_path, capsys):
    from multifusion.cli import main

    models = [str(flow_dir / "sd3_a"), str(flow_dir / "sd3_b")]
    args = [
        "afa",
        "train",
        *models,
        "--data",
        _jsonl(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--width",
        "8",
        "--no-progress",
    ]
    assert main(args) == 0 and "trained 2 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "aggregator" / "config.json").read_text())["channels"] == [16, 16, 16]
