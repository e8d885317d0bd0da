"""AFA over SDXL UNets: each model's own pooled text embedding and micro-conditioning reach its
own blocks; the zero-initialised ensemble of copies samples as `single`; training runs on the
SDXL conditioning (dropped captions zeroed as the pipeline zeroes empty prompts)."""

import json

import numpy as np
import pytest
import torch
from handmade import ONE_HOT, set_constant_logits
from PIL import Image

import multifusion as mf
from multifusion import load_models
from multifusion.features.ensemble import EnsembleHandle, model_hash, split_conditioning
from multifusion.features.train import AFATrainConfig, load_trained, train_afa
from multifusion.features.unet import AFAEnsemble
from multifusion.features.walkers import aggregation_channels, fresh_aggregators
from multifusion.training import load_checkpoint

PROMPT = "a blue square"
KW = dict(num_inference_steps=4, seed=1, num_images=2, progress=False, height=32, width=48)


@pytest.fixture(scope="module")
def models(tiny_sdxl_dir):
    return load_models([str(tiny_sdxl_dir / k) for k in ("a", "a", "c")], names=["a", "a2", "c"])


def _fresh(handles, folder):
    fresh_aggregators(
        [h.unet for h in handles], [model_hash(h) for h in handles], [h.name for h in handles], width=8
    ).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_zero_init_afa_of_sdxl_copies_samples_as_single(models, tmp_path, scheduler):
    a, a2, _ = models
    out = mf.afa([a, a2], PROMPT, aggregator=_fresh([a, a2], tmp_path / "aa"), scheduler=scheduler, **KW).latents
    assert torch.equal(out, mf.single(a, PROMPT, scheduler=scheduler, **KW).latents)


def test_each_sdxl_model_gets_its_own_conditioning(models, tmp_path):
    a, _, c = models
    assert model_hash(a) != model_hash(c)  # the text encoders differ: so do the hashes
    ensemble = AFAEnsemble([a.unet, c.unet], fresh_aggregators([a.unet, c.unet], ["x", "y"], ["a", "c"], width=8))
    handle = EnsembleHandle.of([a, c], ensemble)
    cond = handle.encode_prompt([PROMPT])
    own = split_conditioning(cond, 2)
    for member, part in zip((a, c), own):
        mine = member.encode_prompt([PROMPT])
        assert torch.equal(part.embeds, mine.embeds) and torch.equal(part.extra["text_embeds"], mine.extra["text_embeds"])
    negative = handle.encode_negative([""], cond)  # force_zeros_for_empty_prompt, per member
    assert not negative.embeds.any() and not negative.extra["text_embeds"].any()
    kwargs = handle.denoiser_kwargs(torch.zeros(1, 4, 8, 12), cond, torch.device("cpu"))["added_cond_kwargs"]
    assert kwargs["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48] * 2] and kwargs["text_embeds"].shape == (1, 32)
    assert len(ensemble.aggregators.config.channels) == len(aggregation_channels(a.unet))
    # End to end: aggregators one-hot on one model at every pixel of every point make the
    # ensemble that model exactly, with its own prompt, pooled embedding and time ids.
    prompts = [PROMPT, "a red circle"]
    for which, model in enumerate((a, c)):
        folder = tmp_path / f"onehot{which}"
        set_constant_logits(
            fresh_aggregators([a.unet, c.unet], [model_hash(a), model_hash(c)], ["a", "c"], width=8),
            [ONE_HOT if k == which else 0.0 for k in range(2)],
        ).save_pretrained(folder)
        out = mf.afa([a, c], prompts, aggregator=str(folder), **KW).latents
        assert torch.equal(out, mf.single(model, prompts[which], **KW).latents)
    # Zero-initialised (averaging) aggregators over the two models give neither of them.
    out = mf.afa([a, c], prompts, aggregator=_fresh([a, c], tmp_path / "ac"), **KW).latents
    assert not torch.allclose(out, mf.single(a, PROMPT, **KW).latents, atol=1e-4)


def test_training_on_sdxl_models_writes_aggregators_afa_loads(models, tmp_path):
    a, _, c = models
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": ["a red circle", "a blue square"][i % 2]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    # A large learning rate without warm-up, so that two steps move the aggregators visibly.
    cfg = AFATrainConfig(
        steps=2, batch_size=4, heldout_size=2, checkpoint_every=2, log_every=1, width=8, prompt_dropout=0.5, lr=1e-2, warmup=1
    )
    summary = train_afa([a, c], str(tmp_path), tmp_path / "run", cfg, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert set(summary["heldout"]["0-200"]) == {"afa", "feature average", "a", "c", "eps average"}
    # What afa loads is what training reached: the last checkpoint's weights, moved off the
    # zero-initialised output layer (logits no longer 0), so the ensemble no longer averages.
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").modules["model"]
    loaded = load_trained(tmp_path / "run", [a, c]).state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert all(loaded[f"points.{i}.conv_out.weight"].abs().max() > 1e-3 for i in range(len(aggregation_channels(a.unet))))
    out = mf.afa([a, c], PROMPT, aggregator=str(tmp_path / "run"), **KW).latents
    averaged = mf.afa([a, c], PROMPT, aggregator=_fresh([a, c], tmp_path / "zero"), **KW).latents
    assert not torch.allclose(out, averaged, atol=1e-4)
