"""Bad inputs, as a hostile or careless user gives them (issue 19): every one ends in exit code 2
(CLI) or the library's error type, with a message naming the field at fault, no file written,
and no traceback.

Each case is a function of a `Setup` (tiny models, a scratch folder) returning the CLI arguments
(or, for Python API cases, raising through the library); `field` is what the message must name.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, PngImagePlugin

from multifusion.cli import main
from multifusion.errors import MultifusionError, SamplingError

CUDA = torch.cuda.is_available()


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

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def recipe(self, **changes) -> dict:
        base = {
            "method": "single",
            "models": [{"model": self.a, "prompt": "a red circle"}],
            "sampling": {"num_inference_steps": 2, "height": 32, "width": 32},
        }
        for key, value in changes.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return base

    def write(self, data, name: str = "r.yaml") -> str:
        path = self.tmp / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, str):
            path.write_text(data)
        else:
            path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
        return str(path)

    def generate(self, data, *extra: str, name: str = "r.yaml") -> list[str]:
        return ["generate", self.write(data, name), "--out", str(self.out), "--no-progress", *extra]

    def validate(self, data, *extra: str, name: str = "r.yaml") -> list[str]:
        return ["validate", self.write(data, name), *extra]

    def png(self, name: str, meta: str | None) -> str:
        info = PngImagePlugin.PngInfo()
        if meta is not None:
            info.add_text("multifusion", meta)
        path = self.tmp / name
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
        return str(path)

    def from_image(self, meta: str | None, *extra: str) -> list[str]:
        return ["generate", "--from-image", self.png("given-s0.png", meta), "--out", str(self.out), "--no-progress", *extra]

    def mod(self, **params) -> dict:
        region = {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": "x"}
        return self.recipe(method="mod", models=[{"model": self.a}], params={"regions": [region], **params})

    def bench(self, *extra: str) -> list[str]:
        return [
            "bench",
            "fine-grained",
            "--out",
            str(self.out),
            "--model",
            f"general={self.a}",
            "--model",
            f"expert={self.b}",
            "--seeds",
            "1",
            "--prompts",
            "1",
            "--steps",
            "2",
            "--no-progress",
            *extra,
        ]

    def copy_model(self, name: str) -> Path:
        dest = self.tmp / name
        shutil.copytree(self.tiny_dir / "a", dest)
        return dest


NAN, INF = float("nan"), float("inf")
BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    + "models: *i\n"
)


def _region(**kw) -> dict:
    return {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "prompt": "x", **kw}


def _image_region(image: str, **kw) -> dict:
    return {"row_init": 0, "row_end": 32, "col_init": 0, "col_end": 32, "image": image, **kw}


def _truncated_safetensors(s: Setup) -> str:
    folder = s.copy_model("corrupt")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return str(folder)


def _pickle_only(s: Setup) -> str:
    folder = s.copy_model("pickled")
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    return str(folder)


def _nan_model(s: Setup) -> str:
    from safetensors.torch import load_file, save_file

    folder = s.copy_model("nan")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state = {k: (torch.full_like(v, NAN) if k.startswith("conv_out") else v) for k, v in state.items()}
    save_file(state, str(weights))
    return str(folder)


def _factor_8(s: Setup) -> str:
    from multifusion.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(s.tmp / "factor8", seed=5, vae_factor=8))


def _non_image(s: Setup) -> str:
    path = s.tmp / "notes.png"
    path.write_text("not an image")
    return str(path)


# (id, field the message must name, case(setup) -> CLI argv)
CLI_CASES = [
    # --- recipe files
    ("recipe-not-utf8", "not UTF-8", lambda s: s.validate(b"method: single\nprompt: caf\xe9\n")),
    ("recipe-bad-yaml", "not valid YAML", lambda s: s.validate("models: [unclosed\n")),
    ("recipe-bad-json", "not valid JSON", lambda s: s.validate("{models:", name="r.json")),
    ("recipe-not-mapping", "mapping at top level", lambda s: s.validate("- a\n- b\n")),
    ("recipe-missing", "does not exist", lambda s: ["validate", str(s.tmp / "gone.yaml")]),
    ("yaml-alias-bomb", "nested YAML aliases", lambda s: s.validate(BOMB)),
    (
        "invalid-unicode-prompt",
        "models[0].prompt",
        lambda s: s.validate('{"models": [{"model": "zoo:x", "prompt": "\\ud800"}]}', name="r.json"),
    ),
    ("invalid-unicode-negative", "negative_prompt", lambda s: s.generate(s.recipe(negative_prompt="\udc80"), name="r.json")),
    ("unknown-top-field", "sampler", lambda s: s.validate(s.recipe(sampler="ddim"))),
    ("version-2", "version", lambda s: s.validate(s.recipe(version=2))),
    ("no-models", "models", lambda s: s.validate(s.recipe(models=[]))),
    ("unknown-method", "method", lambda s: s.validate(s.recipe(method="avrage"))),
    ("unknown-param", "params.wieghts", lambda s: s.validate(s.recipe(method="average", params={"wieghts": [1]}))),
    ("missing-prompt", "models[0]", lambda s: s.validate(s.recipe(models=[{"model": s.a}]))),
    ("prompt-list-length", "models[0].prompt", lambda s: s.validate(s.recipe(models=[{"model": s.a, "prompt": ["x", "y"]}]))),
    ("unknown-zoo-model", "models[0].model", lambda s: s.validate(s.recipe(models=[{"model": "zoo:nope", "prompt": "x"}]))),
    (
        "duplicate-model-names",
        "models[1].name",
        lambda s: s.validate(
            s.recipe(
                method="average", models=[{"model": s.a, "name": "m", "prompt": "x"}, {"model": s.b, "name": "m", "prompt": "y"}]
            )
        ),
    ),
    (
        "name-clashes-with-model",
        "models[1].name",
        lambda s: s.validate(
            s.recipe(method="average", models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "name": s.a, "prompt": "y"}])
        ),
    ),
    # --- non-finite and out-of-range numbers
    (
        "yaml-nan-cfg",
        "sampling.guidance_scale",
        lambda s: s.generate("models: [{model: M, prompt: x}]\nsampling: {guidance_scale: .nan}\n".replace("M", s.a)),
    ),
    (
        "yaml-inf-eta",
        "sampling.eta",
        lambda s: s.generate("models: [{model: M, prompt: x}]\nsampling: {eta: .inf}\n".replace("M", s.a)),
    ),
    ("cli-cfg-1e30", "sampling.guidance_scale", lambda s: s.generate(s.recipe(), "--cfg", "1e30")),
    ("cli-cfg-nan", "sampling.guidance_scale", lambda s: s.generate(s.recipe(), "--cfg", "nan")),
    ("cli-cfg-negative", "sampling.guidance_scale", lambda s: s.generate(s.recipe(), "--cfg", "-1")),
    ("cli-eta-inf", "sampling.eta", lambda s: s.generate(s.recipe(), "--eta", "inf")),
    ("cli-eta-2", "sampling.eta", lambda s: s.generate(s.recipe(), "--eta", "2")),
    (
        "model-cfg-nan",
        "models[0].guidance_scale",
        lambda s: s.generate(s.recipe(models=[{"model": s.a, "prompt": "x", "guidance_scale": NAN}]), name="r.json"),
    ),
    (
        "model-cfg-1000",
        "models[0].guidance_scale",
        lambda s: s.validate(s.recipe(models=[{"model": s.a, "prompt": "x", "guidance_scale": 1000}])),
    ),
    (
        "average-weight-nan",
        "params.weights",
        lambda s: s.generate(
            s.recipe(
                method="average",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                params={"weights": [NAN, 1.0]},
            )
        ),
    ),
    (
        "average-weight-inf",
        "params.weights",
        lambda s: s.generate(
            s.recipe(
                method="average",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                params={"weights": [INF, 1.0]},
            )
        ),
    ),
    (
        "average-weights-overflow",
        "params.weights",
        lambda s: s.generate(
            s.recipe(
                method="average",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                params={"weights": [1e308, 1e308]},
            )
        ),
    ),
    (
        "snb-k-nan",
        "params.k",
        lambda s: s.generate(
            s.recipe(method="snb", models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}], params={"k": NAN})
        ),
    ),
    (
        "snb-temperature-inf",
        "params.temperature",
        lambda s: s.generate(
            s.recipe(
                method="snb", models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}], params={"temperature": INF}
            )
        ),
    ),
    (
        "snb-window-nan",
        "params.window",
        lambda s: s.generate(
            s.recipe(
                method="snb", models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}], params={"window": [0.0, NAN]}
            )
        ),
    ),
    (
        "snb-blur-sigma-inf",
        "params.blur_sigma",
        lambda s: s.generate(
            s.recipe(
                method="snb",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                params={"blur": "gaussian", "blur_sigma": INF},
            )
        ),
    ),
    (
        "amdm-w-nan",
        "params.w",
        lambda s: s.generate(
            s.recipe(method="amdm", models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}], params={"w": NAN})
        ),
    ),
    (
        "amdm-correction-inf",
        "params.correction",
        lambda s: s.generate(
            s.recipe(
                method="amdm",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                params={"correction": INF, "correction_mode": "absolute"},
            )
        ),
    ),
    (
        "amdm-window-inf",
        "params.window",
        lambda s: s.generate(
            s.recipe(
                method="amdm",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b, "prompt": "y"}],
                params={"window": [0.0, INF]},
            )
        ),
    ),
    (
        "merge-alpha-nan",
        "params.alpha",
        lambda s: s.generate(
            s.recipe(
                method="merge",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b}, {"model": s.a}],
                params={"merge_method": "add_difference", "alpha": NAN},
            )
        ),
    ),
    (
        "mbw-blocks-string-nan",
        "params.blocks",
        lambda s: s.generate(
            s.recipe(
                method="mbw",
                models=[{"model": s.a, "prompt": "x"}, {"model": s.b}, {"model": s.a}],
                params={"merge_method": "add_difference", "blocks": ",".join(["0.5"] * 12 + ["nan"] + ["0.5"] * 12)},
            )
        ),
    ),
    (
        "recipe-merge-blocks-inf",
        "merges.m",
        lambda s: s.generate(
            s.recipe(
                models=[{"model": "merge:m", "prompt": "x"}],
                merges={"m": {"models": [s.a, s.b], "blocks": ",".join(["0.5"] * 24 + ["inf"])}},
            )
        ),
    ),
    ("mod-mask-weight-nan", "params.regions[0].mask_weight", lambda s: s.generate(s.mod(regions=[_region(mask_weight=NAN)]))),
    ("mod-row-end-inf", "params.regions[0].row_end", lambda s: s.generate(s.mod(regions=[_region(row_end=INF)]))),
    (
        "mod-region-cfg-inf",
        "params.regions[0].guidance_scale",
        lambda s: s.generate(s.mod(regions=[_region(guidance_scale=INF)])),
    ),
    (
        "mod-background-weight-inf",
        "params.background.mask_weight",
        lambda s: s.generate(s.mod(background={"prompt": "y", "mask_weight": INF})),
    ),
    (
        "mod-strength-nan",
        "params.image_regions[0].strength",
        lambda s: s.generate(s.mod(image_regions=[_image_region(s.png("ref.png", None), strength=NAN)])),
    ),
    (
        "mod-reroll-eps-inf",
        "params.rerolls[0].eps",
        lambda s: s.generate(
            s.mod(rerolls=[{"row_init": 0, "row_end": 8, "col_init": 0, "col_end": 8, "mode": "epsilon", "eps": INF}])
        ),
    ),
    ("error-echo-capped", "sampling.seed", lambda s: s.validate(s.recipe(sampling={"seed": "9" * 200_000}), name="r.json")),
    # --- counts, seeds, sizes
    ("steps-0", "sampling.num_inference_steps", lambda s: s.generate(s.recipe(), "--steps", "0")),
    ("num-images-0", "sampling.num_images", lambda s: s.generate(s.recipe(), "--num-images", "0")),
    ("seed-negative", "sampling.seed", lambda s: s.generate(s.recipe(), "--seed", "-1")),
    ("seed-near-2^63", "sampling.seed", lambda s: s.generate(s.recipe(), "--seed", str(2**63 - 1), "--num-images", "2")),
    ("batch-size-minus-1", "--batch-size", lambda s: s.generate(s.recipe(), "--batch-size", "-1")),
    ("batch-size-0", "--batch-size", lambda s: s.generate(s.recipe(), "--batch-size", "0")),
    ("height-0", "sampling.height", lambda s: s.generate(s.recipe(), "--height", "0")),
    ("height-off-grid", "sampling.height", lambda s: s.generate(s.recipe(), "--height", "30")),
    ("canvas-100000-validate", "runtime.max_pixels", lambda s: s.validate(s.recipe(), "--height", "100000", "--width", "100000")),
    ("canvas-100000-generate", "sampling.height", lambda s: s.generate(s.recipe(), "--height", "100000", "--width", "100000")),
    (
        "tiles-canvas-huge",
        "params.tiles",
        lambda s: s.validate(
            s.recipe(
                method="mod",
                models=[{"model": s.a}],
                sampling={"height": None, "width": None},
                params={"tiles": {"prompts": [["x"] * 100] * 100, "tile_height": 64, "tile_width": 64}},
            )
        ),
    ),
    # --- --from-image
    ("from-image-missing", "--from-image", lambda s: ["generate", "--from-image", str(s.tmp / "gone.png"), "--out", str(s.out)]),
    ("from-image-not-an-image", "--from-image", lambda s: ["generate", "--from-image", _non_image(s), "--out", str(s.out)]),
    ("from-image-no-metadata", "--from-image", lambda s: s.from_image(None)),
    ("from-image-not-json", "--from-image", lambda s: s.from_image("{recipe: oops")),
    ("from-image-no-recipe", "--from-image", lambda s: s.from_image(json.dumps({"seed": 0}))),
    ("from-image-a-list", "--from-image", lambda s: s.from_image(json.dumps([1, 2]))),
    ("from-image-recipe-a-list", "--from-image", lambda s: s.from_image(json.dumps({"recipe": ["models"]}))),
    (
        "from-image-allow-pickle-ignored",
        "models[0].model",
        lambda s: s.from_image(
            json.dumps(
                {"recipe": {**s.recipe(models=[{"model": _pickle_only(s), "prompt": "x"}]), "runtime": {"allow_pickle": True}}}
            )
        ),
    ),
    (
        "from-image-ckpt-ignored",
        "models[0].model",
        lambda s: s.from_image(
            json.dumps(
                {
                    "recipe": {
                        **s.recipe(models=[{"model": s.write("x", "m.ckpt"), "prompt": "x"}]),
                        "runtime": {"allow_pickle": True},
                    }
                }
            )
        ),
    ),
    ("from-image-bad-name", "--name", lambda s: s.from_image(json.dumps({"recipe": s.recipe()}), "--name", "../escape")),
    # --- output names and folders
    ("name-dotdot", "--name", lambda s: s.generate(s.recipe(), "--name", "../x")),
    ("name-absolute", "--name", lambda s: s.generate(s.recipe(), "--name", str(s.tmp / "abs"))),
    ("name-subfolder", "--name", lambda s: s.generate(s.recipe(), "--name", "sub/x")),
    ("name-empty", "--name", lambda s: s.generate(s.recipe(), "--name", "")),
    ("out-is-a-file", "out", lambda s: ["generate", s.write(s.recipe()), "--out", s.write("x", "file.txt")]),
    (
        "out-under-a-file",
        "out",
        lambda s: ["generate", s.write(s.recipe()), "--out", str(Path(s.write("x", "file.txt")) / "sub")],
    ),
    ("out-image-name-is-a-folder", "out", lambda s: (s.out.joinpath("r-s0.png").mkdir(parents=True), s.generate(s.recipe()))[1]),
    ("out-not-writable", "out", lambda s: ["generate", s.write(s.recipe()), "--out", "/sys/multifusion-test/out"]),
    # --- images named by a recipe
    (
        "image-region-missing",
        "params.image_regions[0].image",
        lambda s: s.validate(s.mod(image_regions=[_image_region(str(s.tmp / "gone.png"))])),
    ),
    (
        "image-region-not-an-image",
        "params.image_regions[0].image",
        lambda s: s.generate(s.mod(image_regions=[_image_region(_non_image(s))])),
    ),
    # --- devices, schedulers, models
    ("device-cuda-without-cuda", "runtime.device", lambda s: s.generate(s.recipe(), "--device", "cuda")),
    ("device-cuda-7", "runtime.device", lambda s: s.generate(s.recipe(), "--device", "cuda:7")),
    ("device-unknown", "runtime.device", lambda s: s.generate(s.recipe(), "--device", "tpu")),
    ("vae-device-cuda", "runtime.vae_device", lambda s: s.generate(s.recipe(), "--vae-device", "cuda")),
    ("scheduler-mixin", "sampling.scheduler", lambda s: s.generate(s.recipe(), "--scheduler", "SchedulerMixin")),
    (
        "scheduler-flow-match",
        "sampling.scheduler",
        lambda s: s.generate(s.recipe(), "--scheduler", "FlowMatchEulerDiscreteScheduler"),
    ),
    ("scheduler-inverse", "sampling.scheduler", lambda s: s.generate(s.recipe(), "--scheduler", "DDIMInverseScheduler")),
    ("scheduler-typo", "sampling.scheduler", lambda s: s.generate(s.recipe(), "--scheduler", "eulr")),
    (
        "scheduler-pndm-2-steps",
        "sampling.num_inference_steps",
        lambda s: s.generate(s.recipe(), "--scheduler", "pndm", "--steps", "2"),
    ),
    (
        "scheduler-lcm-100-steps",
        "sampling.num_inference_steps",
        lambda s: s.generate(s.recipe(), "--scheduler", "LCMScheduler", "--steps", "100"),
    ),
    (
        "corrupt-safetensors-folder",
        "models[0].model",
        lambda s: s.generate(s.recipe(models=[{"model": _truncated_safetensors(s), "prompt": "x"}])),
    ),
    (
        "corrupt-safetensors-file",
        "models[0].model",
        lambda s: s.generate(s.recipe(models=[{"model": s.write(b"\x00" * 64, "m.safetensors"), "prompt": "x", "config": s.a}])),
    ),
    (
        "pickle-file-refused",
        "models[0].model",
        lambda s: s.generate(s.recipe(models=[{"model": s.write("x", "m.ckpt"), "prompt": "x"}])),
    ),
    ("pickle-folder-refused", "allow_pickle", lambda s: s.generate(s.recipe(models=[{"model": _pickle_only(s), "prompt": "x"}]))),
    (
        "latent-channels-differ",
        "models[1].model",
        lambda s: s.validate(
            s.recipe(method="average", models=[{"model": s.a, "prompt": "x"}, {"model": str(s.tiny_dir / "wide"), "prompt": "y"}])
        ),
    ),
    (
        "vae-factor-differs",
        "models[1].model",
        lambda s: s.validate(
            s.recipe(method="average", models=[{"model": s.a, "prompt": "x"}, {"model": _factor_8(s), "prompt": "y"}])
        ),
    ),
    ("region-model-unknown", "params.regions[0].model", lambda s: s.generate(s.mod(regions=[_region(model="nobody")]))),
    ("dtype-unknown", "runtime.dtype", lambda s: s.validate(s.recipe(runtime={"dtype": "float8"}))),
    ("non-finite-latents", "sampling step 1", lambda s: s.generate(s.recipe(models=[{"model": _nan_model(s), "prompt": "x"}]))),
    # --- other commands writing into --out
    ("demo-out-is-a-file", "--out", lambda s: ["demo", "--tiny", "--out", s.write("x", "file.txt"), "--no-progress"]),
    (
        "merge-out-under-a-file",
        "--out",
        lambda s: [
            "merge",
            s.write(s.recipe(method="merge", models=[{"model": s.a, "prompt": "x"}, {"model": s.b}])),
            "--out",
            str(Path(s.write("x", "file.txt")) / "merged"),
        ],
    ),
    (
        "afa-train-out-is-a-file",
        "--out",
        lambda s: ["afa", "train", s.a, s.b, "--data", "shapeworld:general", "--out", s.write("x", "file.txt")],
    ),
    (
        "mbw-search-out-is-a-file",
        "--out",
        lambda s: ["mbw-search", "fine-grained", "--out", s.write("x", "file.txt"), "--no-progress"],
    ),
    ("zoo-train-out-is-a-file", "--out", lambda s: ["zoo", "train", "--out", s.write("x", "file.txt"), "--no-progress"]),
    # --- bench: refused before the judge or any model loads
    ("bench-cfg-nan", "guidance_scale", lambda s: s.bench("--cfg", "nan")),
    ("bench-cfg-1e30", "guidance_scale", lambda s: s.bench("--cfg", "1e30")),
    ("bench-batch-size-minus-1", "batch_size", lambda s: s.bench("--batch-size", "-1")),
    ("bench-scheduler-flow-match", "sampling.scheduler", lambda s: s.bench("--scheduler", "FlowMatchEulerDiscreteScheduler")),
    ("bench-device-cuda", "device", lambda s: s.bench("--device", "cuda")),
    (
        "bench-out-is-a-file",
        "out",
        lambda s: [
            "bench",
            "fine-grained",
            "--out",
            s.write("x", "file.txt"),
            "--model",
            f"general={s.a}",
            "--model",
            f"expert={s.b}",
            "--no-progress",
        ],
    ),
]

# Messages that must also say something specific (beyond naming the field).
ALSO = {
    "yaml-alias-bomb": "refused rather than expanded",
    "corrupt-safetensors-folder": "corrupt",
    "corrupt-safetensors-file": "corrupt",
    "from-image-allow-pickle-ignored": "allow_pickle",
    "from-image-ckpt-ignored": "pickle",
    "non-finite-latents": "No image was written",
    "canvas-100000-validate": "GiB",
    "seed-near-2^63": "2^63",
}
NOT = {  # and must not say
    "corrupt-safetensors-folder": "allow_pickle",
    "corrupt-safetensors-file": "allow_pickle",
}


@pytest.fixture
def setup(tmp_path, tiny_dir) -> Setup:
    return Setup(tmp_path, tiny_dir)


def _written(root: Path, before: set[Path]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p not in before)


@pytest.mark.parametrize("case_id, field, make", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_with_the_field_and_writes_nothing(setup, case_id, field, make, capsys):
    if case_id.startswith(("device-cuda", "vae-device-cuda", "bench-device-cuda")) and CUDA:
        pytest.skip("this machine has CUDA")
    if case_id == "out-not-writable" and Path("/sys").is_dir() and _writable("/sys"):
        pytest.skip("/sys is writable here")
    argv = make(setup)
    before = {p for p in setup.tmp.rglob("*") if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert field in err, err
    assert "Traceback" not in err
    assert len(err) < 10_000  # never pages of echoed input
    if case_id in ALSO:
        assert ALSO[case_id] in err, err
    if case_id in NOT:
        assert NOT[case_id] not in err, err
    assert _written(setup.tmp, before) == []
    assert not setup.out.exists() or all(p.is_dir() for p in setup.out.iterdir())


def _writable(folder: str) -> bool:
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- the Python API


def _api_cases():
    import multifusion as mf

    def two(s):
        return [s.a, s.b]

    kw = dict(num_inference_steps=2, height=32, width=32, progress=False)
    return [
        ("api-average-weight-nan", "params.weights", lambda s: mf.average(two(s), ["x", "y"], weights=[NAN, 1.0], **kw)),
        ("api-guidance-inf", "models[0].guidance_scale", lambda s: mf.single(s.a, "x", guidance_scale=INF, **kw)),
        ("api-guidance-1e30", "models[0].guidance_scale", lambda s: mf.single(s.a, "x", guidance_scale=1e30, **kw)),
        ("api-eta-inf", "sampling.eta", lambda s: mf.single(s.a, "x", eta=INF, **kw)),
        ("api-snb-k-inf", "params.k", lambda s: mf.snb(two(s), ["x", "y"], k=[1.0, INF], **kw)),
        ("api-amdm-w-nan", "params.w", lambda s: mf.amdm(two(s), ["x", "y"], w=NAN, **kw)),
        ("api-batch-size-0", "batch_size", lambda s: mf.single(s.a, "x", batch_size=0, **kw)),
        (
            "api-batch-size-minus-1",
            "batch_size",
            lambda s: mf.generate_to_folder({"models": [{"model": s.a, "prompt": "x"}]}, s.out, batch_size=-1),
        ),
        (
            "api-stem-escapes",
            "stem",
            lambda s: mf.generate_to_folder({"models": [{"model": s.a, "prompt": "x"}]}, s.out, stem="../x"),
        ),
        ("api-invalid-unicode", "models[0].prompt", lambda s: mf.single(s.a, "bad \udcff", **kw)),
        ("api-seed-overflow", "sampling.seed", lambda s: mf.single(s.a, "x", seed=2**63 - 1, num_images=3, **kw)),
        (
            "api-seeds-out-of-range",
            "seeds",
            lambda s: mf.run({"models": [{"model": s.a, "prompt": "x"}]}, seeds=[2**64], progress=False),
        ),
        ("api-max-pixels", "runtime.max_pixels", lambda s: mf.single(s.a, "x", **{**kw, "height": 8192, "width": 8192})),
        ("api-runtime-device", "runtime.device", lambda s: mf.single(s.a, "x", runtime={"device": "cuda:99"}, **kw)),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("case_id, field, call", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_with_the_library_error(setup, case_id, field, call):
    if case_id == "api-runtime-device" and CUDA and torch.cuda.device_count() > 99:
        pytest.skip("implausible")
    with pytest.raises(MultifusionError) as info:
        call(setup)
    assert field in str(info.value)
    assert not setup.out.exists()


def test_max_pixels_can_be_raised_on_purpose(setup):
    from multifusion.recipe import parse_recipe
    from multifusion.validate import validate

    big = setup.recipe(sampling={"height": 8192, "width": 8192})
    with pytest.raises(MultifusionError, match="runtime.max_pixels"):
        parse_recipe(big)
    validate(parse_recipe({**big, "runtime": {"max_pixels": 8192 * 8192}}))
    # unset, it stays out of the recipe JSON, so images made before the limit existed still resume
    assert "max_pixels" not in parse_recipe(setup.recipe()).to_json()


def test_every_refused_scheduler_exists_in_diffusers_and_every_allowed_one_samples(tiny_a):
    """The allow-list is a decision, checked both ways: refused names are real diffusers classes
    (so the refusal is not an 'unknown name'), and each allowed installed one runs four steps."""
    import diffusers

    import multifusion as mf
    from multifusion.errors import RecipeError
    from multifusion.schedulers import SAMPLING_SCHEDULERS, scheduler_class

    for name in ("FlowMatchHeunDiscreteScheduler", "DDIMInverseScheduler", "ScoreSdeVeScheduler", "VQDiffusionScheduler"):
        assert hasattr(diffusers, name)
        with pytest.raises(RecipeError, match="not a sampler for these models"):
            scheduler_class(name)
    handle = mf.load_models([tiny_a])[0]
    for name in ("flow_euler", "FlowMatchEulerDiscreteScheduler"):  # samples flow-matching models only
        with pytest.raises(RecipeError, match="samples flow-matching models.*DDPM noise schedule"):
            mf.single(handle, "x", num_inference_steps=4, scheduler=name, height=32, width=32, progress=False)
    # Every allowed scheduler runs: DPMSolverSDEScheduler needs torchsde, part of the `test`
    # extra, so a missing package fails here rather than skipping that scheduler unseen.
    for name in sorted(SAMPLING_SCHEDULERS):
        latents = mf.single(handle, "x", num_inference_steps=4, scheduler=name, height=32, width=32, progress=False).latents
        assert torch.isfinite(latents).all(), name


def test_a_scheduler_whose_package_is_missing_says_what_to_install(monkeypatch):
    """Without torchsde, diffusers exports a placeholder for DPMSolverSDEScheduler; choosing it
    is refused naming the package (put here in place of the real class)."""
    import diffusers
    from diffusers.utils import dummy_torch_and_torchsde_objects as placeholders

    from multifusion.errors import RecipeError
    from multifusion.schedulers import scheduler_class

    monkeypatch.setattr(diffusers, "DPMSolverSDEScheduler", placeholders.DPMSolverSDEScheduler)
    with pytest.raises(RecipeError, match=r"DPMSolverSDEScheduler needs a package that is not installed .*pip install torchsde"):
        scheduler_class("DPMSolverSDEScheduler")


def test_non_finite_latents_stop_sampling_at_the_step(setup):
    import multifusion as mf

    with pytest.raises(SamplingError, match=r"sampling step 1 of 2 .*noise prediction"):
        mf.single(_nan_model(setup), "x", num_inference_steps=2, height=32, width=32, progress=False)


def test_the_loop_names_the_step_where_a_meeting_breaks_the_latents():
    from diffusers import DDIMScheduler

    from multifusion.loop import Trajectory, sample

    def meet(step):
        return [x * (INF if step.step == 2 else 1.0) for x in step.latents]

    tr = Trajectory(lambda x, t, record=None: torch.zeros_like(x), DDIMScheduler(), torch.randn(1, 4, 4, 4))
    with pytest.raises(SamplingError, match=r"sampling step 3 of 4 .*the scheduler step or the meeting"):
        sample([tr], num_inference_steps=4, meet=meet, progress=False)


# ----------------------------------------------------------------------------- trust and resume


def test_from_image_takes_the_picture_not_the_runtime(setup, capsys):
    """An image's recipe asking for pickles, another device or a huge canvas limit does not get
    them: only the fields in FROM_IMAGE_FIELDS are taken, and the user is told."""
    from multifusion.provenance import FROM_IMAGE_FIELDS

    assert "runtime" not in FROM_IMAGE_FIELDS
    meta = {"recipe": {**setup.recipe(), "runtime": {"allow_pickle": True, "max_pixels": 10**12, "device": "cpu"}}, "seed": 0}
    assert main(setup.from_image(json.dumps(meta))) == 0
    err = capsys.readouterr().err
    assert "ignores the image's runtime settings (allow_pickle, max_pixels)" in err
    written = list(setup.out.iterdir())
    assert [p.name for p in written] == ["given-s0.png"]
    from multifusion.io import read_png_metadata

    runtime = read_png_metadata(written[0])["recipe"]["runtime"]
    assert runtime["allow_pickle"] is False and "max_pixels" not in runtime  # the default


def test_resume_redoes_a_damaged_image_and_keeps_whole_ones(setup):
    argv = setup.generate(setup.recipe(sampling={"num_images": 3}), "--batch-size", "1")
    assert main(argv) == 0
    files = sorted(setup.out.iterdir())
    reference = {p.name: p.read_bytes() for p in files}
    damaged = files[1]
    damaged.write_bytes(reference[damaged.name][: len(reference[damaged.name]) - 40])  # metadata intact, pixels cut
    garbage = files[2]
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    stamp = files[0].stat().st_mtime_ns
    assert main(argv) == 0
    assert files[0].stat().st_mtime_ns == stamp  # whole: kept, not redone
    assert {p.name: p.read_bytes() for p in sorted(setup.out.iterdir())} == reference


def test_resume_still_refuses_a_whole_image_of_another_recipe(setup, capsys):
    setup.out.mkdir()
    Image.new("RGB", (8, 8)).save(setup.out / "r-s0.png")  # someone's own picture under our name
    assert main(setup.generate(setup.recipe())) == 2
    assert "different recipe" in capsys.readouterr().err


def test_seed_at_the_top_of_the_range_reads_back(setup):
    from multifusion.io import read_png_metadata

    top = 2**63 - 2
    assert main(setup.generate(setup.recipe(), "--seed", str(top), "--num-images", "2")) == 0
    for seed in (top, top + 1):
        path = setup.out / f"r-s{seed}.png"
        assert read_png_metadata(path)["recipe"]["sampling"]["seed"] == seed
        assert main(["generate", "--from-image", str(path), "--out", str(setup.tmp / "again"), "--no-progress"]) == 0


def test_yaml_nan_is_an_error_not_the_default(setup):
    """Before: `.nan` went through pydantic's JSON dump as null and came back as the default."""
    from multifusion.errors import RecipeError
    from multifusion.recipe import parse_recipe

    path = setup.write(f"models: [{{model: {setup.a}, prompt: x}}]\nsampling: {{guidance_scale: .nan}}\n")
    with pytest.raises(RecipeError, match="sampling.guidance_scale: Input should be a finite number"):
        parse_recipe(path)
    assert math.isnan(yaml.safe_load(Path(path).read_text())["sampling"]["guidance_scale"])


def test_no_source_file_loads_pickles_by_default():
    """Every from_pretrained that reads weights we did not just write asks for safetensors, and
    nothing unpickles (the training checkpoints' own test covers torch.load)."""
    src = Path(__file__).parents[2] / "src" / "multifusion"
    offenders = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if "weights_only=False" in p.read_text() or "pickle.load" in p.read_text() or "torch.load(" in p.read_text()
    ]
    assert offenders == []


def test_bad_input_suite_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 60
    assert len({c[0] for c in CLI_CASES + API_CASES}) == len(CLI_CASES) + len(API_CASES)
