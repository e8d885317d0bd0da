"""Bad inputs to the newer commands (issue 33): `merge`, `mbw-search`, `afa train`, `zoo train`,
`zoo judge`. As in test_bad_inputs.py, every case ends in exit code 2 with the option or field at
fault named, no traceback and nothing written; the refusals that come before the models load are
checked to come before (loading is made to fail). Then one symlink-planting test per writer: a
link planted in the output folder is replaced, never written through.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from multifusion.cli import main


@dataclass
class Setup:
    tmp: Path
    tiny_dir: Path

    @property
    def a(self) -> str:
        return str(self.tiny_dir / "a")

    @property
    def b(self) -> str:
        return str(self.tiny_dir / "b")

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    def merge_recipe(self, models: list[str] | None = None, **params) -> str:
        recipe = {"method": "merge", "models": [{"model": m} for m in (models or [self.a, self.b])], "params": params}
        return str(self.file("merge.yaml", yaml.safe_dump(recipe)))

    def copy_model(self, name: str) -> Path:
        dest = self.tmp / name
        shutil.copytree(self.tiny_dir / "a", dest)
        return dest

    def images(self, folder: str, n: int = 4) -> Path:
        d = self.tmp / folder
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        return d

    def data(self, *bad_rows: str, raw: bytes | None = None) -> str:
        """A JSONL data set of 4 good rows, then `bad_rows` (or `raw` bytes as the whole file)."""
        d = self.images("data")
        rows = [json.dumps({"file_name": f"{i}.png", "text": "a red circle"}) for i in range(4)]
        (d / "metadata.jsonl").write_bytes(raw if raw is not None else ("\n".join(rows + list(bad_rows)) + "\n").encode())
        return str(d)

    def afa(self, *extra: str, data: str | None = None) -> list[str]:
        return [
            "afa",
            "train",
            self.a,
            self.b,
            "--data",
            data or self.data(),
            "--out",
            str(self.tmp / "run"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--width",
            "8",
            "--no-progress",
            *extra,
        ]

    def search(self, *extra: str) -> list[str]:
        return [
            "mbw-search",
            "ensemble",
            "--out",
            str(self.tmp / "search"),
            "--budget",
            "1",
            "--prompts",
            "1",
            "--steps",
            "1",
            "--no-progress",
            *extra,
        ]


def _truncated_unet(s: Setup) -> str:
    folder = s.copy_model("truncated")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


def _random_unet(s: Setup) -> str:
    folder = s.copy_model("random")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return str(folder)


def _user_folder(s: Setup) -> str:
    s.file("mine/notes.txt", "the user's own files")
    return str(s.tmp / "mine")


def _earlier_merge_behind_a_link(s: Setup) -> str:
    target = s.tmp / "real-merge"
    target.mkdir()
    (target / "merge.json").write_text("{}")
    (target / "model_index.json").write_text("{}")
    (s.tmp / "link").symlink_to(target, target_is_directory=True)
    return str(s.tmp / "link")


def _checkpoint_with_damaged_metadata(s: Setup) -> None:
    import torch
    from safetensors.torch import save_file

    (s.tmp / "run").mkdir()
    save_file({"model/x": torch.zeros(1)}, str(s.tmp / "run" / "checkpoint.safetensors"), metadata={"multifusion": "{not json"})


def _cache_of_other_data(s: Setup) -> None:
    import torch

    from multifusion.training import save_tensors

    save_tensors(
        s.tmp / "run" / "data.safetensors",
        {"mean": torch.zeros(2, 4, 4, 4)},
        {"captions": ["x"], "held_captions": ["y"], "data": "shapeworld:slice1"},
    )


def _search_log(s: Setup, text: str) -> None:
    s.file("search/search.jsonl", text)


def _recipe(s: Setup, model: str | None = None, **sampling) -> dict:
    return {
        "method": "single",
        "models": [{"model": model or s.a, "prompt": "a red circle"}],
        "sampling": {"num_inference_steps": 2, "height": 32, "width": 32, **sampling},
    }


def _generate(s: Setup, recipe: dict, *extra: str) -> list[str]:
    return ["generate", str(s.file("r.yaml", yaml.safe_dump(recipe))), "--out", str(s.tmp / "out"), "--no-progress", *extra]


def _sent_png(s: Setup, meta: str | dict) -> str:
    """A PNG as received from elsewhere, its multifusion metadata `meta` (a recipe, or raw text)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("multifusion", meta if isinstance(meta, str) else json.dumps({"recipe": meta, "seed": 0}))
    path = s.tmp / "sent-s0.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


def _from_image(s: Setup, meta: str | dict, *extra: str) -> list[str]:
    return ["generate", "--from-image", _sent_png(s, meta), "--out", str(s.tmp / "out"), "--no-progress", *extra]


def _dangling_out(s: Setup) -> str:
    (s.tmp / "out").symlink_to(s.tmp / "nowhere")
    return str(s.tmp / "out")


# (case id, what the message must name, CLI arguments, refused before any model loads)
CASES = [
    # generate and validate: what the first round did not reach
    (
        "generate-steps-1000-zoo",
        "sampling.num_inference_steps",
        lambda s: _generate(s, _recipe(s, "zoo:general", num_inference_steps=1000, height=None, width=None)),
        False,
    ),
    (
        "validate-steps-1000-zoo",
        "use at most 999 steps",
        lambda s: ["validate", str(s.file("r.yaml", yaml.safe_dump(_recipe(s, "zoo:general", num_inference_steps=1000))))],
        True,
    ),
    ("from-image-deep-metadata", "--from-image", lambda s: _from_image(s, "[" * 100_000 + "]" * 100_000), True),
    (
        "from-image-deep-recipe",
        "--from-image",
        lambda s: _from_image(s, '{"recipe": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        True,
    ),
    (
        "generate-out-dangling-link",
        "is a symbolic link to something that does not exist",
        lambda s: _generate(s, _recipe(s), "--out", _dangling_out(s)),
        False,
    ),
    (
        "amdm-specified-true",
        "params.specified",
        lambda s: [
            "validate",
            str(
                s.file(
                    "r.yaml",
                    yaml.safe_dump(
                        {
                            "method": "amdm",
                            "params": {"specified": True},
                            "models": [{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                        }
                    ),
                )
            ),
        ],
        True,
    ),
    ("from-image-4096-images", "sampling.num_images", lambda s: _from_image(s, _recipe(s, num_images=4096)), True),
    (
        "from-image-huge-canvas",
        "sampling.height x sampling.width",
        lambda s: _from_image(s, _recipe(s, height=4096, width=4096)),
        True,
    ),
    (
        "from-image-long-steps",
        "sampling.num_inference_steps",
        lambda s: _from_image(s, _recipe(s, num_inference_steps=1000)),
        True,
    ),
    (
        "max-pixels-beyond-memory",
        "out of memory: one allocation needed",
        lambda s: _generate(s, {**_recipe(s, height=4_000_000, width=4_000_000), "runtime": {"max_pixels": 10**14}}),
        False,
    ),
    # merge
    ("merge-out-dot", "--out", lambda s: ["merge", s.merge_recipe(), "--out", "."], True),
    ("merge-out-dotdot", "--out", lambda s: ["merge", s.merge_recipe(), "--out", "..", "--overwrite"], True),
    (
        "merge-truncated-unet",
        "models[1].model",
        lambda s: ["merge", s.merge_recipe([s.a, _truncated_unet(s)]), "--out", str(s.tmp / "m")],
        True,
    ),
    (
        "merge-random-bytes-unet",
        "corrupt .safetensors",
        lambda s: ["merge", s.merge_recipe([_random_unet(s), s.b]), "--out", str(s.tmp / "m")],
        True,
    ),
    (
        "merge-out-symlink-overwrite",
        "symbolic link",
        lambda s: ["merge", s.merge_recipe(), "--out", _earlier_merge_behind_a_link(s), "--overwrite"],
        True,
    ),
    (
        "merge-overwrite-user-folder",
        "holds no merge",
        lambda s: ["merge", s.merge_recipe(), "--out", _user_folder(s), "--overwrite"],
        True,
    ),
    (
        "merge-weights-overflow",
        "overflows",
        lambda s: ["merge", s.merge_recipe(weights=[1e308, 1e308]), "--out", str(s.tmp / "m")],
        True,
    ),
    ("generate-merge-weights-overflow", "params.weights", lambda s: ["validate", s.merge_recipe(weights=[1e308, 1e308])], True),
    (
        "average-weights-overflow",
        "params.weights",
        lambda s: [
            "validate",
            str(
                s.file(
                    "avg.yaml",
                    yaml.safe_dump(
                        {
                            "method": "average",
                            "params": {"weights": [1e308, 1e308]},
                            "models": [{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                        }
                    ),
                )
            ),
        ],
        True,
    ),
    # mbw-search
    ("mbw-seeds-zero", "--seeds", lambda s: s.search("--seeds", "0"), True),
    ("mbw-prompts-zero", "--prompts", lambda s: s.search("--prompts", "0"), True),
    ("mbw-budget-zero", "--budget", lambda s: s.search("--budget", "0"), True),
    ("mbw-grid-not-numbers", "--grid", lambda s: s.search("--grid", "a,b"), True),
    ("mbw-threads-zero", "--threads", lambda s: s.search("--threads", "0"), True),
    ("mbw-corrupt-settings", "search.json", lambda s: (s.file("search/search.json", '{"models": [tru'), s.search())[1], True),
    (
        "mbw-foreign-log-line",
        "3 block weights for a 13-block model",
        lambda s: (_search_log(s, json.dumps({"blocks": [5, 5, 5], "score": 1.0}) + "\n"), s.search())[1],
        True,
    ),
    (
        "mbw-log-line-out-of-range",
        "not all numbers in [0, 1]",
        lambda s: (_search_log(s, json.dumps({"blocks": [7.0] * 13, "score": 1.0}) + "\n"), s.search())[1],
        True,
    ),
    (
        "mbw-log-not-json-mid-file",
        "line 1 is not JSON",
        lambda s: (_search_log(s, "{oops\n" + json.dumps({"blocks": [0.5] * 13, "score": 0.1}) + "\n"), s.search())[1],
        True,
    ),
    # afa train: options
    ("afa-threads-zero", "--threads", lambda s: s.afa("--threads", "0"), True),
    ("afa-lr-nan", "--lr", lambda s: s.afa("--lr", "nan"), True),
    ("afa-lr-inf", "--lr", lambda s: s.afa("--lr", "inf"), True),
    ("afa-lr-negative", "--lr", lambda s: s.afa("--lr", "-1"), True),
    ("afa-width-negative", "--width", lambda s: s.afa("--width", "-5"), True),
    ("afa-width-zero", "--width", lambda s: s.afa("--width", "0"), True),
    ("afa-layers-zero", "--layers", lambda s: s.afa("--layers", "0"), True),
    # afa train: data
    ("afa-data-line-not-json", "line 5 is not JSON", lambda s: s.afa(data=s.data("{not json")), True),
    ("afa-data-line-not-object", "line 5", lambda s: s.afa(data=s.data("[1, 2]")), True),
    (
        "afa-data-latin1",
        "not UTF-8",
        lambda s: s.afa(data=s.data(raw='{"file_name": "0.png", "text": "caf\xe9"}\n'.encode("latin-1"))),
        True,
    ),
    (
        "afa-data-missing-file",
        "does not exist",
        lambda s: s.afa(data=s.data(json.dumps({"file_name": "gone.png", "text": "x"}))),
        True,
    ),
    (
        "afa-data-text-file",
        "not an image",
        lambda s: (
            s.file("data/notes.png", "not an image"),
            s.afa(data=s.data(json.dumps({"file_name": "notes.png", "text": "x"}))),
        )[1],
        True,
    ),
    (
        "afa-data-outside-folder",
        "outside the data folder",
        lambda s: (s.images("elsewhere", 1), s.afa(data=s.data(json.dumps({"file_name": "../elsewhere/0.png", "text": "x"}))))[1],
        True,
    ),
    (
        "afa-data-etc-hostname",
        "outside the data folder",
        lambda s: s.afa(data=s.data(json.dumps({"file_name": "../../../../../../../../etc/hostname", "text": "x"}))),
        True,
    ),
    ("afa-data-unknown-shapeworld", "--data", lambda s: s.afa(data="shapeworld:nosuch"), True),
    # afa train: a run folder that is not this run's
    ("afa-checkpoint-damaged-metadata", "damaged", lambda s: (_checkpoint_with_damaged_metadata(s), s.afa())[1], True),
    ("afa-loss-log-damaged", "loss.csv", lambda s: (s.file("run/loss.csv", "step,loss\nten,zero\n"), s.afa())[1], True),
    ("afa-cache-of-other-data", "caches the data", lambda s: (_cache_of_other_data(s), s.afa())[1], True),
    # zoo
    (
        "zoo-train-threads-zero",
        "--threads",
        lambda s: ["zoo", "train", "--out", str(s.tmp / "zoo"), "--threads", "0", "--no-progress"],
        True,
    ),
    (
        "zoo-judge-threads-zero",
        "--threads",
        lambda s: ["zoo", "judge", "--out", str(s.tmp / "judge"), "--threads", "0", "--no-progress"],
        True,
    ),
    ("zoo-judge-eval-n-zero", "--eval-n", lambda s: ["zoo", "judge", "--evaluate", "--eval-n", "0", "--no-progress"], True),
]


@pytest.fixture
def setup(tmp_path, tiny_dir, monkeypatch) -> Setup:
    monkeypatch.chdir(tmp_path)
    return Setup(tmp_path, tiny_dir)


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("case_id, field, make, before_loading", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses_with_the_field_and_writes_nothing(setup, case_id, field, make, before_loading, capsys, monkeypatch):
    argv = make(setup)
    if before_loading:

        def no_loading(*args, **kwargs):
            raise AssertionError("a model was loaded before the input was refused")

        import multifusion.loading

        monkeypatch.setattr(multifusion.loading, "load_models", no_loading)
    before = _files(setup.tmp)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert field in err, err
    assert "Traceback" not in err and "AssertionError" not in err, err
    assert len(err) < 10_000
    assert _files(setup.tmp) == before, "a refused command wrote or changed files"


def test_a_user_folder_survives_merge_overwrite(setup):
    folder = Path(_user_folder(setup))
    assert main(["merge", setup.merge_recipe(), "--out", str(folder), "--overwrite"]) == 2
    assert (folder / "notes.txt").read_text() == "the user's own files"


def test_merge_overwrite_replaces_an_earlier_merge(setup):
    out = setup.tmp / "m"
    assert main(["merge", setup.merge_recipe(), "--out", str(out)]) == 0
    assert main(["merge", setup.merge_recipe(weights=[1, 3]), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "merge.json").read_text())["spec"]["weights"] == [1.0, 3.0]
    assert not [p for p in setup.tmp.iterdir() if p.name.startswith(".m.")]  # no .part or .old left


# --------------------------------------------------------------------------- planted symlinks


def _plant(folder: Path, names: list[str], outside: Path) -> dict[Path, bytes]:
    """A link `folder/name` -> a file outside `folder` for each name; returns those files' bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    kept = {}
    for name in names:
        target = outside / f"precious-{name}"
        target.write_bytes(b"not yours to overwrite")
        (folder / name).symlink_to(target)
        kept[target] = target.read_bytes()
    return kept


def _untouched(kept: dict[Path, bytes], folder: Path, names: list[str]) -> None:
    for target, data in kept.items():
        assert target.read_bytes() == data, f"{target} was written through a planted link"
    for name in names:
        assert not (folder / name).is_symlink() and (folder / name).is_file(), name


def test_mbw_search_writes_through_no_planted_link(tiny_a, tiny_b, tmp_path):
    from multifusion.weights.search import search_block_weights

    out, names = tmp_path / "search", ["best.json", "search.png"]
    kept = _plant(out, names, tmp_path / "elsewhere")
    search_block_weights([tiny_a, tiny_b], ["p"], lambda ims, ps: 0.5, out, budget=1, num_inference_steps=1, progress=False)
    _untouched(kept, out, names)


@pytest.mark.parametrize("name", ["search.jsonl", "search.json"])
def test_mbw_search_refuses_a_planted_link_to_the_files_it_reads(tiny_a, tiny_b, tmp_path, name):
    from multifusion.errors import RecipeError
    from multifusion.weights.search import search_block_weights

    out = tmp_path / "search"
    kept = _plant(out, [name], tmp_path / "elsewhere")
    with pytest.raises(RecipeError, match="symbolic link"):
        search_block_weights([tiny_a, tiny_b], ["p"], lambda ims, ps: 0.5, out, budget=1, num_inference_steps=1, progress=False)
    _untouched(kept, out, [])


def test_afa_train_writes_through_no_planted_link(setup):
    out, names = setup.tmp / "run", ["afa.json", "loss.png", "loss.csv"]
    kept = _plant(out, names, setup.tmp / "elsewhere")
    folder = setup.tmp / "elsewhere-folder"  # the aggregators are a folder: a link to one is replaced too
    folder.mkdir()
    (folder / "precious.txt").write_text("mine")
    (out / "aggregator").symlink_to(folder, target_is_directory=True)
    assert main(setup.afa("--checkpoint-every", "1")) == 0
    _untouched(kept, out, names)
    assert sorted(p.name for p in folder.iterdir()) == ["precious.txt"]
    assert not (out / "aggregator").is_symlink() and (out / "aggregator" / "config.json").is_file()


def test_merge_single_file_writes_through_no_planted_link(setup):
    out = setup.tmp / "m"
    kept = _plant(setup.tmp, ["m.safetensors"], setup.tmp / "elsewhere")
    assert main(["merge", setup.merge_recipe(), "--out", str(out), "--single-file"]) == 2  # exists: refused without --overwrite
    _untouched(kept, setup.tmp, [])
    shutil.rmtree(out, ignore_errors=True)
    assert main(["merge", setup.merge_recipe(), "--out", str(out), "--single-file", "--overwrite"]) == 0
    _untouched(kept, setup.tmp, ["m.safetensors"])


def test_a_costly_image_recipe_runs_when_its_flags_bring_it_back(setup, capsys):
    """--from-image's confirmation names flags that really lower the work: --num-images 1 runs."""
    argv = _from_image(setup, _recipe(setup, num_images=4096), "--num-images", "1")
    assert main(argv) == 0, capsys.readouterr().err
    assert len(list((setup.tmp / "out").glob("*.png"))) == 1
