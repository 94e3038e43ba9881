"""Policy objectives of the GRPO phases: how a rollout batch and its rewards become the training model's loss.

Chosen by ``class_path`` (``--model.init_args.fwm_objective``); Phase II always uses ``GRPO``.

- ``GRPO``: group-relative advantages, clipped ratio surrogate on per-token (or per-denoising-step) log-probs, and
  the policy's own KL estimate to the reference (k3 for tokens, the closed-form Gaussian for DDIM steps).
- ``ForwardProcess``: DiffusionNFT's forward-process objective for diffusion FWMs (``swirl_vl.rl.nft``):
  reward-weighted denoising of the rollouts' own samples, no step log-probs, no guidance at training time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from swirl_vl.models.base import GRPOPolicy, Rollout
from swirl_vl.rl.grpo import GroupAdvantages, group_advantages, grpo_loss
from swirl_vl.rl.nft import nft_loss, optimality


@dataclass
class ObjectiveOutput:
    loss: Tensor
    """Scalar to minimise, with grad."""
    kl: Tensor
    """Mean KL-to-reference term over the trained positions (detached; 0 without a reference)."""
    clip_frac: Tensor
    """Share of trained positions whose ratio was clipped (detached; 0 where no ratio is used)."""
    advantages: GroupAdvantages
    logprobs: Tensor | None = None
    """``(N, L)`` the policy's log-probs of the rollout in this pass (detached): the old log-probs of later passes."""


class PolicyObjective(ABC):
    """Turns ``rewards (N,)`` of a group-major rollout batch into a loss for ``policy``.

    A batch may be split into micro-batches of whole groups: each call then gets ``num_terms``, the whole batch's
    ``num_terms(...)`` summed, so that the micro-batches' losses add up to the loss of the batch in one piece.
    """

    @abstractmethod
    def __call__(
        self,
        policy: GRPOPolicy,
        reference: Any | None,
        rollout: Rollout,
        rewards: Tensor,
        beta: float,
        old_logprobs: Tensor | None = None,
        num_terms: float | None = None,
    ) -> ObjectiveOutput:
        """``reference``: the frozen KL reference (a copy or ``LoraReference``), or None; ``beta``: the KL weight.

        ``old_logprobs``: ``(N, L)`` log-probs of the policy that sampled, for a second or later update on the same
        rollouts (the ``logprobs`` of the first); None in the first update, whose weights are the sampling ones.
        """

    @abstractmethod
    def num_terms(self, rollout: Rollout, rewards: Tensor) -> int:
        """How many terms the loss of this rollout batch averages over."""

    def check(self, policy: GRPOPolicy) -> None:  # noqa: B027 - optional hook, most objectives suit every policy
        """Raise a clear error now, not at the first update, if ``policy`` cannot be trained by this objective."""


class GRPO(PolicyObjective):
    """Clipped GRPO (Shao et al. 2024) with the policy's KL estimate to the reference, as SWIRL's phases use it.

    Args:
        clip_eps: PPO ratio clip ε.
        scale_advantages: divide advantages by the group's reward std (GRPO); False: ``r − mean`` (Dr. GRPO).
    """

    def __init__(self, clip_eps: float = 0.2, scale_advantages: bool = True) -> None:
        self.clip_eps, self.scale_advantages = clip_eps, scale_advantages

    def num_terms(self, rollout: Rollout, rewards: Tensor) -> int:
        valid = group_advantages(rewards, rollout.group_size).valid.to(rollout.mask.device)
        return int((rollout.mask.bool() & valid[:, None]).sum())

    def __call__(
        self,
        policy: GRPOPolicy,
        reference: Any | None,
        rollout: Rollout,
        rewards: Tensor,
        beta: float,
        old_logprobs: Tensor | None = None,
        num_terms: float | None = None,
    ) -> ObjectiveOutput:
        adv = group_advantages(rewards, rollout.group_size, scale=self.scale_advantages)
        scores = policy.policy_scores(rollout, reference if beta > 0 else None)
        # First update on these rollouts: the weights are the sampling ones, so the ratio's denominator is the
        # policy's own log-probs, detached (as TRL with one update per generation; no second forward pass).
        old = scores.logp.detach() if old_logprobs is None else old_logprobs
        assert scores.logp.shape == old.shape == rollout.mask.shape, (scores.logp.shape, old.shape)
        out = grpo_loss(
            scores.logp,
            old,
            adv.advantages.to(scores.logp.device),
            scores.mask,
            adv.valid,
            scores.kl,
            beta,
            self.clip_eps,
            num_terms,
        )
        return ObjectiveOutput(out.loss, out.kl, out.clip_frac, adv, scores.logp.detach())


class ForwardProcess(PolicyObjective):
    """DiffusionNFT (Zheng et al. 2025): the FWM denoises its own rollouts, toward the better-rewarded ones.

    Each rollout's clean sample is noised at one random ``t``; the loss is ``nft_loss`` scaled by ``adv_clip_max``
    as upstream, plus ``beta`` × the mean squared difference of the policy's and the reference's x_0 predictions
    at the same ``(x_t, t)``. Rows of zero-variance groups are left out. The rollouts may come from any sampler
    (``fwm_generation: {"eta": 0.0}`` gives deterministic DDIM from random noise): no step log-probs are needed.

    Args:
        nft_beta: step ``β`` of the implicit positive and negative policies (upstream: 1.0 or 0.1).
        adv_clip_max: advantages are clipped to ``±adv_clip_max`` before they become the optimality ``r``.
    """

    def __init__(self, nft_beta: float = 1.0, adv_clip_max: float = 5.0) -> None:
        if nft_beta <= 0 or adv_clip_max <= 0:
            raise ValueError(f"nft_beta ({nft_beta}) and adv_clip_max ({adv_clip_max}) must be > 0")
        self.nft_beta, self.adv_clip_max = nft_beta, adv_clip_max

    def check(self, policy: GRPOPolicy) -> None:
        if not hasattr(policy, "denoised_x0"):
            raise ValueError(
                f"--model.init_args.fwm_objective ForwardProcess needs a diffusion FWM; got {type(policy).__name__}"
            )

    def num_terms(self, rollout: Rollout, rewards: Tensor) -> int:
        return int(group_advantages(rewards, rollout.group_size).valid.sum())

    def __call__(
        self,
        policy: GRPOPolicy,
        reference: Any | None,
        rollout: Rollout,
        rewards: Tensor,
        beta: float,
        old_logprobs: Tensor | None = None,
        num_terms: float | None = None,
    ) -> ObjectiveOutput:
        if old_logprobs is not None:
            raise ValueError(
                "ForwardProcess makes one update per rollout batch (--model.init_args.updates_per_rollout 1)"
            )
        adv = group_advantages(rewards, rollout.group_size)
        noised = policy.renoise_rollouts(rollout)
        x0_pred = policy.denoised_x0(rollout, noised)  # (N, C, h, w), with grad
        r = optimality(adv.advantages, self.adv_clip_max).to(x0_pred)
        # One update per rollout batch: the sampling-time policy is the current one, detached.
        per_row = nft_loss(x0_pred, x0_pred.detach(), noised["x0"], r, self.nft_beta) * self.adv_clip_max  # (N,)
        kl = torch.zeros_like(per_row)
        if reference is not None and beta > 0:
            with torch.no_grad():
                x0_ref = reference.denoised_x0(rollout, noised)
            kl = ((x0_pred - x0_ref) ** 2).mean(dim=tuple(range(1, x0_pred.ndim)))
        valid = adv.valid.to(per_row)
        n = valid.sum().clamp(min=1) if num_terms is None else max(num_terms, 1)
        # Multiplying by the mask keeps every parameter in the graph (zero grads, not none, under DDP).
        loss = ((per_row + beta * kl) * valid).sum() / n
        return ObjectiveOutput(loss, (kl.detach() * valid).sum() / n, torch.zeros(()), adv)
