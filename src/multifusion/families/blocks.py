"""Block ids of a diffusers UNet in the A1111 merge-block-weighted (MBW) notation.

The notation comes from the original latent-diffusion UNet (CompVis `openaimodel.py`), whose
parameters live in `input_blocks.{k}`, `middle_block` and `output_blocks.{k}`. The
merge-block-weighted extension (bbc-mc/sdweb-merge-block-weighted-gui,
`scripts/mbw/merge_block_weighted.py`) and SuperMerger (hako-mikan/sd-webui-supermerger) give
one weight per such block: for SD-1.x/2.x, 25 values `IN00..IN11, M00, OUT00..OUT11`, or 26
with a leading `BASE`; for SDXL, 20 (`BASE, IN00..IN08, M00, OUT00..OUT08`). The AFA paper
("Ensembling Diffusion Models via Adaptive Feature Aggregation", arXiv 2405.17082) uses these
static merges as its baselines.

Here the ids are derived from the UNet's config, so the same rule serves any number of levels.
Walking the levels the way the LDM UNet lays out `input_blocks`:

    IN00                      conv_in (with the time and other conditioning embeddings)
    then, for level i:        one id per layer j: down_blocks.i.resnets.j (+ attentions.j)
                              one id for down_blocks.i.downsamplers, except at the last level
    M00                       mid_block
    then, for up level i:     one id per layer j (layers_per_block + 1 of them):
                              up_blocks.i.resnets.j (+ attentions.j); the level's last layer
                              also holds up_blocks.i.upsamplers, except at the last level
                              (the last OUT id also holds conv_norm_out and conv_out)

so with L levels and `layers_per_block` = n there are L*n + L IN ids and as many OUT ids.
SD-1.5 (4 levels, n = 2) gives the 25 ids of A1111 exactly; SDXL (3 levels, n = 2) its 20
(with BASE); the zoo's UNet (3 levels, n = 1) gives IN00..IN05, M00, OUT00..OUT05; the tiny
test UNet (2 levels, n = 1) IN00..IN03, M00, OUT00..OUT03.

Where the non-block UNet parameters go follows the MBW merge loop (and SuperMerger's): the
time embedding is weighed with IN00 ("before input blocks"), the final norm and conv_out with
the last OUT id ("after output blocks"). BASE weighs what lies outside the UNet: the text
encoder(s). Deviation from sd-mecha (`convert_sd1_blocks.py`), which puts the time embedding
under BASE: we keep the MBW loop's choice, under which the community presets were tuned and a
25-value string alone fixes every UNet parameter.

The flow-matching transformers have no IN/M00/OUT halves; their ids follow the blocks they run
in order (`flux_layout`, `sd3_layout`). FLUX uses SuperMerger's FLUX notation (`BLOCKIDFLUX` in
hako-mikan/sd-webui-supermerger: `CLIP, T5, IN, D00..D18, S00..S37, OUT`, 61 values for FLUX.1
dev), with its key rule in diffusers' names: IN the input embedders (BFL's `img_in`, `txt_in`,
`time_in`, `vector_in`, `guidance_in`), Dnn the double-stream block nn, Snn the single-stream
block nn, OUT the final layer; CLIP and T5 are its text encoders' leading weights. SD3 has no
SuperMerger notation; its ids group its modules as ComfyUI's `ModelMergeSD3_2B` node does (the
embedders, `joint_blocks.i`, `final_layer`), named in the FLUX style: IN, J00.., OUT.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multifusion.errors import IncompatibleModelsError

# Top-level UNet modules with parameters outside the blocks, and the block they are weighed
# with; the optional embeddings exist only in some configs (class labels, SDXL's text_time).
_BEFORE_BLOCKS = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj")
_AFTER_BLOCKS = ("conv_norm_out", "conv_out")


@dataclass(frozen=True)
class BlockLayout:
    """The block ids of one denoiser architecture and the diffusers modules each id weighs.

    `ids` are in notation order (IN.., M00, OUT.. for a UNet), without the leading text-encoder
    weights; `members[id]` are module prefixes such as "down_blocks.0.resnets.1" or "conv_in".
    `denoiser` is the pipeline component the ids divide, `kind` names it in messages, `leads`
    are the accepted forms of leading text-encoder weights (BASE weighs every text encoder;
    FLUX also takes SuperMerger's CLIP, T5) and `t5` the component a T5 lead weighs.
    `resamples`: whether SD-1 strings and presets (IN/M00/OUT curves) are resampled onto it."""

    levels: int
    ids: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]
    denoiser: str = "unet"
    kind: str = "UNet"
    leads: tuple[tuple[str, ...], ...] = (("BASE",),)
    t5: str | None = None
    resamples: bool = True
    _owner: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        owner = {prefix: block for block, prefixes in self.members.items() for prefix in prefixes}
        object.__setattr__(self, "_owner", owner)

    @property
    def n_in(self) -> int:
        """Number of IN ids of a UNet (equal to the number of OUT ids)."""
        return (len(self.ids) - 1) // 2

    def block_of(self, name: str) -> str:
        """The block id weighing denoiser parameter `name` (a diffusers state-dict key): the id
        of the longest module prefix of `name` that some id holds."""
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            owner = self._owner.get(".".join(parts[:k]))
            if owner is not None:
                return owner
        raise IncompatibleModelsError(
            f"{self.kind} parameter {name!r} belongs to no block id; block weights cannot be applied to this "
            "architecture (a plain weighted sum can)"
        )

    def describe(self) -> str:
        """The ids in short, runs of one prefix as first..last: "IN00..IN11, M00, OUT00..OUT11",
        "IN, D00..D18, S00..S37, OUT"."""
        runs: list[list[str]] = []
        for block in self.ids:
            prefix = block.rstrip("0123456789")
            if runs and runs[-1][0].rstrip("0123456789") == prefix and block != prefix:
                runs[-1].append(block)
            else:
                runs.append([block])
        return ", ".join(r[0] if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def unet_layout(config: Mapping[str, Any]) -> BlockLayout:
    """Block layout of a `UNet2DConditionModel` from its config (`unet.config` or the
    `unet/config.json` dict): which diffusers modules each id IN00.., M00, OUT.. weighs."""
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    levels = len(down)
    per_level = config.get("layers_per_block", 2)
    per_level = [per_level] * levels if isinstance(per_level, int) else list(per_level)
    members: dict[str, list[str]] = {}

    ins: list[list[str]] = [list(_BEFORE_BLOCKS)]
    for i, kind in enumerate(down):
        for j in range(per_level[i]):
            ins.append(_layer(f"down_blocks.{i}", j, kind))
        if i < levels - 1:
            ins.append([f"down_blocks.{i}.downsamplers"])
    outs: list[list[str]] = []
    up_layers = list(reversed(per_level))
    for i, kind in enumerate(up):
        for j in range(up_layers[i] + 1):
            outs.append(_layer(f"up_blocks.{i}", j, kind))
        if i < levels - 1:
            outs[-1].append(f"up_blocks.{i}.upsamplers")
    outs[-1].extend(_AFTER_BLOCKS)

    for k, prefixes in enumerate(ins):
        members[f"IN{k:02d}"] = prefixes
    members["M00"] = ["mid_block"]
    for k, prefixes in enumerate(outs):
        members[f"OUT{k:02d}"] = prefixes
    return BlockLayout(levels, tuple(members), {k: tuple(v) for k, v in members.items()})


def _layer(block: str, j: int, kind: str) -> list[str]:
    """A block's layer j: its resnet, and its attention when the block type has one."""
    return [f"{block}.resnets.{j}"] + ([f"{block}.attentions.{j}"] if "Attn" in kind else [])


def layout_table(layout: BlockLayout, names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(id, modules) rows for documentation, e.g. ("IN03", "down_blocks.0.downsamplers");
    given a UNet's parameter names, only the modules that own some of them."""
    owning = None if names is None else {prefix for name in names for prefix in _prefixes(name)}
    return [(block, ", ".join(p for p in layout.members[block] if owning is None or p in owning)) for block in layout.ids]


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]
