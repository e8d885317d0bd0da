import argparse
import json

import pytest
import yaml
from PIL import Image

from multifusion.cli import build_parser, main
from multifusion.io import read_png_metadata


@pytest.fixture
def recipe_file(tmp_path, tiny_a, tiny_b):
    data = {
        "method": "average",
        "params": {"weights": [0.7, 0.3]},
        "models": [
            {"model": tiny_a, "prompt": "a red circle"},
            {"model": tiny_b, "prompt": "a blue square", "guidance_scale": 3},
        ],
        "sampling": {"num_inference_steps": 3, "seed": 10, "num_images": 3, "scheduler": "euler_a"},
    }
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_generate_writes_images_with_metadata_and_regenerates(tmp_path, recipe_file, capsys):
    out = tmp_path / "out"
    assert main(["generate", str(recipe_file), "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["fusion-s10.png", "fusion-s11.png", "fusion-s12.png"]
    meta = read_png_metadata(out / "fusion-s11.png")
    assert meta["seed"] == 11 and meta["recipe"]["params"] == {"weights": [0.7, 0.3]}
    assert meta["recipe"]["sampling"]["num_images"] == 1

    again = tmp_path / "again"
    assert main(["generate", "--from-image", str(out / "fusion-s11.png"), "--out", str(again), "--no-progress"]) == 0
    a = Image.open(out / "fusion-s11.png").tobytes()
    b = Image.open(again / "fusion-s11.png").tobytes()
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1  # batch of 2 vs alone: float-level differences only


def test_second_run_resumes_and_keeps_finished_images(tmp_path, recipe_file):
    out = tmp_path / "out"
    main(["generate", str(recipe_file), "--out", str(out), "--no-progress"])
    (out / "fusion-s11.png").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    main(["generate", str(recipe_file), "--out", str(out), "--no-progress"])
    assert (out / "fusion-s11.png").exists()
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamps.items())


def test_one_writer_makes_what_generate_the_ui_and_the_bench_write(tmp_path, recipe_file):
    """`write_images`: an image without a name is made but not written (the bench keeps a few),
    the callback sees each batch's seeds, a second run makes only what is missing, `overwrite`
    makes everything again."""
    from multifusion.api import write_images

    out, seen = tmp_path / "out", []

    def write(**kw):
        return list(
            write_images(
                str(recipe_file),
                out,
                lambda seed: None if seed == 11 else f"x{seed}.png",
                batch_size=2,
                callback=lambda step, seeds: seen.append(tuple(seeds)),
                progress=False,
                **kw,
            )
        )

    written = write()
    assert [w.result.seeds for w in written] == [[10, 11], [12]] and seen == [(10, 11)] * 3 + [(12,)] * 3
    assert [w.paths for w in written] == [[out / "x10.png", None], [out / "x12.png"]]
    assert sorted(p.name for p in out.iterdir()) == ["x10.png", "x12.png"]
    assert [m["seed"] for w in written for m in w.metadata] == [10, 11, 12]
    assert read_png_metadata(out / "x12.png") == written[1].metadata[0]
    assert [w.result.seeds for w in write()] == [[11]]
    assert [w.result.seeds for w in write(overwrite=True)] == [[10, 11], [12]]


def test_other_recipe_into_same_names_is_refused(tmp_path, recipe_file, capsys):
    out = tmp_path / "out"
    main(["generate", str(recipe_file), "--out", str(out), "--no-progress", "--num-images", "1"])
    assert main(["generate", str(recipe_file), "--out", str(out), "--no-progress", "--num-images", "1", "--cfg", "2"]) == 2
    assert "different recipe" in capsys.readouterr().err


def test_interrupt_leaves_no_partial_files(tmp_path, recipe_file, monkeypatch):
    import multifusion.api as api

    real_sample = api.sample

    def interrupted(*args, **kwargs):
        kwargs["callback"] = lambda info: (_ for _ in ()).throw(KeyboardInterrupt) if info.step == 1 else None
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(api, "sample", interrupted)
    out = tmp_path / "out"
    assert main(["generate", str(recipe_file), "--out", str(out), "--no-progress"]) == 130
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_recipe_exits_2_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "single", "models": [{"model": "zoo:nope", "prompt": "x"}]}))
    assert main(["generate", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "models[0].model" in capsys.readouterr().err
    assert main(["validate", str(bad), "--steps", "0"]) == 2
    assert "sampling.num_inference_steps" in capsys.readouterr().err


def test_size_not_multiple_of_vae_factor(tmp_path, recipe_file, capsys):
    assert main(["validate", str(recipe_file), "--height", "30"]) == 2
    assert "sampling.height: 30 is not a multiple of the VAE downsampling factor 4" in capsys.readouterr().err


def test_help_documents_every_command_and_option(capsys):
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("generate", "validate", "methods", "demo"):
        assert cmd in text

    def check(p, path):
        for action in p._actions:
            assert action.help, f"{path}: option {action.option_strings or action.dest} has no help"
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    check(child, f"{path} {name}")

    check(parser, "multifusion")


def test_bench_help_names_every_app():
    from multifusion.bench.apps import APPS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    app = next(a for a in sub["bench"]._actions if a.dest == "app")
    named = {w.strip(" ,") for w in app.help.split("(")[0].split(",")}
    assert named == set(APPS), set(APPS) ^ named


def test_every_sampling_and_runtime_field_is_a_flag(tmp_path, recipe_file, capsys):
    """The override flags come from `Sampling` and `Runtime`: each field has its own flag in
    `generate` and `validate` (and in the help), sets that field, and keeps its short alias."""
    from multifusion.cli import _apply_overrides
    from multifusion.recipe import Runtime, Sampling

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "validate"):
        help_text = sub[command].format_help()
        argv, want = ["--out", "x"] if command == "generate" else ["r.yaml"], {}
        for section, model in (("sampling", Sampling), ("runtime", Runtime)):
            for name in model.model_fields:
                flag = "--" + name.replace("_", "-")
                action = next(a for a in sub[command]._actions if flag in a.option_strings)
                assert flag in help_text and action.help.startswith(f"{section}.{name}")
                value = (
                    True
                    if action.nargs == 0
                    else action.choices[-1]
                    if action.choices
                    else {int: 8, float: 0.5, str: "cpu"}[action.type]
                )
                argv += [flag] if value is True else [flag, str(value)]
                want.setdefault(section, {})[name] = value
        assert _apply_overrides({"models": []}, sub[command].parse_args(argv)) == {"models": [], **want}
    args = sub["generate"].parse_args(["--out", "x", "--steps", "3", "--cfg", "2"])
    assert _apply_overrides({}, args)["sampling"] == {"num_inference_steps": 3, "guidance_scale": 2.0}
    assert main(["validate", str(recipe_file), "--height", "32", "--width", "32", "--max-pixels", "100"]) == 2  # a new flag
    assert "runtime.max_pixels" in capsys.readouterr().err


def test_zoo_train_runs_models_then_judge_and_installs_both(tmp_path, monkeypatch, capsys):
    # Training takes hours; this checks the wiring: what is trained, in which folder, what is installed.
    import multifusion.zoo.train as train
    import multifusion.zoo.train_judge as train_judge

    calls = []
    monkeypatch.setattr(train, "train_zoo", lambda out, **kw: calls.append(("models", str(out), kw["models"], kw["steps"])) or [])
    monkeypatch.setattr(train, "install", lambda out, models: calls.append(("install", models)) or ["general"])
    monkeypatch.setattr(train_judge, "train_judge", lambda out, **kw: calls.append(("judge", out.name, kw["seed"])))
    monkeypatch.setattr(train_judge, "record_accuracy", lambda weights: calls.append(("accuracy", weights.name)))
    monkeypatch.setattr(train_judge, "install_judge", lambda weights: calls.append(("install judge", weights.parent.name)))
    assert main(["zoo", "train", "--out", str(tmp_path), "--seed", "3", "--install", "--no-progress"]) == 0
    assert calls == [
        ("models", str(tmp_path), None, None),
        ("judge", "judge", 3),
        ("accuracy", "judge.safetensors"),
        ("install", None),
        ("install judge", "judge"),
    ]
    assert "installed: general, judge" in capsys.readouterr().out
    calls.clear()
    assert main(["zoo", "train", "--out", str(tmp_path), "--models", "expert", "--steps", "10"]) == 0
    assert calls == [("models", str(tmp_path), ["expert"], 10)]  # one model: no judge, nothing installed
    calls.clear()
    monkeypatch.setattr(train, "train_zoo", lambda out, **kw: calls.append(("models", kw["models"], kw["from_shipped"])) or [])
    assert main(["zoo", "train", "--out", str(tmp_path), "--from-shipped", "--steps", "10"]) == 0
    assert calls == [("models", None, True)]  # continuing the shipped models trains no judge


def test_zoo_list_names_every_installed_model(capsys, monkeypatch):
    from multifusion import loading
    from multifusion.lora import zoo_loras

    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"zoo:{name}" for name in [*loading.zoo_models(), *zoo_loras()]]
    assert zoo_loras() and all(line.endswith("LoRA (models[i].loras)") for line in lines[len(loading.zoo_models()) :])
    monkeypatch.setattr(loading, "zoo_models", lambda: [])
    assert main(["zoo", "list"]) == 0
    assert "multifusion zoo train" in capsys.readouterr().out
