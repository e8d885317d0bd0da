"""Weight merges as pure tensor maths: weighted sum, add-difference, block-weighted, and the
task-vector merges of the field (TIES, DARE, DARE-TIES, Model Stock, SLERP, geometric median),
each registered by `@merge_method` (`registry.py`: the signature is the contract).

The static baselines of the AFA paper ("Ensembling Diffusion Models via Adaptive Feature
Aggregation", arXiv 2405.17082, Sec. 5: weighted merging and merge-block-weighted) and what
A1111's checkpoint merger, SuperMerger, merge-block-weighted, ComfyUI's ModelMerge nodes and
sd-mecha (`weighted_sum`, `add_difference`) compute, one parameter tensor at a time:

    weighted sum     sum_i w_i theta_i / sum_i w_i        (A1111: (1 - M) A + M B)
    add difference   A + alpha (B - C)                    (A1111 "Add difference")
    block weighted   either of the above with its weight picked per parameter from the
                     block that holds it (A1111 MBW notation, `multifusion.families.blocks`)

Tensors of any shape; the arithmetic runs in float32 (float64 stays float64) and the result
takes the first tensor's dtype, so half-precision checkpoints merge without half-precision
rounding in between. Degenerate cases are exact: terms with weight 0 are skipped, so weights
(1, 0) return the first tensor bit for bit, and so does add-difference with alpha 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated

import torch

from multifusion.errors import RecipeError
from multifusion.recipe import weights_problem
from multifusion.weights.registry import MERGE_METHODS, PerModel, Range, Rule, Tensor, merge_method


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i: weight i belongs to tensor i; weights are normalised.

    Weights must be finite and >= 0 with a positive sum (a merge interpolates; use
    add-difference to extrapolate)."""
    if len(tensors) != len(weights):
        raise RecipeError(f"{len(weights)} weights for {len(tensors)} models; give one weight per model")
    check_weights(weights)
    total = float(sum(weights))
    terms = [(w / total, t) for w, t in zip(weights, tensors) if w != 0]
    if len(terms) == 1:
        return terms[0][1].to(tensors[0].dtype)
    out = _work(terms[0][1]).mul(terms[0][0])  # a new tensor: inputs may be read-only file maps
    for w, t in terms[1:]:
        out.add_(_work(t), alpha=w)  # in place: one buffer per parameter, whatever N
    return out.to(tensors[0].dtype)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    """a + alpha (b - c): the difference a fine-tune (b) made to its base (c), added to a.
    Any finite alpha (negative subtracts the difference)."""
    if not math.isfinite(alpha):
        raise RecipeError(f"add-difference alpha {alpha!r} is not a finite number")
    if alpha == 0:
        return a
    return (_work(a) + alpha * (_work(b) - _work(c))).to(a.dtype)


def check_weights(weights: Sequence[float]) -> None:
    """Weighted-sum weights: finite, not negative, a positive and finite sum (`recipe.weights_problem`,
    the rule `average` follows too); RecipeError quoting the value."""
    problem = weights_problem(weights)
    if problem:
        raise RecipeError(problem)


def merge_tensor(tensors: Sequence[torch.Tensor], method: str, weight: float | Sequence[float]) -> torch.Tensor:
    """One parameter merged by the registered `method` with its ratio set to `weight`: a
    weighted sum with one weight per tensor, or with a single block weight w between two
    tensors ((1 - w) A + w B); add-difference of (A, B, C) with alpha `weight`; slerp with t;
    TIES / DARE with alpha (the other hyper-parameters at their defaults)."""
    m = MERGE_METHODS[method]
    if m.ratio is None:
        raise RecipeError(f"{method} has no ratio to set")
    if isinstance(weight, (int, float)) and m.block_ratio is not None:
        value = m.block_ratio(float(weight))
    else:
        value = tuple(weight) if not isinstance(weight, (int, float)) else float(weight)
    return m(tensors, m.check({m.ratio: value}), torch.Generator().manual_seed(0) if m.random else None)


def block_weighted(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    block_of: Callable[[str], str],
    block_weights: Mapping[str, float],
    method: str = "weighted_sum",
) -> dict[str, torch.Tensor]:
    """Merge-block-weighted: every parameter k merged by `method` with the weight of its block,
    `block_weights[block_of(k)]`: two state dicts for a weighted sum ((1 - w) A + w B), three
    for add-difference (A + w (B - C)). Keys are the first state dict's."""
    return {k: merge_tensor([sd[k] for sd in state_dicts], method, block_weights[block_of(k)]) for k in state_dicts[0]}


# --- the registered methods --------------------------------------------------------------------
# weighted_sum and add_difference keep their list/positional signatures above (the maths API);
# these two adapters give the registry their models and hyper-parameters.


def _weights_rule(weights, n_models):
    return None if weights is None else weights_problem(weights)


@merge_method(
    name="weighted_sum",
    ratio="weights",
    block_models=2,
    block_ratio=lambda w: (1.0 - w, w),
    notes={"alpha": "belongs to add_difference; a weighted_sum takes `weights` (one per model), not `alpha`"},
)
def _weighted_sum(
    *models: Tensor, weights: Annotated[tuple[float, ...] | None, PerModel(), Rule(_weights_rule)] = None
) -> Tensor:
    """sum_i w_i theta_i / sum_i w_i (default: equal weights). Block weights: (1 - w) A + w B."""
    return weighted_sum(models, weights if weights is not None else (1.0,) * len(models))


@merge_method(
    name="add_difference",
    ratio="alpha",
    notes={"weights": "add_difference takes `alpha` (A + alpha (B - C)), not `weights`"},
)
def _add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: Annotated[float | None, Range()] = None) -> Tensor:
    """a + alpha (b - c), alpha default 1. Block weights: alpha per block."""
    return add_difference(a, b, c, 1.0 if alpha is None else alpha)


def _deltas(base: Tensor, models: Sequence[Tensor]) -> torch.Tensor:
    """(N, *shape) task vectors theta_t - theta_base, in float32 (float64 stays)."""
    b = _work(base)
    return torch.stack([_work(m) - b for m in models])


def trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 (trim): per task vector (N, *shape), keep the ceil(density * numel) entries of
    largest magnitude and zero the rest. density 1 keeps all."""
    if density >= 1:
        return deltas
    flat = deltas.reshape(len(deltas), -1)  # (N, P)
    k = max(1, math.ceil(density * flat.shape[1]))
    idx = flat.abs().topk(k, dim=1).indices
    return torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx)).reshape(deltas.shape)


def disjoint_mean(deltas: torch.Tensor) -> torch.Tensor:
    """TIES steps 2-3 over (N, *shape) -> (*shape): elect the sign gamma = sgn(sum_t delta_t),
    then average, entry by entry, only the deltas whose sign agrees with it (0 where none do)."""
    gamma = deltas.sum(0).sign()
    agree = (deltas.sign() == gamma) & (deltas != 0)
    count = agree.sum(0)
    return torch.where(agree, deltas, 0).sum(0) / count.clamp(min=1)


def dare_drop(deltas: torch.Tensor, drop_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE (drop and rescale) on (N, *shape): each entry dropped with probability p, the kept
    ones rescaled by 1 / (1 - p), so each entry's expectation is unchanged. p = 0 is the identity."""
    if drop_rate == 0:
        return deltas
    keep = torch.rand(deltas.shape, generator=generator, dtype=torch.float32) >= drop_rate  # drawn on the CPU
    return torch.where(keep.to(deltas.device), deltas / (1 - drop_rate), 0)


@merge_method(ratio="alpha")
def ties(
    base: Tensor,
    *models: Tensor,
    density: Annotated[float, Range(0, 1, lo_open=True)] = 0.2,
    alpha: Annotated[float, Range(0, None)] = 1.0,
) -> Tensor:
    """TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
    NeurIPS 2023, arXiv 2306.01708, Alg. 1) of fine-tunes (*shape each) of `base` (*shape):

        tau_t   = theta_t - theta_base                       task vectors, (N, *shape)
        trim    keep the top-k (k = density) magnitudes of each tau_t, zero the rest
        elect   gamma = sgn(sum_t trimmed tau_t)
        merge   tau_m = mean of the trimmed tau_t whose sign is gamma (entry by entry)
        theta   = theta_base + alpha tau_m                   (alpha: the paper's lambda)

    Defaults are the paper's: k = 20 %, lambda = 1. Deviation: the top-k is per tensor (the
    paper trims each whole flattened task vector) because merges stream one tensor at a time.
    Block weights set alpha per block."""
    tau = disjoint_mean(trim(_deltas(base, models), density))
    return (_work(base) + alpha * tau).to(base.dtype)


@merge_method(ratio="alpha")
def dare(
    base: Tensor,
    *models: Tensor,
    drop_rate: Annotated[float, Range(0, 1, hi_open=True)] = 0.5,
    alpha: Annotated[float, Range(0, None)] = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", ICML 2024, arXiv 2311.03099, Eq. 1-2) with task arithmetic:

        delta_t' = m_t * delta_t / (1 - p),   m_t ~ Bernoulli(1 - p) per entry
        theta    = theta_base + alpha sum_t delta_t'          (shapes: *shape throughout)

    p = `drop_rate` (the paper drops up to 0.9 of an LM's SFT deltas; our default 0.5 is a
    conservative choice for diffusion fine-tunes, not the paper's); alpha = 1 sums the
    deltas, alpha = 1 / N averages them. The drop draws from `generator` (the merge's seed).
    Block weights set alpha per block."""
    tau = dare_drop(_deltas(base, models), drop_rate, generator).sum(0)
    return (_work(base) + alpha * tau).to(base.dtype)


@merge_method(ratio="alpha")
def dare_ties(
    base: Tensor,
    *models: Tensor,
    drop_rate: Annotated[float, Range(0, 1, hi_open=True)] = 0.5,
    alpha: Annotated[float, Range(0, None)] = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE as TIES' sparsifier (Yu et al., arXiv 2311.03099, Sec. 4.2 "DARE + TIES"): TIES with
    its trim step replaced by DARE's random drop and rescale, then sign election and the
    disjoint mean: theta = theta_base + alpha disjoint_mean(dare_drop(tau, p)). p = 0 is TIES
    with density 1. Block weights set alpha per block."""
    tau = disjoint_mean(dare_drop(_deltas(base, models), drop_rate, generator))
    return (_work(base) + alpha * tau).to(base.dtype)


def model_stock_ratio(deltas: torch.Tensor) -> torch.Tensor:
    """Model Stock's interpolation ratio (Jang et al., arXiv 2403.19522, Eq. 2) for (N, *shape)
    deltas of N >= 2 fine-tunes from the base: t = N cos / (1 + (N - 1) cos), cos the mean
    pairwise cosine between the deltas. Deviation: cos is clamped to [0, 1] (the paper assumes
    angles below 90 degrees; a zero delta counts as orthogonal), so t lies in [0, 1]."""
    n = len(deltas)
    unit = torch.nn.functional.normalize(deltas.reshape(n, -1).double(), dim=1)  # (N, P), zero rows stay 0
    gram = unit @ unit.T  # (N, N)
    cos = ((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).clamp(0, 1)
    return n * cos / (1 + (n - 1) * cos)


@merge_method(min_models=3)
def model_stock(base: Tensor, *models: Tensor) -> Tensor:
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024, arXiv 2403.19522, Eq. 2-3), per tensor (the paper's per layer), for N >= 2
    fine-tunes (*shape each) of `base` (*shape):

        t      = N cos(theta) / (1 + (N - 1) cos(theta))     theta: angle between the deltas
        merged = t * mean_t(theta_t) + (1 - t) * theta_base

    No hyper-parameters (the ratio is computed), so no block weights."""
    deltas = _deltas(base, models)
    t = model_stock_ratio(deltas).to(deltas.dtype)
    return (_work(base) + t * deltas.mean(0)).to(base.dtype)


@merge_method(ratio="t")
def slerp(a: Tensor, b: Tensor, *, t: Annotated[float, Range(0, 1)] = 0.5) -> Tensor:
    """Spherical linear interpolation (Shoemake, "Animating rotation with quaternion curves",
    SIGGRAPH 1985) of two tensors (*shape), treated as flat vectors:

        Omega = arccos(<a, b> / (|a| |b|))
        out   = sin((1 - t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b

    falling back to (1 - t) a + t b when a and b are nearly parallel (|cos| > 0.9995) or one is
    zero. t = 0 / 1 give a / b exactly. Block weights set t per block (the share of B)."""
    if t == 0:
        return a
    if t == 1:
        return b.to(a.dtype)
    x, y = _work(a), _work(b)
    na, nb = x.norm(), y.norm()
    cos = (x.flatten() @ y.flatten()) / (na * nb) if na > 0 and nb > 0 else torch.ones(())
    if cos.abs() > 0.9995:
        return ((1 - t) * x + t * y).to(a.dtype)
    omega = torch.arccos(cos.clamp(-1, 1))
    return ((torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)).to(a.dtype)


@merge_method
def geometric_median(*models: Tensor, iterations: Annotated[int, Range(1, 10_000)] = 100) -> Tensor:
    """Geometric median of the models (*shape each, as flat vectors) by Weiszfeld's iterations
    (Weiszfeld 1937; as sd-mecha's `geometric_median`):

        y_0 = mean_i x_i,   y_{k+1} = sum_i w_i x_i / sum_i w_i,   w_i = 1 / max(|x_i - y_k|, 1e-8)

    stopping after `iterations` or when y moves by less than 1e-7 |y|. The median is translation
    equivariant, so this is also base + the geometric median of the deltas from any base; no
    base model is needed. Identical models give that model exactly. No block weights."""
    if all(torch.equal(models[0], m) for m in models[1:]):
        return models[0]
    x = torch.stack([_work(m).flatten() for m in models])  # (N, P)
    y = x.mean(0)
    for _ in range(iterations):
        w = 1 / (x - y).norm(dim=1).clamp(min=1e-8)  # (N,)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - y).norm() <= 1e-7 * new.norm()
        y = new
        if done:
            break
    return y.reshape(models[0].shape).to(models[0].dtype)
