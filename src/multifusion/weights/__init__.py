"""Models meet in their weights, before sampling: weighted sum, add-difference and
merge-block-weighted, the static baselines of the AFA paper (arXiv 2405.17082) and what the
A1111 / SuperMerger / sd-mecha merging tools compute. See docs/merges.md.

- `blocks`: A1111 block ids (IN.., M00, OUT..) derived from a UNet's config
- `presets`: weight strings and the community's named presets
- `merge`: the pure tensor maths
- `models`: whole-model merges, streamed to a diffusers folder or loaded in memory
- `methods`: the registered methods `merge` and `mbw` (merged in memory, sampled as `single`)
- `export`: `merge(recipe, out)`, the merged model of a merge/mbw recipe written to a folder
- `search`: automatic block-weight search (auto-MBW) against a score
- `ldm`: the original SD-1.x single-file key layout (`merge --single-file`)
"""

from multifusion.weights.blocks import BlockLayout, layout_table, unet_layout
from multifusion.weights.merge import add_difference, block_weighted, merge_tensor, weighted_sum
from multifusion.weights.models import MergePlan, MergeSpec, merge_in_memory, merge_models, plan_merge
from multifusion.weights.presets import PRESET_NAMES, BlockWeights, block_weights, parse_block_weights, preset, resample

# Last: the function `merge` takes the package attribute that the submodule `merge` (the maths)
# would otherwise hold; import the maths as `from multifusion.weights.merge import ...`.
from multifusion.weights.export import merge, recipe_merge  # noqa: E402

__all__ = [
    "BlockLayout", "BlockWeights", "MergePlan", "MergeSpec", "PRESET_NAMES", "add_difference", "block_weighted",
    "block_weights", "layout_table", "merge", "merge_in_memory", "merge_models", "merge_tensor", "parse_block_weights",
    "plan_merge", "preset", "recipe_merge", "resample", "unet_layout", "weighted_sum",
]
