"""AMDM: several diffusion models meet in latent space after each scheduler step.

Yue, Peng, Du, Ji, Cai, Wan, Zhang, "Improving Fine-Grained Control via Aggregation of Multiple
Diffusion Models" (first titled "Aggregation of Multi Diffusion Models for Enhancing Learned
Representations"), arXiv 2410.01262. Reference code: github.com/Hammour-steak/AMDM, read at
commit ab8e7bc (interactmigc.py, interactip.py, interactmigcip.py: `compute_mu`, `optimize` and
the block marked CORE in each sampling loop).

Each model k runs its own trajectory x_k (own initial noise, prompt, guidance and scheduler);
one model is the *specified* model and its image is the result. At a step inside the window:

    x'_k = step_k(x_k)                                  every model's own scheduler step
    m    = sum_k c_k x'_k,   sum_k c_k^2 = 1            spherical aggregation, elementwise
    x_k <- m - eta_k (m - mu_k) / ||m - mu_k||          manifold correction, for every k

With two models c = (w, sqrt(1 - w^2)), w on the specified model (the authors' default 0.5
gives the *other* model the larger share, 0.87). Independent latents of equal variance keep
that variance in m, so m stays on the Gaussian shell where the x'_k live. The correction then
moves m a fixed length eta_k toward mu_k, model k's posterior mean at this step (the centre of
the shell its own step samples from): back toward model k's manifold, keeping what m took
from the others. Outside the window the trajectories do not interact.

What mu_k is. mu_theta(x_t, t), as the reference code names and writes it (`compute_mu`), is
DDPM's mean of p_theta(x_{t-1} | x_t): for model k's own x_t, where its own step puts it before
any noise is added. For a deterministic step (DDIM with eta 0, Euler, DPM-Solver++, UniPC,
PNDM, ...) that is x'_k itself, so mu_k = x'_k and costs nothing. For an ancestral step it is
the step without its noise; `posterior_mean` gives it for the DDIM family from x_t, eps and
the two alpha_bar values.

What the authors compute (`optimize` calling `compute_mu`): at loop index i, with t the
timestep just stepped from and t+ = t + 1000 // num_steps the previous iteration's timestep,

    mu = (x_t - (1 - alpha[t+]) / sqrt(1 - alpha_bar[t+]) eps_prev) / sqrt(alpha[t+])

DDPM's posterior-mean form, with x_t the latent this step started from (the previous step's
output, after its correction), eps_prev the guided prediction of the previous step (made at
x_{t+}), and alpha[t+] = scheduler.alphas[t+] = 1 - beta[t+], one *training* step's alpha, not
the stride's alpha_bar[t] / alpha_bar[t_next]. The latent is of one step, the noise and the
alphas of the one before, and on SD's schedule the result is 1.006 x_t - 0.012 eps_prev at the
first corrected step (50 steps: t = 961, t+ = 981; 10 steps: 1.005 and 0.010): nearly the
pre-step latent x_t, a whole stride noisier than m. Loop index 0 is never corrected (there is
no previous step), and the norm is torch.norm over the whole batch.

Deviations (each on purpose):
- mu_k is model k's own posterior mean at the current step, with the latent, eps and alphas
  of that one step: a mu a stride away from m (and from a one-training-step alpha) makes part
  of the correction a pull back to the previous noise level.
- N models with nested variance-preserving weights (`vp_weights`), squares summing to one for
  every N. The authors' three-model mixture w1 w2 x_a + sqrt(1-w1^2) w2 x_b +
  sqrt(1-w1^2) sqrt(1-w2^2) x_c is the nested form with an extra factor w2 on the specified
  model: its squares sum to 1 - w1^2 (1 - w2^2), 0.918 at their function defaults (0.3, 0.3)
  and 0.834 at their UI defaults (0.47, 0.5), so unit latents mix to std 0.958 or 0.913.
- An optional true slerp (`slerp_aggregate`): the same weights read as angles along the great
  circle between the actual latents, which keeps the norm of correlated latents too (the
  linear form keeps the variance of independent ones only).
- Norms per image. Over the batch, eta's effect per image shrinks as 1/sqrt(B) and the images
  of one batch move by different amounts.
- eta may be a fraction of ||m - mu_k|| (relative=True), which means the same under every
  scheduler (Euler-type latents are about sigma times larger early on), latent size and batch.
  The authors' eta 35-55 is absolute on 4x64x64 SD latents: for unit latents, mu_k = x'_k and
  w = 0.5, ||m - x'_spec|| ~ sqrt(2 - 2w) * 128 = 128 and ||m - x'_other|| ~ 66, so their 55
  (specified) and 45 (other) are fractions of about 0.43 and 0.68 at the first corrected step.
- Degenerate cases are exact: eta = 0 returns m, an image with m == mu is returned as it is
  (no 0/0), a weight of 1 returns that latent. With w = 1 the specified model therefore keeps
  its own trajectory bit for bit whatever its eta (m = x'_spec = mu_spec).

Authors' settings (Gradio UIs; window = loop indices [start, end] inclusive; CFG 7.5; the
specified model is InteractDiffusion in all three):
    InteractDiffusion + MIGC        20 steps, window 1-3, w 0.5,  eta 55 (Interact), 45 (MIGC);
                                    the script's demo: 50 steps, window 1-7
    InteractDiffusion + IP-Adapter  10 steps, window 1-3, w 0.45, eta 55 (Interact), 45 (IP)
    Interact + MIGC + IP-Adapter    10 steps, window 1-3, w1 0.47, w2 0.5,
                                    eta 45 (Interact), 40 (MIGC), 35 (IP)

All latents given to one call must share one parameterisation (all variance-preserving, or all
one scheduler's scaling): the mixture and an absolute eta mean nothing across scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Latents = torch.Tensor | Sequence[torch.Tensor]


def _latent_list(latents: Latents, name: str = "latents") -> list[torch.Tensor]:
    """(N, B, ...) tensor or N tensors (B, ...) -> list of N tensors of one shape."""
    xs = list(latents)
    if not xs:
        raise ValueError(f"{name} is empty; give each model's latents")
    shapes = [tuple(x.shape) for x in xs]
    if len(set(shapes)) != 1:
        raise ValueError(f"{name} must all have one shape (B, C, H, W), got {shapes}")
    if xs[0].dim() < 2:
        raise ValueError(f"{name} must be (N, B, C, H, W) or a list of (B, C, H, W), got per-model shape {shapes[0]}")
    return xs


def _check_unit_interval(name: str, values: Sequence[float]) -> list[float]:
    values = [float(v) for v in values]
    if any(not 0.0 <= v <= 1.0 for v in values):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {values}")
    return values


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if isinstance(weights, (int, float)) or len(weights) != n:
        count = 1 if isinstance(weights, (int, float)) else len(weights)
        raise ValueError(f"weights has {count} entries for {n} models; give one per model (see vp_weights)")
    weights = _check_unit_interval("weights", weights)
    if not any(weights):
        raise ValueError("weights are all zero; the specified model's weight must be > 0 or another model's")
    return weights


def vp_weights(w: float | Sequence[float], n: int) -> list[float]:
    """Nested variance-preserving weights for n models, the specified model first.

        m = w_1 x_1 + sqrt(1 - w_1^2) (w_2 x_2 + sqrt(1 - w_2^2) (... + x_n))

    so c_1 = w_1, c_k = w_k prod_{j<k} sqrt(1 - w_j^2), c_n = prod_{j<n} sqrt(1 - w_j^2), and
    sum_k c_k^2 = 1. `w` is the n - 1 level weights, or one float: the specified model's
    weight, the others sharing the rest equally (levels w, 1/sqrt(n-1), ..., 1/sqrt(2)).
    n = 1 gives [1.0]; n = 2 gives the paper's [w, sqrt(1 - w^2)]; w = 1 gives [1.0, 0.0, ...].
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number of models >= 1, got {n!r}")
    if isinstance(w, (int, float)):
        _check_unit_interval("w", [w])
        levels = [float(w)] + [1 / math.sqrt(n - k) for k in range(1, n - 1)]
    else:
        levels = list(w)
        if len(levels) != n - 1:
            raise ValueError(f"w has {len(levels)} level weights for {n} models; give n - 1 = {n - 1}, or one float")
    if n == 1:
        return [1.0]
    levels = _check_unit_interval("w", levels)
    weights, rest = [], 1.0
    for level in levels:
        weights.append(rest * level)
        rest *= math.sqrt(1.0 - level * level)
    return weights + [rest]


def aggregate(latents: Latents, weights: Sequence[float]) -> torch.Tensor:
    """Spherical aggregation m = sum_k c_k x'_k, elementwise.

    latents (N, B, C, H, W) or a list of N (B, C, H, W), in one parameterisation, the specified
    model first -> (B, C, H, W). weights: N values in [0, 1], normally `vp_weights` (any values
    in range are accepted, e.g. to reproduce the authors' three-model weights). One weight of 1
    with the rest 0 returns a copy of that latent; latents of weight 0 are not read.
    """
    xs = _latent_list(latents)
    c = _check_weights(weights, len(xs))
    if sorted(c) == [0.0] * (len(c) - 1) + [1.0]:
        return xs[c.index(1.0)].clone()
    out = None
    for ck, x in zip(c, xs):
        if ck != 0:
            out = ck * x if out is None else out + ck * x
    return out


def _slerp(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Per image, the point a fraction s along the great-circle arc from a (s = 0) to b (s = 1):
    (sin((1 - s) theta) a + sin(s theta) b) / sin(theta), theta the angle between a and b.
    Linear, (1 - s) a + s b, where sin(theta) is too small to divide by or a norm is zero."""
    if s == 0.0 or s == 1.0:
        return (a if s == 0.0 else b).clone()
    fa, fb = a.flatten(1).double(), b.flatten(1).double()  # (B, D)
    cos = ((fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))).clamp(-1.0, 1.0)  # NaN for a zero norm
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    arc = sin > 1e-6  # False for NaN too
    safe = torch.where(arc, sin, torch.ones_like(sin))
    ca = torch.where(arc, torch.sin((1.0 - s) * theta) / safe, torch.full_like(sin, 1.0 - s))
    cb = torch.where(arc, torch.sin(s * theta) / safe, torch.full_like(sin, s))
    shape = (-1,) + (1,) * (a.dim() - 1)  # (B, 1, 1, 1)
    return ca.to(a.dtype).view(shape) * a + cb.to(a.dtype).view(shape) * b


def slerp_aggregate(latents: Latents, weights: Sequence[float]) -> torch.Tensor:
    """True slerp with the weights of `aggregate` read as angles; shapes as `aggregate`.

    Two models, weights (cos phi, sin phi): the point a fraction phi / (pi / 2) along the arc
    from x'_1 to x'_2. For orthogonal latents of equal norm (independent Gaussian latents,
    nearly) this is the linear form exactly; for correlated ones it stays on the arc, so two
    latents of one norm give that norm. N models nest like `vp_weights`:
    m = slerp(x'_1, slerp(x'_2, ...)), each level w_k = c_k / sqrt(1 - c_1^2 - ... - c_{k-1}^2).
    The weights' squares must sum to 1 (to 1e-6).
    """
    xs = _latent_list(latents)
    c = _check_weights(weights, len(xs))
    total = sum(ck * ck for ck in c)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"weights' squares must sum to 1 for slerp, got {total:.6g} from {c}; use vp_weights")
    levels, rest2 = [], 1.0  # w_1, w_2, ...; cut after a level of 1 (the models after it weigh 0)
    for ck in c[:-1]:
        levels.append(1.0 if ck * ck >= rest2 else min(1.0, ck / math.sqrt(rest2)))
        rest2 -= ck * ck
        if levels[-1] == 1.0:
            levels.pop()
            break
    m = xs[len(levels)]  # the innermost model that has weight: the last one, or the one taking all
    for k in reversed(range(len(levels))):
        m = _slerp(xs[k], m, math.acos(levels[k]) / (math.pi / 2))
    return m.clone() if not levels else m


def manifold_correct(m: torch.Tensor, mu: torch.Tensor, eta: float, *, relative: bool = False) -> torch.Tensor:
    """x = m - eta (m - mu) / ||m - mu||, the norm per image.

    m (the aggregate) and mu (model k's posterior mean), (B, C, H, W) latents in one
    parameterisation -> (B, C, H, W): a step of length eta from m straight toward mu (it passes
    mu when eta > ||m - mu||, as the authors' step does). relative=True reads eta as a fraction
    of ||m - mu|| in [0, 1]: x = m - eta (m - mu), the same at every scale. eta = 0 returns m,
    an image with m == mu is returned unchanged, relative eta = 1 returns mu.
    """
    if m.shape != mu.shape:
        raise ValueError(f"mu has shape {tuple(mu.shape)} but m has {tuple(m.shape)}; give the model's mean for this batch")
    if m.dim() < 2:
        raise ValueError(f"m must be (B, C, H, W), got shape {tuple(m.shape)}")
    eta = float(eta)
    if not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 (the step length toward mu), got {eta}")
    if relative and eta > 1.0:
        raise ValueError(f"with relative=True eta is a fraction of ||m - mu|| in [0, 1], got {eta}")
    if eta == 0.0:
        return m.clone()
    d = m - mu
    if relative:
        return mu.clone() if eta == 1.0 else m - eta * d
    dist = d.flatten(1).norm(dim=1).view((-1,) + (1,) * (m.dim() - 1))  # (B, 1, 1, 1)
    unit = d / dist.clamp_min(torch.finfo(d.dtype).tiny)  # zero where m == mu
    return m - eta * unit


def posterior_mean(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_next: float, *, ddim_eta: float = 0.0
) -> torch.Tensor:
    """Mean of a DDIM-family step from x_t to the next, less noisy, timestep.

    x_t, eps (B, C, H, W): the variance-preserving latent (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n,
    what `scale_model_input` gives) and its eps prediction -> (B, C, H, W), same space.

        x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        sigma2 = ddim_eta^2 (1 - a_next) / (1 - a_t) (1 - a_t / a_next)
        mu     = sqrt(a_next) x0 + sqrt(1 - a_next - sigma2) eps

    with a_t = alpha_bar at t and a_next at the timestep the step goes to. ddim_eta = 0 is the
    deterministic DDIM step itself; ddim_eta = 1 is DDPM's posterior mean
    (x_t - (1 - alpha) / sqrt(1 - a_t) eps) / sqrt(alpha) with the stride's alpha = a_t / a_next.
    """
    if x_t.shape != eps.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)} but x_t has {tuple(x_t.shape)}")
    a_t, a_next, ddim_eta = float(alpha_bar_t), float(alpha_bar_next), float(ddim_eta)
    if not 0.0 < a_t < 1.0:
        raise ValueError(f"alpha_bar_t must lie in (0, 1), got {a_t}")
    if not a_t <= a_next <= 1.0:
        raise ValueError(f"alpha_bar_next must lie in [alpha_bar_t, 1] = [{a_t}, 1] (a step removes noise), got {a_next}")
    if not 0.0 <= ddim_eta <= 1.0:
        raise ValueError(f"ddim_eta must lie in [0, 1], got {ddim_eta}")
    sigma2 = ddim_eta**2 * (1.0 - a_next) / (1.0 - a_t) * (1.0 - a_t / a_next)
    x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_next) * x0 + math.sqrt(max(1.0 - a_next - sigma2, 0.0)) * eps


def amdm_update(
    stepped: Latents,
    mu: Latents,
    weights: Sequence[float],
    eta: float | Sequence[float],
    *,
    relative: bool = False,
    slerp: bool = False,
) -> list[torch.Tensor]:
    """One AMDM meeting: aggregate every model's stepped latent, then correct it toward each
    model's own mean. stepped x'_k and mu_k: N (B, C, H, W) each (or (N, B, C, H, W)), the
    specified model first; weights N (see `vp_weights`); eta one per model or one for all
    -> N latents (B, C, H, W), model k's to continue from. With mu = stepped (deterministic
    steps) and weights [1, 0, ...], the specified model's latent comes back unchanged.
    """
    xs, mus = _latent_list(stepped, "stepped"), _latent_list(mu, "mu")
    if len(mus) != len(xs) or mus[0].shape != xs[0].shape:
        got, want = f"{len(mus)} x {tuple(mus[0].shape)}", f"{len(xs)} x {tuple(xs[0].shape)}"
        raise ValueError(f"mu has {got} for stepped {want}; give one mean per model, shaped like its latent")
    etas = [eta] * len(xs) if isinstance(eta, (int, float)) else list(eta)
    if len(etas) != len(xs):
        raise ValueError(f"eta has {len(etas)} entries for {len(xs)} models; give one per model or one float")
    m = (slerp_aggregate if slerp else aggregate)(xs, weights)
    return [manifold_correct(m, mu_k, eta_k, relative=relative) for mu_k, eta_k in zip(mus, etas)]
