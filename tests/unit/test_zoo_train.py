"""Zoo training: deterministic, resumable, and its folders load as zoo models (tiny sizes, seconds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from multifusion import loading
from multifusion.zoo import render
from multifusion.zoo.models import MAX_TOKENS, build_tokenizer, vocabulary
from multifusion.zoo.train import MODELS, TrainConfig, ZooTrainError, distribution, install, tokenize, train_zoo

TINY = TrainConfig(
    size="tiny", dataset_size=24, vae_steps=3, vae_dataset_size=6, vae_batch_size=2, batch_size=4, checkpoint_every=2, log_every=1
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run of 5 steps, and one stopped at 3 then resumed to 5."""
    straight = tmp_path_factory.mktemp("straight")
    resumed = tmp_path_factory.mktemp("resumed")
    train_zoo(straight, ["general"], steps=5, progress=False, config=TINY)
    train_zoo(resumed, ["general"], steps=3, progress=False, config=TINY)
    summary = train_zoo(resumed, ["general"], steps=5, progress=False, config=TINY)
    return straight, resumed, summary


def _ckpt(run: Path) -> dict:
    return torch.load(run / "general" / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_tokenizer_has_one_token_per_word_and_fits_every_caption(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    assert tok.model_max_length == MAX_TOKENS
    assert [w for w in vocabulary() if len(tok.tokenize(w)) != 1] == []
    longest = "a cartoon of a purple checkered triangle on the left and an orange dotted diamond in the centre and a yellow striped square on the right in the night sky"
    render.parse_caption(longest)  # in the grammar
    assert tokenize(tok, [longest]).shape == (1, MAX_TOKENS)


def test_resumed_run_equals_uninterrupted_run(runs):
    straight, resumed, summary = runs
    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["step"] == b["step"] == 5 and summary[0]["steps"] == 5
    for key in ("unet", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    steps = [int(line.split(",")[0]) for line in (resumed / "general" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]  # the log is not duplicated by the resume


def test_install_writes_fp16_pipelines_that_load_as_zoo_models(runs, tmp_path, monkeypatch):
    straight, _, _ = runs
    assert install(straight, dest=tmp_path) == ["general"]
    folder = tmp_path / "general"
    info = json.loads((folder / "training.json").read_text())
    assert info["steps"] == 5 and info["data"] == "general"
    monkeypatch.setattr(loading, "zoo_root", lambda: tmp_path)
    assert loading.zoo_models() == ["general"]
    handle = loading.load_models(["zoo:general"])[0]
    from safetensors import safe_open

    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert handle is not None


def test_more_steps_continue_from_the_checkpoint(runs):
    straight, _, _ = runs
    before = _ckpt(straight)
    summary = train_zoo(straight, ["general"], steps=5, progress=False, config=TINY)  # already done: no-op
    assert summary[0]["steps"] == 5 and torch.equal(_ckpt(straight)["unet"]["conv_in.weight"], before["unet"]["conv_in.weight"])


def test_bad_names_and_steps_are_refused(tmp_path):
    with pytest.raises(ZooTrainError, match="did you mean 'general'"):
        train_zoo(tmp_path, ["generl"], steps=1, progress=False, config=TINY)
    with pytest.raises(ZooTrainError, match="steps"):
        train_zoo(tmp_path, ["general"], steps=-1, progress=False, config=TINY)
    with pytest.raises(ZooTrainError):
        TrainConfig(size="huge")


def test_every_model_has_a_distribution():
    names = {m: distribution(m).name for m in MODELS}
    assert names["slice0"] == "general-slice0of2" and names["expert"] == "expert"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not loading.zoo_models(), reason="no zoo models installed")
def test_shipped_models_share_text_encoder_and_vae_and_stay_small():
    root = loading.zoo_root()
    names = loading.zoo_models()
    te = {_digest(root / n / "text_encoder" / "model.safetensors") for n in names}
    vae = {_digest(root / n / "vae" / "diffusion_pytorch_model.safetensors") for n in names}
    assert len(te) == 1 and len(vae) == 1
    total = sum(p.stat().st_size for n in names for p in (root / n).rglob("*") if p.is_file())
    assert total < 60e6
