"""Regional prompts bound inside attention (method `region-attention`): one denoiser call per
step, each region's image tokens steered to its own prompt's tokens.

The text sequence given to the denoiser is the base prompt's tokens followed by each region's
(`Layout`); attention processors installed on the denoiser for the call (`installed`) split it
again. One rule per kind of attention, each from its paper:

- **Joint attention** (SD3's joint blocks, FLUX.1's double- and single-stream blocks): Chen et
  al., "Training-free Regional Prompting for Diffusion Transformers" (arXiv 2411.02395; reference
  code instantX-research/Regional-Prompting-FLUX, `pipeline_flux_regional.py`). Under the
  regional mask of Sec. 3, region k's text tokens and region k's image tokens attend only to each
  other; a base pass lets every image token attend the base prompt and the whole image; the image
  outputs are blended, base_ratio * base + (1 - base_ratio) * regional, in every layer.
- **Cross-attention** (UNets: SD 1/2, SDXL, the zoo): the attention mode of Regional Prompter
  (hako-mikan/sd-webui-regional-prompter, `scripts/attention.py`): in every cross-attention
  layer the image tokens of region k attend region k's prompt, every token attends the base
  prompt, the two outputs blended by the base ratio; self-attention is untouched. This is Chen et
  al.'s rule with the text-to-image and image-to-image parts dropped (a UNet has no text stream,
  and its self-attention is left as trained). DenseDiffusion (Kim et al., arXiv 2308.12964) was
  read and not chosen: it modulates the attention scores of one caption by which of its tokens
  name which segment, so each region needs token indices inside a single prompt and a
  time-dependent strength tuned per model, where this method takes `mod`'s regions as they are
  (a prompt per box) and keeps an exact degenerate case.

How a region's attention is computed. Masked attention over the whole sequence equals, for
regions that do not overlap, the denoiser's own attention processor run on each region's tokens
alone (its image tokens with its prompt's tokens): a region is a small image of its own that
attends its own prompt, and the tokens of other regions are simply absent. That is what
`RegionalProcessor` does: it calls the processor the denoiser had (so fused projections, rotary
positions, norms and LoRA layers are the model's own) once for the base prompt on every token
and once per region on the region's tokens, with no mask tensor (memory grows with the regions,
not with the square of the sequence). Plain cross-attention layers (AttnProcessor2_0, every UNet
loaded here) take a shorter path with the same rule (`fused_cross`: projections once, two
attention calls), the prompts' keys and values kept over a run's calls (`TextProjections`: the
text does not change between steps; Regional Prompter projects it at every call). Rules beyond
the papers (stated in docs/regions.md):

- Overlaps: a token covered by several regions takes the mean of their outputs, weighted by the
  share of the token each covers. Deviation from Chen et al., whose mask lets such a token attend
  the union of the regions in one softmax: the per-region calls keep each region's attention
  what it would be alone.
- Uncovered tokens (only with a base prompt) take the base output alone. Deviation from Chen et
  al., whose regional pass lets them attend each other and no text, then blends.
- Coarse UNet levels: a token of a level 2^j coarser than the latent grid is covered by each
  region in proportion to the area it shares with it (`token_shares`); tokens a region touches at
  all are in its call.
- The negative prompt of classifier-free guidance is every part's prompt in the unconditional
  half, so both halves run the same operator.
- Without a base prompt the regions must cover the canvas; the pooled text embedding (SDXL, SD3,
  FLUX) is the base prompt's, else the mean of the regions'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from multifusion.errors import IncompatibleModelsError

# --------------------------------------------------------------------------- maths


def token_shares(
    boxes: Sequence[tuple[int, int, int, int]], latent_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> torch.Tensor:
    """(R, gh, gw) float32: the share of each token cell of a gh x gw grid covered by each latent
    box (r0, r1, c0, c1) of an (h, w) latent. On a grid dividing the latent evenly (the patch
    grid, a UNet level of a latent divisible by its downsampling) this is the exact area fraction;
    otherwise adaptive average pooling's cells (which overlap by one latent pixel at most)."""
    h, w = latent_hw
    masks = torch.zeros(len(boxes), 1, h, w)
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        masks[k, 0, r0:r1, c0:c1] = 1.0
    return F.adaptive_avg_pool2d(masks, grid_hw)[:, 0]


def mix_weights(shares: torch.Tensor, base_ratio: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """From token shares (R, N): (each region's weight in the regional output (R, N), columns
    summing to 1 where any region covers the token, 0 elsewhere; the weight of the regional output
    against the base output (N,)). With a base prompt (`base_ratio` a float) that weight is
    (1 - base_ratio) * min(1, total share): uncovered tokens take the base alone. Without one
    (None) it is 1 and every token must be covered (ValueError otherwise: a bug, as the canvas is
    checked before sampling)."""
    total = shares.sum(0)
    within = torch.where(total > 0, shares / total.clamp_min(1e-12), torch.zeros_like(shares))
    if base_ratio is None:
        if bool((total <= 0).any()):
            raise ValueError("a token is covered by no region and there is no base prompt")
        return within, torch.ones_like(total)
    return within, (1.0 - base_ratio) * total.clamp(max=1.0)


def combine(
    base: torch.Tensor | None, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], within: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The image tokens' output (B, N, C): the regions' outputs `parts` [(token indices (n_k,),
    output (B, n_k, C))] weighted by `within` (R, N) and summed per token, then blended with the
    base output (B, N, C) as base + weight * (regional - base) (`torch.lerp`: exactly the base
    where the two agree). `base` None: the regional output (weight is 1 everywhere)."""
    first = parts[0][1]
    regional = torch.zeros(first.shape[0], within.shape[1], first.shape[2], dtype=first.dtype, device=first.device)
    for k, (idx, out) in enumerate(parts):
        regional.index_add_(1, idx, out * within[k, idx].to(out.dtype)[None, :, None])
    if base is None:
        return regional
    return torch.lerp(base, regional, weight.to(base.dtype)[None, :, None])


# --------------------------------------------------------------------------- the text layout


@dataclass(frozen=True)
class Layout:
    """Where each prompt's tokens lie in the joined text sequence: `lengths` [base?, region 0, ...]
    and whether the first is the base prompt's."""

    lengths: tuple[int, ...]
    has_base: bool

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def slices(self) -> list[slice]:
        out, start = [], 0
        for n in self.lengths:
            out.append(slice(start, start + n))
            start += n
        return out

    @property
    def base(self) -> slice | None:
        return self.slices()[0] if self.has_base else None

    @property
    def regions(self) -> list[slice]:
        return self.slices()[1:] if self.has_base else self.slices()


@dataclass(eq=False)
class Regions:
    """The regions of one run on the latent grid: boxes (r0, r1, c0, c1), the latent (h, w), the
    base ratio (None without a base prompt) and the text layout; the per-grid token weights are
    computed once per grid size seen (`at`)."""

    boxes: list[tuple[int, int, int, int]]
    latent_hw: tuple[int, int]
    base_ratio: float | None
    layout: Layout
    _grids: dict = field(default_factory=dict, repr=False)

    def grid_of(self, n_tokens: int) -> tuple[int, int]:
        """The (gh, gw) token grid of `n_tokens` image tokens: the latent halved j times (rounded
        up, as strided convolutions and 2x2 patches do)."""
        h, w = self.latent_hw
        for _ in range(8):
            if h * w == n_tokens:
                return h, w
            h, w = -(-h // 2), -(-w // 2)
        raise ValueError(f"{n_tokens} image tokens are no grid of the {self.latent_hw} latent halved")

    def at(self, n_tokens: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """For a layer of `n_tokens` image tokens: each region's token indices, `within` (R, N) and
        the regional weight (N,) (`mix_weights`), on `device`."""
        if n_tokens not in self._grids:
            shares = token_shares(self.boxes, self.latent_hw, self.grid_of(n_tokens)).flatten(1)  # (R, N) row-major
            within, weight = mix_weights(shares, self.base_ratio)
            idx = [(s > 0).nonzero()[:, 0] for s in shares]
            self._grids[n_tokens] = (idx, within, weight)
        idx, within, weight = self._grids[n_tokens]
        return [i.to(device) for i in idx], within.to(device), weight.to(device)

    def padded(self, n_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each region's token indices padded to one length M (with the region's first token),
        region after region (R * M,), and their weights in `within` (R * M,), 0 on the padding;
        built once per grid and device."""
        key = ("padded", n_tokens, device)
        if key not in self._grids:
            idx, within, _ = self.at(n_tokens, torch.device("cpu"))
            m = max(len(i) for i in idx)
            gather = torch.cat([torch.cat([i, i[:1].expand(m - len(i))]) for i in idx])
            share = torch.cat([torch.cat([within[k, i], torch.zeros(m - len(i))]) for k, i in enumerate(idx)])
            self._grids[key] = (gather.to(device), share.to(device))
        return self._grids[key]


# --------------------------------------------------------------------------- the processors


def _rope(rope: Any, rows: torch.Tensor) -> Any:
    """FLUX's rotary (cos, sin), each (S, D), at the sequence rows `rows`; None passes."""
    if rope is None:
        return None
    return tuple(r[rows] for r in rope) if isinstance(rope, tuple) else rope[rows]


class RegionalProcessor:
    """An attention processor calling the denoiser's own (`inner`) once with the base prompt and
    once per region on the region's tokens (see the module docstring). `kind`: "cross" (a UNet's
    attn2: image queries, text keys), "joint" (image and text streams attending together, text
    given apart: SD3's and FLUX's double-stream blocks) or "single" (FLUX's single-stream blocks:
    one sequence, text first)."""

    def __init__(self, inner: Any, kind: str, regions: Regions, cache: TextProjections | None = None):
        self.inner, self.kind, self.regions, self.cache = inner, kind, regions, cache

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        layout, inner = self.regions.layout, self.inner
        if attention_mask is not None:  # no denoiser this module takes passes one to these layers
            raise ValueError("region-attention cannot combine its regions with an attention mask given to the denoiser")
        if self.kind == "cross":
            if fusable(attn, inner, hidden_states, layout):
                return fused_cross(attn, hidden_states, encoder_hidden_states, layout, self.regions, self.cache)
            idx, within, weight = self.regions.at(hidden_states.shape[1], hidden_states.device)
            texts = [encoder_hidden_states[:, s] for s in layout.regions]
            base = None if layout.base is None else inner(attn, hidden_states, encoder_hidden_states[:, layout.base], **kwargs)
            parts = [(i, inner(attn, hidden_states[:, i], text, **kwargs)) for i, text in zip(idx, texts)]
            return combine(base, parts, within, weight)
        if self.kind == "joint":
            image, text = hidden_states, encoder_hidden_states
        else:  # single stream: [text, image] in one sequence
            text, image = hidden_states[:, : layout.total], hidden_states[:, layout.total :]
        n = image.shape[1]
        idx, within, weight = self.regions.at(n, image.device)
        image_rows = torch.arange(n, device=image.device) + layout.total  # rows of the image tokens in the joint sequence

        def call(s: slice, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            """(image output, text output) of the prompt at `s` with image tokens `tokens` (None: all)."""
            img = image if tokens is None else image[:, tokens]
            rows = torch.cat(
                [torch.arange(s.start, s.stop, device=image.device), image_rows if tokens is None else image_rows[tokens]]
            )
            rope = {"image_rotary_emb": _rope(image_rotary_emb, rows)} if image_rotary_emb is not None else {}
            if self.kind == "joint":
                out_img, out_txt = inner(attn, img, text[:, s], **rope, **kwargs)
                return out_img, out_txt
            out = inner(attn, torch.cat([text[:, s], img], dim=1), None, **rope, **kwargs)
            return out[:, s.stop - s.start :], out[:, : s.stop - s.start]

        base_img, texts = None, []
        if layout.base is not None:
            base_img, base_txt = call(layout.base, None)
            texts.append(base_txt)
        parts = []
        for i, s in zip(idx, layout.regions):
            out_img, out_txt = call(s, i)
            parts.append((i, out_img))
            texts.append(out_txt)
        image_out = combine(base_img, parts, within, weight)
        text_out = torch.cat(texts, dim=1)
        if self.kind == "joint":
            return image_out, text_out
        return torch.cat([text_out, image_out], dim=1)


def fusable(attn: Any, inner: Any, hidden_states: torch.Tensor, layout: Layout) -> bool:
    """Whether a cross-attention call can run as `fused_cross`: the module is a plain diffusers
    cross-attention (AttnProcessor2_0, tokens (B, N, C), no norms, residual or rescaling of its
    own) and every prompt has the same number of tokens (CLIP's padded 77 always do)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (
        type(inner) is AttnProcessor2_0
        and hidden_states.ndim == 3
        and len(set(layout.lengths)) == 1
        and attn.spatial_norm is None
        and attn.group_norm is None
        and not attn.norm_cross
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
    )


def fused_cross(
    attn: Any, x: torch.Tensor, text: torch.Tensor, layout: Layout, regions: Regions, cache: TextProjections | None = None
) -> torch.Tensor:
    """The per-region rule of `RegionalProcessor` for a plain cross-attention layer in two
    attention calls: image tokens x (B, N, C) are projected once and the P prompts of `text`
    (B, P * L, D) once (or taken from `cache`, `TextProjections`); the base prompt is attended by
    every token (B, heads, N, d), and each region's prompt by its own tokens only, the R regions'
    token lists padded to one length M and batched (B * R, heads, M, d), so the attention costs
    about twice one prompt's whatever the number of regions. Region outputs are weighted by
    `within` and summed per token, blended with the base's by the regional weight, and projected
    out once (`to_out` is affine, so blending before it equals blending its outputs). The steps
    are AttnProcessor2_0's; a region covering every token gives its output bit for bit."""
    b, n, _ = x.shape
    _, within, weight = regions.at(n, x.device)
    gather, share = regions.padded(n, x.device)  # (R * M,) token indices, (R * M,) their weights (0: padding)
    r = len(layout.regions)
    m = gather.shape[0] // r
    query = attn.to_q(x)  # (B, N, H * d)
    inner_dim = query.shape[-1]
    heads, d = attn.heads, inner_dim // attn.heads
    k_base, v_base, k_regions, v_regions = project_text(attn, text, layout) if cache is None else cache.get(attn, text, layout)
    # (B, R * M, H * d) -> (B * R, M, H, d) -> (B * R, H, M, d): region r of image b is batch entry b * R + r
    per_region = query.index_select(1, gather).view(b * r, m, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(per_region, k_regions, v_regions)  # (B * R, H, M, d)
    out = out.transpose(1, 2).reshape(b, r * m, inner_dim).to(query.dtype)
    regional = torch.zeros(b, n, inner_dim, dtype=out.dtype, device=out.device)
    regional.index_add_(1, gather, out * share.to(out.dtype)[None, :, None])
    if k_base is not None:
        base = F.scaled_dot_product_attention(query.view(b, n, heads, d).transpose(1, 2), k_base, v_base)  # (B, H, N, d)
        base = base.transpose(1, 2).reshape(b, n, inner_dim).to(query.dtype)
        regional = torch.lerp(base, regional, weight.to(base.dtype)[None, :, None])
    return attn.to_out[1](attn.to_out[0](regional))


def project_text(attn: Any, text: torch.Tensor, layout: Layout) -> tuple[torch.Tensor | None, ...]:
    """The keys and values of every prompt of `text` (B, P * L, D) in one projection each, split
    as `fused_cross` attends them: (base keys, base values) (B, H, L, d) (None without a base
    prompt) and (region keys, region values) (B * R, H, L, d), region r of prompt b at b * R + r."""
    b, p, length = text.shape[0], len(layout.lengths), layout.lengths[0]
    first = 1 if layout.has_base else 0
    out = []
    for proj in (attn.to_k, attn.to_v):
        y = proj(text)  # (B, P * L, H * d)
        heads, d = attn.heads, y.shape[-1] // attn.heads
        y = y.view(b, p, length, heads, d)
        base = y[:, 0].contiguous().transpose(1, 2) if first else None  # (B, H, L, d), owning its memory
        out.append((base, y[:, first:].reshape(b * (p - first), length, heads, d).transpose(1, 2)))  # (B * R, H, L, d)
    (k_base, k_regions), (v_base, v_regions) = out
    return k_base, v_base, k_regions, v_regions


KEPT_TEXT_BYTES = 1 << 30
"""The most memory `TextProjections` holds by default (1 GiB): SDXL's keys and values of a base
prompt and two regions for 6 images."""


class TextProjections:
    """The text keys and values of each cross-attention layer (`project_text`), kept across the
    denoiser calls of one run: the text is the same at every step, so each layer projects it once
    (Regional Prompter projects it at every call). An entry is used only while it is certainly
    what projecting would give: the same text (the same tensor as the previous layer's, else
    equal in value; other text empties the store), the same projection weights (module, tensor,
    device, in-place version), plain `nn.Linear` projections (a LoRA layer's output depends on
    which adapters are active: never kept), and no gradient being recorded. Without an entry it
    projects, as the processor would. The entries hold at most `max_bytes` (default
    `KEPT_TEXT_BYTES`); layers beyond it project at every call. Size of an entry: 2 (keys,
    values) x 2B (CFG) x P prompts x L tokens x the layer's width, e.g. SD-1.5 with a base prompt
    and two regions about 23 MB per image in fp16, SDXL about 154 MB."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = KEPT_TEXT_BYTES if max_bytes is None else max_bytes
        self._text: torch.Tensor | None = None  # the text the entries were projected from (a copy)
        self._seen: torch.Tensor | None = None  # the last tensor found equal to it, at in-place version:
        self._seen_version = -1
        self._entries: dict[int, tuple[tuple, tuple, int]] = {}  # id(attn): (key, projections, bytes)
        self._bytes = 0

    def get(self, attn: Any, text: torch.Tensor, layout: Layout) -> tuple[torch.Tensor | None, ...]:
        """`project_text(attn, text, layout)`, from the store when it holds it."""
        projections = (attn.to_k, attn.to_v)
        if torch.is_grad_enabled() or any(type(p) is not torch.nn.Linear for p in projections):
            return project_text(attn, text, layout)
        if not self._same_text(text):
            self._text, self._seen, self._seen_version, self._entries = text.detach().clone(), text, text._version, {}
            self._bytes = 0
        key = (attn, layout) + tuple(
            (t, t.data_ptr(), t.device, t._version) for p in projections for t in (p.weight, p.bias) if t is not None
        )
        entry = self._entries.get(id(attn))
        if entry is not None and _same_key(entry[0], key):
            return entry[1]
        projected = project_text(attn, text, layout)
        size = sum(t.numel() * t.element_size() for t in projected if t is not None)
        held = self._bytes - (0 if entry is None else entry[2])
        if held + size <= self.max_bytes:
            self._entries[id(attn)], self._bytes = (key, projected, size), held + size
        elif entry is not None:  # stale and no room for the new one
            del self._entries[id(attn)]
            self._bytes = held
        return projected

    def _same_text(self, text: torch.Tensor) -> bool:
        if text is self._seen and text._version == self._seen_version:
            return True
        known = self._text
        if known is None or known.shape != text.shape or known.dtype != text.dtype or known.device != text.device:
            return False
        if not torch.equal(known, text):
            return False
        self._seen, self._seen_version = text, text._version
        return True


def _same_key(a: tuple, b: tuple) -> bool:
    """Two keys of `TextProjections` (module, layout, then (tensor, address, device, version) per
    weight), the module and tensors compared by identity."""
    return (
        len(a) == len(b) and a[0] is b[0] and a[1] == b[1] and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a[2:], b[2:]))
    )


ATTENTION_KINDS: dict[str, dict[str, str]] = {
    "UNet2DConditionModel": {"attn2": "cross"},
    "SD3Transformer2DModel": {"transformer_blocks.*.attn": "joint"},
    "FluxTransformer2DModel": {"transformer_blocks.*.attn": "joint", "single_transformer_blocks.*.attn": "single"},
}
"""Which attention modules of a denoiser (by its diffusers class) see the text, and their kind;
a pattern "a.*.b" names modules `a.<i>.b`, a bare name any module of that last name. SD3.5's
second attention of a block (`attn2`, image tokens only) is left as it is."""


def _matches(name: str, pattern: str) -> bool:
    if "*" not in pattern:
        return name.rsplit(".", 1)[-1] == pattern
    head, tail = pattern.split(".*.")
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == head and parts[1].isdigit() and parts[2] == tail


def text_attention(denoiser: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """{module name: (attention module, kind)} of the layers that attend the text;
    IncompatibleModelsError naming the denoiser's class when it is none of `ATTENTION_KINDS`."""
    kinds = ATTENTION_KINDS.get(type(denoiser).__name__)
    if kinds is None:
        raise IncompatibleModelsError(
            f"region-attention places regions in the attention of {', '.join(ATTENTION_KINDS)}; this denoiser is a "
            f"{type(denoiser).__name__}; use `mod` (regions by window blending) for it"
        )
    out = {}
    for name, module in denoiser.named_modules():
        if hasattr(module, "processor"):
            kind = next((k for p, k in kinds.items() if _matches(name, p)), None)
            if kind is not None:
                out[name] = (module, kind)
    if not out:
        raise IncompatibleModelsError(f"region-attention found no text attention layers in this {type(denoiser).__name__}")
    return out


@contextlib.contextmanager
def installed(
    layers: dict[str, tuple[torch.nn.Module, str]], regions: Regions, cache: TextProjections | None = None
) -> Iterator[None]:
    """`RegionalProcessor`s on `layers` (`text_attention`) for the duration of the block, sharing
    `cache` (the text projections kept across a run's calls; None: projected at every call); each
    module's own processor back afterwards, whatever happens inside."""
    saved = {name: module.processor for name, (module, _) in layers.items()}
    try:
        for name, (module, kind) in layers.items():
            module.set_processor(RegionalProcessor(saved[name], kind, regions, cache))
        yield
    finally:
        for name, (module, _) in layers.items():
            module.set_processor(saved[name])
