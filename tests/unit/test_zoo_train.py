"""Zoo training: deterministic, resumable, and its folders load as zoo models (tiny sizes, seconds)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from multifusion import loading
from multifusion.training import CHECKPOINT, Checkpoint, load_checkpoint, load_tensors
from multifusion.zoo import render
from multifusion.zoo.models import MAX_TOKENS, build_tokenizer, vocabulary
from multifusion.zoo.train import DECODER_MIX as MIX
from multifusion.zoo.train import (
    DEFAULT_STEPS,
    FROM_SHIPPED,
    INIT_FROM,
    MODELS,
    TrainConfig,
    ZooTrainError,
    _finetune_start,
    _shipped_start,
    distribution,
    install,
    install_vae,
    shipped_steps,
    snapshot_path,
    tokenize,
    train_decoder,
    train_shipped_decoder,
    train_zoo,
)

# The fine-tune snapshot (step 4) is not a multiple of checkpoint_every (3), and the resumed run
# below stops at a checkpoint before it (3) and passes it on resume.
TINY = TrainConfig(
    size="tiny",
    dataset_size=24,
    vae_steps=3,
    vae_dataset_size=6,
    vae_batch_size=2,
    decoder_steps=2,
    batch_size=4,
    checkpoint_every=3,
    log_every=1,
    finetune_from_step=4,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run of 5 steps, and one stopped at 3 then resumed to 5."""
    straight = tmp_path_factory.mktemp("straight")
    resumed = tmp_path_factory.mktemp("resumed")
    train_zoo(straight, ["general"], steps=5, progress=False, config=TINY)
    train_zoo(resumed, ["general"], steps=3, progress=False, config=TINY)
    snapshot_before_resume = snapshot_path(resumed, "general", 4).exists()
    summary = train_zoo(resumed, ["general"], steps=5, progress=False, config=TINY)
    return straight, resumed, summary, snapshot_before_resume


def _ckpt(run: Path, name: str = "general") -> Checkpoint:
    return load_checkpoint(run / name / CHECKPOINT)


def test_tokenizer_has_one_token_per_word_and_fits_every_caption(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    assert tok.model_max_length == MAX_TOKENS
    assert [w for w in vocabulary() if len(tok.tokenize(w)) != 1] == []
    longest = "a cartoon of a purple checkered triangle on the left and an orange dotted diamond in the centre and a yellow striped square on the right in the night sky"
    render.parse_caption(longest)  # in the grammar
    assert tokenize(tok, [longest]).shape == (1, MAX_TOKENS)


def test_resumed_run_equals_uninterrupted_run(runs):
    straight, resumed, summary, _ = runs
    a, b = _ckpt(straight), _ckpt(resumed)
    assert a.step == b.step == 5 and summary[0]["steps"] == 5
    assert a.modules.keys() == {"model", "ema"}
    for key in a.modules:
        assert _equal(a.modules[key], b.modules[key]), key
    steps = [int(line.split(",")[0]) for line in (resumed / "general" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]  # the log is not duplicated by the resume


def test_install_writes_fp16_pipelines_that_load_as_zoo_models(runs, tmp_path, monkeypatch):
    straight, _, _, _ = runs
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


def test_install_refuses_a_vae_other_than_the_one_the_installed_models_share(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    straight, _, _, _ = runs
    install(straight, dest=tmp_path / "first")
    dest = tmp_path / "zoo"
    shutil.copytree(tmp_path / "first" / "general", dest / "toon")  # another model, the run's VAE
    assert install(straight, dest=dest) == ["general"]
    vae_file = dest / "toon" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae_file)
    key = next(k for k in tensors if k.startswith("decoder."))
    tensors[key] = tensors[key] + 1  # toon now holds a VAE of its own: an older decoder, say
    save_file(tensors, vae_file)
    shutil.rmtree(dest / "general")
    with pytest.raises(ZooTrainError, match=r"differs from the one \['toon'\].*from-shipped"):
        install(straight, dest=dest)
    assert not (dest / "general").exists()  # refused before anything was written
    shutil.rmtree(dest / "toon")
    assert install(straight, dest=dest) == ["general"]  # alone in the folder, nothing to agree with


def test_more_steps_continue_from_the_checkpoint(runs):
    straight, _, _, _ = runs
    before = _ckpt(straight)
    summary = train_zoo(straight, ["general"], steps=5, progress=False, config=TINY)  # already done: no-op
    assert summary[0]["steps"] == 5 and _equal(_ckpt(straight).modules["model"], before.modules["model"])


def _snapshot(run: Path, step: int = 4) -> tuple[dict, dict]:
    """The EMA weights of ``general``'s snapshot at ``step``, and its info."""
    return load_tensors(snapshot_path(run, "general", step))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parent_snapshot_is_written_at_its_step_across_a_resume(runs):
    straight, resumed, _, snapshot_before_resume = runs
    assert not snapshot_before_resume  # the first part stopped at step 3, before the snapshot step
    (a, a_info), (b, b_info) = _snapshot(straight), _snapshot(resumed)
    assert a_info == b_info == {"model": "general", "step": 4}
    assert _equal(a, b)  # the resume wrote exactly the uninterrupted run's EMA at step 4
    assert not _equal(a, _ckpt(straight).modules["ema"])  # and it is not the latest (step 5) EMA


def test_finetune_starts_from_the_snapshot_however_far_the_parent_has_got(runs, tmp_path):
    straight, _, _, _ = runs
    run = tmp_path / "run"
    shutil.copytree(straight, run)  # general at step 5, past the snapshot step 4
    weights, init_from = _finetune_start(run, "cartoon", TINY)
    assert init_from == {"model": "general", "step": 4}
    assert _equal(weights, _snapshot(run)[0]) and not _equal(weights, _ckpt(run).modules["ema"])

    summary = train_zoo(run, ["cartoon"], steps=1, progress=False, config=TINY)
    assert summary[0]["init_from"] == {"model": "general", "step": 4}
    first = _ckpt(run, "cartoon")
    assert first.meta["init_from"] == {"model": "general", "step": 4}

    # Train the parent further, then redo the fine-tune from scratch: the same weights come out.
    train_zoo(run, ["general"], steps=7, progress=False, config=TINY)
    assert _equal(_snapshot(run)[0], weights)
    for stale in (CHECKPOINT, "loss.csv"):
        (run / "cartoon" / stale).unlink()
    train_zoo(run, ["cartoon"], steps=1, progress=False, config=TINY)
    again = _ckpt(run, "cartoon")
    assert _equal(again.modules["model"], first.modules["model"]) and _equal(again.modules["ema"], first.modules["ema"])


def test_finetune_whose_parent_has_not_reached_the_step_is_refused(runs, tmp_path):
    straight, _, _, _ = runs
    run = tmp_path / "run"
    shutil.copytree(straight, run)  # general at step 5
    with pytest.raises(ZooTrainError, match=r"train 'general' to at least 50 steps first.*--models general"):
        train_zoo(run, ["cartoon"], steps=1, progress=False, config=replace(TINY, finetune_from_step=50))
    assert not (run / "cartoon").exists()  # refused before rendering anything
    # Past the step but without its snapshot (a folder from before snapshots, or another step).
    with pytest.raises(ZooTrainError, match=r"although 'general' is at step 5.*again from scratch"):
        train_zoo(run, ["cartoon"], steps=1, progress=False, config=replace(TINY, finetune_from_step=2))
    # Asked for together: refused before any training.
    with pytest.raises(ZooTrainError, match=r"would only be trained to 3 steps"):
        train_zoo(tmp_path / "fresh", ["general", "cartoon"], steps={"general": 3, "cartoon": 1}, progress=False, config=TINY)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ZooTrainError, match="finetune_from_step"):
        TrainConfig(finetune_from_step=0)


def test_the_shipped_records_follow_the_schedule():
    """Each shipped model is either the default schedule (from scratch, or a fine-tune of the
    parent's snapshot) or a later stage: a continuation of weights it shipped before, or a
    fine-tune rebased on the shipped parent (docs/zoo-training.md)."""
    step = TrainConfig().finetune_from_step
    assert all(DEFAULT_STEPS[parent] >= step for parent in set(INIT_FROM.values()))
    shipped = {
        name: json.loads((loading.zoo_root() / name / "training.json").read_text())
        for name in loading.zoo_models()
        if (loading.zoo_root() / name / "training.json").exists() and name in DEFAULT_STEPS
    }
    rebased = "shipped fp16, upcast to float32"
    for name, info in shipped.items():
        start = info["init_from"]
        if start is not None and start["model"] == name:  # continued from weights it shipped before
            assert start["weights"] == rebased and start["step"] >= DEFAULT_STEPS[name], name
            assert info["total_steps"] == start["step"] + info["steps"], name
        elif start is not None and start.get("weights") == rebased:  # fine-tuned from what the parent ships
            assert start["step"] == shipped_steps(start["model"]), name
        else:
            assert info["steps"] == DEFAULT_STEPS[name], name
            assert start == ({"model": INIT_FROM[name], "step": step} if name in INIT_FROM else None), name


def test_models_from_shipped_weights_start_from_the_parent_upcast_and_train_alone(tmp_path):
    from safetensors.torch import load_file

    for name, parent in FROM_SHIPPED.items():
        assert name not in MODELS and distribution(name).name == name
        weights, init_from = _shipped_start(parent)
        shipped = load_file(loading.zoo_root() / parent / "unet" / "diffusion_pytorch_model.safetensors")
        assert shipped.keys() == weights.keys() and all(v.dtype == torch.float16 for v in shipped.values())
        assert all(weights[k].dtype == torch.float32 and torch.equal(weights[k].half(), shipped[k]) for k in shipped)
        assert init_from["model"] == parent
        with pytest.raises(ZooTrainError, match="train them alone"):
            train_zoo(tmp_path, [parent, name], steps=1, progress=False, config=TINY)
        info_path = loading.zoo_root() / name / "training.json"
        if info_path.exists():  # installed: its record says where it started (the parent, or itself continued)
            start = json.loads(info_path.read_text())["init_from"]
            assert start == init_from or (start["model"] == name and start["step"] >= DEFAULT_STEPS[name]), name


def test_a_shipped_model_continues_from_its_own_weights_without_a_parent_snapshot(tmp_path):
    from safetensors.torch import load_file

    config = replace(TINY, size="zoo", dataset_size=4, batch_size=2, finetune_from_step=1)
    (summary,) = train_zoo(tmp_path, ["palette"], steps=1, progress=False, config=config, from_shipped=True)
    shipped = load_file(loading.zoo_root() / "palette" / "unet" / "diffusion_pytorch_model.safetensors")
    steps = shipped_steps("palette")  # a continued model's total, the step its continuation starts from
    assert summary["init_from"] == {"model": "palette", "step": steps, "weights": "shipped fp16, upcast to float32"}
    assert summary["total_steps"] == steps + 1  # a continuation counts the steps it started from
    ema = _ckpt(tmp_path, "palette").modules["ema"]
    # one step at the first warm-up learning rate moves the weights a little, from the shipped ones
    assert max((ema[k] - shipped[k].float()).abs().max().item() for k in shipped) < 1e-3
    assert json.loads((tmp_path / "base" / "base.json").read_text())["from_shipped"] == "general"
    (summary,) = train_zoo(tmp_path, ["general"], steps=1, progress=False, config=config, from_shipped=True)
    assert summary["init_from"]["model"] == "general"
    (summary,) = train_zoo(tmp_path, ["toon"], steps=1, progress=False, config=config, from_shipped=True)
    assert summary["init_from"]["model"] == "toon"  # continues itself, not the general it first started from
    assert not snapshot_path(tmp_path, "general", 1).exists()  # its step 1 is not general's step 1


def test_rebased_fine_tunes_start_from_the_shipped_parent(tmp_path):
    from safetensors.torch import load_file

    config = replace(TINY, size="zoo", dataset_size=4, batch_size=2, finetune_from_step=1)
    (summary,) = train_zoo(tmp_path, ["cartoon"], steps=1, progress=False, config=config, rebase=True)
    assert summary["init_from"] == {
        "model": "general",
        "step": shipped_steps("general"),
        "weights": "shipped fp16, upcast to float32",
    }
    assert summary["total_steps"] == 1  # a fine-tune's steps are its own, not its parent's
    shipped = load_file(loading.zoo_root() / "general" / "unet" / "diffusion_pytorch_model.safetensors")
    ema = _ckpt(tmp_path, "cartoon").modules["ema"]
    assert max((ema[k] - shipped[k].float()).abs().max().item() for k in shipped) < 1e-3
    with pytest.raises(ZooTrainError, match=r"\['general'\] cannot be rebased"):
        train_zoo(tmp_path, ["general", "cartoon"], steps=1, progress=False, config=config, rebase=True)
    with pytest.raises(ZooTrainError, match="not from_shipped"):
        train_zoo(tmp_path, ["cartoon"], steps=1, progress=False, config=config, rebase=True, from_shipped=True)


def test_a_model_locked_by_another_process_is_skipped_not_waited_for(tmp_path):
    from filelock import FileLock

    from multifusion.zoo.train import _locked

    with FileLock(tmp_path / "general.lock"):  # another holder: a separate lock, as another process's
        with _locked(tmp_path / "general.lock", blocking=False) as got:
            assert got is False
    with _locked(tmp_path / "general.lock", blocking=False) as got:
        assert got is True


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


def test_the_decoder_phase_trains_the_decoder_alone_and_resumes_exactly(tmp_path):
    """The encoder (and so every UNet's latent space) is untouched; the decoder moves; a run
    stopped and resumed ends where an uninterrupted one does."""
    from multifusion.zoo.models import SIZES, build_vae

    config = replace(TINY, decoder_steps=4)
    start = {k: v.clone() for k, v in build_vae(SIZES["tiny"], 0).state_dict().items()}
    straight = train_decoder(tmp_path / "a", build_vae(SIZES["tiny"], 0), config, 0, False).state_dict()
    (tmp_path / "b").mkdir()
    train_decoder(tmp_path / "b", build_vae(SIZES["tiny"], 0), replace(config, decoder_steps=2), 0, False)
    resumed = train_decoder(tmp_path / "b", build_vae(SIZES["tiny"], 0), config, 0, False).state_dict()
    for key, value in straight.items():
        decoder = key.startswith(("decoder.", "post_quant_conv."))
        assert torch.equal(value, start[key]) is not decoder, key
        assert torch.equal(value, resumed[key]), key
    skipped = train_decoder(tmp_path / "c", build_vae(SIZES["tiny"], 0), replace(config, decoder_steps=0), 0, False)
    assert all(torch.equal(v, start[k]) for k, v in skipped.state_dict().items())
    with pytest.raises(ZooTrainError, match="decoder_steps"):
        TrainConfig(decoder_steps=-1)


def test_the_decoder_learns_every_scene_the_models_draw_and_the_first_vae_its_own_mix(tmp_path, monkeypatch):
    """The decoder phase renders `toon` and `tint` scenes too (the first VAE never saw them: the
    reason the phase exists); the whole-VAE phase keeps its own mix."""
    from multifusion.zoo import train
    from multifusion.zoo.models import SIZES, build_vae

    mixes = []
    real = train._vae_data

    def recorded(config, seed, mix=train.VAE_MIX):
        mixes.append(tuple(mix))
        return real(config, seed, mix)

    monkeypatch.setattr(train, "_vae_data", recorded)
    train_decoder(tmp_path / "d", build_vae(SIZES["tiny"], 0), replace(TINY, decoder_steps=1), 0, False)
    train._train_vae(tmp_path / "v", replace(TINY, vae_steps=1), 0, False)
    assert mixes == [tuple(MIX), tuple(train.VAE_MIX)]
    assert {"toon", "tint"} <= set(MIX) and not {"toon", "tint"} & set(train.VAE_MIX)


@pytest.mark.skipif(not loading.zoo_models(), reason="no zoo models installed")
def test_a_decoder_trained_on_the_shipped_vae_installs_into_every_model_as_one_file(tmp_path):
    from safetensors.torch import load_file

    dest = tmp_path / "weights"
    for name in ("general", "toon"):
        shutil.copytree(loading.zoo_root() / name, dest / name)
    with pytest.raises(ZooTrainError, match="zoo decoder --out"):
        install_vae(tmp_path / "nothing", dest=dest)
    with pytest.raises(ZooTrainError, match="at least one step"):
        train_shipped_decoder(tmp_path / "run", replace(TrainConfig(), decoder_steps=0), progress=False)
    config = replace(TrainConfig(), decoder_steps=1, vae_dataset_size=4, vae_batch_size=2)
    info = train_shipped_decoder(tmp_path / "run", config, progress=False)
    assert info["decoder_steps"] == 1 and set(info["psnr_db_before_after"]) == {*MIX}
    shipped = load_file(loading.zoo_root() / "general" / "vae" / "diffusion_pytorch_model.safetensors")
    assert install_vae(tmp_path / "run", dest=dest) == ["general", "toon"]
    files = [dest / n / "vae" / "diffusion_pytorch_model.safetensors" for n in ("general", "toon")]
    assert len({_digest(f) for f in files}) == 1
    new = load_file(files[0])
    assert {v.dtype for v in new.values()} == {torch.float16} and new.keys() == shipped.keys()
    decoder = [k for k in shipped if k.startswith(("decoder.", "post_quant_conv."))]
    assert all(torch.equal(new[k], shipped[k]) for k in shipped if k not in decoder)  # the encoder, bit for bit
    assert any(not torch.equal(new[k], shipped[k]) for k in decoder)  # one small step: some weights move in fp16
    before = json.loads((loading.zoo_root() / "toon" / "training.json").read_text())
    record = json.loads((dest / "toon" / "training.json").read_text())
    assert record["base"]["decoder_steps"] == 1 and record["base"]["vae_psnr_db"] == info["vae_psnr_db"]
    assert {k: v for k, v in record.items() if k != "base"} == {k: v for k, v in before.items() if k != "base"}
