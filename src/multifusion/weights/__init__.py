"""Models meet in their weights, before sampling: weighted sum, add-difference and
merge-block-weighted, the static baselines of the AFA paper (arXiv 2405.17082) and what the
A1111 / SuperMerger / sd-mecha merging tools compute. See docs/merges.md.

- block ids (A1111's IN.., M00, OUT.. of a UNet; FLUX's and SD3's) are the families' own:
  `multifusion.families.blocks` and each family's `block_layout`
- `presets`: weight strings and the community's named presets
- `registry`: `@merge_method`, the registered merge methods (a method's signature is its contract)
- `merge`: the pure tensor maths (weighted sum, add-difference, TIES, DARE, Model Stock, SLERP,
  geometric median)
- `models`: whole-model merges (of models or of other merges: `Merge`, `merge_tree`), streamed
  to a diffusers folder or loaded in memory
- `methods`: the registered methods `merge` and `mbw` (merged in memory, sampled as `single`)
- `export`: `merge(recipe, out)`, the merged model of a merge/mbw recipe written to a folder
  (and `--single-file` in the family's original layout); it reads recipes and the registry, so
  the package does not import it
- `search`: automatic block-weight search (auto-MBW) against a score, for any method with a ratio
- `lora`: LoRA files read, a fine-tune extracted as a LoRA (truncated SVD), a LoRA merged into a
  checkpoint with block weights
"""

from multifusion.families.blocks import BlockLayout, layout_table, unet_layout
from multifusion.weights.merge import add_difference, block_weighted, merge_tensor, weighted_sum
from multifusion.weights.models import Merge, MergePlan, MergeSpec, merge_in_memory, merge_models, merge_tree, plan_merge
from multifusion.weights.presets import PRESET_NAMES, BlockWeights, block_weights, parse_block_weights, preset, resample
from multifusion.weights.registry import MERGE_METHODS, get_merge_method, merge_method

__all__ = [
    "BlockLayout",
    "BlockWeights",
    "MERGE_METHODS",
    "Merge",
    "MergePlan",
    "MergeSpec",
    "PRESET_NAMES",
    "add_difference",
    "block_weighted",
    "block_weights",
    "get_merge_method",
    "layout_table",
    "merge_in_memory",
    "merge_method",
    "merge_models",
    "merge_tree",
    "merge_tensor",
    "parse_block_weights",
    "plan_merge",
    "preset",
    "resample",
    "unet_layout",
    "weighted_sum",
]
