"""Forward-process policy optimisation for diffusion models (DiffusionNFT, Zheng et al. 2025).

Follows ``scripts/train_nft_sd3.py`` of github.com/NVlabs/DiffusionNFT. Instead of the log-density of each
reverse step (GRPO on DDIM steps), the policy is trained by denoising its own samples: each rollout's clean
sample ``x_0`` is noised again at a random ``t`` and the network's prediction is pulled toward it through an implicit
*positive* policy ``β·θ + (1 − β)·old`` and away through an implicit *negative* one ``(1 + β)·old − β·θ``, weighted by
the optimality ``r ∈ [0, 1]`` of the rollout's reward. Sampler-agnostic (no step log-probs, no σ_t) and free of
guidance at training time. What changed from upstream:

- predictions are compared in x_0 space for every ``prediction_type`` (upstream converts its flow velocity to x_0);
  x_0 is affine in the network output at fixed ``(x_t, t)``, so the implicit policies combine x_0 predictions alike;
- the optimality comes from GRPO's group-relative advantages (upstream: per-prompt reward statistics), clipped
  at ``adv_clip_max``; rows of zero-variance groups are left out, as in GRPO.

Pure math: tensors in, tensors out.
"""

from __future__ import annotations

from torch import Tensor


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """``r = clip(A, ±A_max) / A_max / 2 + 1/2``: ``(N,)`` advantages → ``(N,)`` in ``[0, 1]`` (0.5: no preference)."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)


def nft_loss(x0_pred: Tensor, x0_old: Tensor, x0: Tensor, r: Tensor, beta: float) -> Tensor:
    """Per-row DiffusionNFT loss ``(N,)``: ``[r·‖x̂₊ − x_0‖²/w₊ + (1 − r)·‖x̂₋ − x_0‖²/w₋] / β``, means over dimensions.

    Args:
        x0_pred: ``(N, C, h, w)`` the policy's x_0 prediction at ``(x_t, t)``, with grad.
        x0_old: the same under the sampling-time policy (detached); with one update per rollout batch it equals
            ``x0_pred.detach()`` and the loss's gradient is ``(2r − 1)`` times that of a denoising loss.
        x0: the rollout's clean sample, the regression target.
        r: ``(N,)`` optimality in ``[0, 1]``.
        beta: the implicit policies' step ``β`` (upstream: 1 or 0.1).

    ``w₊``, ``w₋`` are upstream's adaptive weights: the mean absolute x_0 error of each implicit policy (detached,
    floored at 1e-5), which makes the loss scale-free across timesteps.
    """
    x0_old = x0_old.detach()
    dims = tuple(range(1, x0.ndim))
    positive = beta * x0_pred + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_pred
    w_pos = (positive - x0).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-5)
    w_neg = (negative - x0).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-5)
    positive_loss = ((positive - x0) ** 2 / w_pos).mean(dim=dims)
    negative_loss = ((negative - x0) ** 2 / w_neg).mean(dim=dims)
    return (r * positive_loss + (1 - r) * negative_loss) / beta
