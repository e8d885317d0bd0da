"""The SDXL recipes of docs/sdxl.md validate (structure, method parameters, block weights against
an SDXL-shaped UNet), with the documented model paths mapped to tiny SDXL folders."""

import re
from pathlib import Path

import pytest
import yaml

from multifusion.recipe import parse_recipe
from multifusion.validate import validate

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdxl.md"


def _recipes():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return [yaml.safe_load(b) for b in blocks if "method:" in b]


def test_every_method_has_a_recipe():
    assert sorted({r["method"] for r in _recipes()}) == ["afa", "amdm", "average", "mbw", "merge", "mod", "single", "snb"]


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda r: r["method"])
def test_the_documented_recipe_validates(recipe, tiny_sdxl_dir, tmp_path):
    from multifusion.testing import build_tiny_sdxl_pipeline

    if recipe["method"] == "mbw":  # 20 block weights: an SDXL-shaped UNet (3 levels, 2 layers)
        folders = [str(build_tiny_sdxl_pipeline(tmp_path / k, seed=i, levels=3, layers_per_block=2)) for i, k in enumerate("xy")]
    else:
        folders = [str(tiny_sdxl_dir / k) for k in "abc"]
    models = [
        {k: v for k, v in m.items() if k not in ("config", "vae")} | {"model": folders[i]} for i, m in enumerate(recipe["models"])
    ]
    recipe = {**recipe, "models": models, "runtime": {}}
    if recipe["method"] == "afa":
        recipe["params"] = {"aggregator": str(tmp_path)}
        (tmp_path / "config.json").write_text("{}")  # validation checks the folder holds aggregators
    sampling = {"height": 32, "width": 32}
    if recipe["method"] == "mod":  # the documented canvas, scaled to the tiny models
        tiles = recipe["params"]["tiles"]
        recipe["params"] = {**recipe["params"], "tiles": {**tiles, "tile_height": 32, "tile_width": 32, "tile_col_overlap": 8}}
        sampling = {}
    validate(parse_recipe({**recipe, "sampling": sampling}))
