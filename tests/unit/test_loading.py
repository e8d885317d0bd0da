import pytest

from multifusion.errors import ModelLoadError, PickleRefusedError
from multifusion.families import SDHandle
from multifusion.loading import family_of, resolve


def test_kinds(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert resolve(str(tmp_path / "pipe")).kind == "folder"
    assert resolve(str(tmp_path / "m.safetensors")).kind == "single_file"
    assert resolve("runwayml/stable-diffusion-v1-5").kind == "hub"


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickles_refused_unless_allowed(tmp_path, suffix):
    f = tmp_path / f"model{suffix}"
    f.write_bytes(b"x")
    with pytest.raises(PickleRefusedError, match="can run arbitrary code"):
        resolve(str(f))
    assert resolve(str(f), allow_pickle=True).kind == "single_file"


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(tmp_path / "gone.safetensors"))
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        resolve(str(tmp_path / "m.safetensors"), config=str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="unknown zoo model"):
        resolve("zoo:does-not-exist")


def test_family_from_model_index_and_refusal_of_unknown_pipelines(tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert family_of(resolve(str(sd))) is SDHandle
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(
        ModelLoadError, match="is a KandinskyPipeline; the models that can be combined are: .*StableDiffusionPipeline"
    ):
        family_of(resolve(str(other)))


def test_a_load_error_pointing_at_the_stacktrace_above_says_its_root_cause():
    from multifusion.loading import _said

    try:
        try:
            raise ConnectionError("offline mode is enabled")
        except ConnectionError as cause:
            raise OSError(
                "Cannot load model a/b: the model is not fully cached locally. Please check out the root cause in the stacktrace above."
            ) from cause
    except OSError as err:
        said = _said(err)
    assert said == "Cannot load model a/b: the model is not fully cached locally. (ConnectionError: offline mode is enabled)"
    assert _said(ValueError("plain")) == "plain"
