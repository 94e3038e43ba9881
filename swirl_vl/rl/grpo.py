"""GRPO math (Shao et al. 2024, as used by SWIRL): group-relative advantages, clipped surrogate, k3 KL.

Pure functions: tensors in, tensors out. Shapes: ``N = B * G`` rollouts ordered group-major (row
``b * G + g``), ``L`` tokens (or denoising steps) per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupAdvantages:
    advantages: Tensor
    """``(N,)`` float32; zero where ``valid`` is False."""
    valid: Tensor
    """``(N,)`` bool: the rollout's group has finite rewards and non-zero spread."""
    frac_zero_std: float
    """Share of groups whose rewards are all equal (no signal)."""
    num_nonfinite_groups: int
    """Groups dropped because a reward was NaN or infinite."""


def group_advantages(
    rewards: Tensor, group_size: int, std_floor: float = 1e-4, zero_std_tol: float = 1e-6, scale: bool = True
) -> GroupAdvantages:
    """``A_k = (r_k - mean_g) / (std_g + std_floor)`` per group of ``group_size`` consecutive rows.

    ``scale=False`` leaves out the division (``A_k = r_k - mean_g``, as Dr. GRPO, Liu et al. 2025): a group whose
    members are all right (or all wrong) but whose rewards still differ a little then gets advantages as small as
    those differences, instead of ±1 of pure noise.

    Computed in float32. Groups with a non-finite reward, or with ``std_g <= zero_std_tol``, carry no
    usable signal: they get advantage 0 and ``valid = False`` so the caller also drops their KL term
    (a std of 1e-4 that should be 0 has produced advantages in the thousands elsewhere).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}; got shape {tuple(rewards.shape)}")
    r = rewards.detach().float().view(-1, group_size)  # (B, G)
    finite = torch.isfinite(r).all(dim=1)  # (B,)
    r = torch.where(finite[:, None], r, torch.zeros_like(r))
    std = r.std(dim=1, unbiased=group_size > 1) if group_size > 1 else torch.zeros(r.shape[0], device=r.device)
    nonzero = std > zero_std_tol
    valid = finite & nonzero
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (std[:, None] + std_floor)
    adv = torch.where(valid[:, None], adv, torch.zeros_like(adv))
    num_finite = int(finite.sum())
    frac_zero_std = float((finite & ~nonzero).sum()) / max(num_finite, 1)
    return GroupAdvantages(
        advantages=adv.reshape(-1),
        valid=valid.repeat_interleave(group_size),
        frac_zero_std=frac_zero_std,
        num_nonfinite_groups=int((~finite).sum()),
    )


def k3_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): ``exp(ref - logp) - (ref - logp) - 1`` (≥ 0), 0 off-mask.

    The log-ratio is masked *before* ``exp``: padding positions can hold ``-inf`` and ``0 * inf`` is
    NaN in the backward pass even when the forward value looks finite.
    """
    d = torch.where(mask, ref_logp - logp, torch.zeros_like(logp))
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float) -> Tensor:
    """Per-token PPO objective to *minimise*: ``-min(ρ A, clip(ρ, 1±ε) A)`` with ``ρ = exp(logp - old)``."""
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


@dataclass
class GRPOLoss:
    loss: Tensor
    """Scalar, token-level normalised (sum over valid tokens / their count)."""
    kl: Tensor
    """Mean per-token KL estimate over valid tokens (detached)."""
    clip_frac: Tensor
    """Share of valid tokens whose ratio was clipped (detached)."""


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    valid: Tensor | None = None,
    kl: Tensor | None = None,
    beta: float = 0.04,
    clip_eps: float = 0.2,
    num_terms: float | None = None,
) -> GRPOLoss:
    """Clipped GRPO loss plus ``beta`` × a per-token KL to the reference, normalised per token over valid tokens.

    Args:
        logp: ``(N, L)`` current log-probs, with grad.
        old_logp: ``(N, L)`` log-probs at sampling time.
        advantages: ``(N,)`` group-relative advantages.
        mask: ``(N, L)`` bool, real tokens / trainable steps.
        valid: ``(N,)`` bool, rows whose group carries signal; others leave both the policy and KL terms.
        kl: ``(N, L)`` per-token KL estimate with grad (``k3_kl`` for tokens, the closed form for diffusion
            steps), or None for no KL term. Positions off the mask are ignored, whatever they hold.
        num_terms: what the sums are divided by (default: this batch's valid tokens). A micro-batch passes the whole
            batch's count, so that the micro-batches' losses (and ``kl``, ``clip_frac``) add up to the batch's.
    """
    assert logp.shape == old_logp.shape == mask.shape, (logp.shape, old_logp.shape, mask.shape)
    assert advantages.shape == (logp.shape[0],), advantages.shape
    m = mask.bool()
    if valid is not None:
        m = m & valid.bool()[:, None]
    per_token = clipped_surrogate(logp, old_logp.detach(), advantages.detach().to(logp.dtype), m, clip_eps)
    if kl is None:
        kl = torch.zeros_like(logp)
    else:
        assert kl.shape == logp.shape, (kl.shape, logp.shape)
        kl = torch.where(m, kl, torch.zeros_like(kl))  # where, not *: an inf off the mask must not reach the grad
        if beta != 0.0:
            per_token = per_token + beta * kl
    n = m.sum().clamp(min=1) if num_terms is None else max(num_terms, 1)
    # Multiplying by the mask (rather than indexing) keeps every parameter in the graph, so a step with
    # no valid token still gives zero grads instead of none (DDP expects the same graph on every rank).
    loss = (per_token * m).sum() / n
    with torch.no_grad():
        ratio = torch.exp(torch.where(m, logp - old_logp, torch.zeros_like(logp)))
        clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)) & m
        clip_frac = clipped.sum() / n
        kl_mean = (kl * m).sum() / n
    return GRPOLoss(loss=loss, kl=kl_mean, clip_frac=clip_frac)
