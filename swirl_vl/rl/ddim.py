"""One stochastic DDIM step (η > 0) that also returns the log-density of the sample it produces.

Patches ``DDIMScheduler.step`` from diffusers 0.42 (``diffusers/schedulers/scheduling_ddim.py``, DDIM paper
arXiv 2010.02502 eqs. 12 and 16), as ddpo-pytorch's ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`` patches
an older diffusers. What changed from upstream ``step``:

- it returns the Gaussian log-density of ``prev_sample`` under the step's transition ``N(mean, σ_t² I)``,
  averaged over every non-batch dimension, shape ``(B,)`` (each denoising step is one "token" of the policy);
- it takes an optional ``prev_sample`` (to re-score a recorded transition under other weights) instead of
  ``variance_noise``;
- ``timestep`` (and ``prev_timestep``) may be per-row tensors ``(B,)``, so that steps from different places of
  different trajectories are scored in one batch;
- the density uses ``max(σ_t, min_std)``: the last step of a DDIM schedule has σ_t = 0 (or nearly), where the
  density is degenerate; flooring keeps the value finite so that masking it out can never produce ``0 * inf``.

Pure math: no weights, no I/O. The scheduler is read (``alphas_cumprod``, ``config``), never mutated.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from torch import Tensor

MIN_STD = 1e-6
"""Floor on σ_t inside the log-density (never in sampling): keeps the degenerate last step finite."""


def _as_rows(t: Tensor | int, batch: int, device: torch.device) -> Tensor:
    """A scalar or ``(B,)`` timestep as a ``(B,)`` long tensor on ``device``."""
    t = torch.as_tensor(t, device=device).long()
    return t.expand(batch) if t.ndim == 0 else t


def _left_broadcast(v: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` → ``(B, 1, ..., 1)`` with ``like.ndim`` dims."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def default_prev_timestep(scheduler: DDIMScheduler, timestep: Tensor | int) -> Tensor | int:
    """Upstream's rule: ``t - num_train_timesteps // num_inference_steps`` (needs ``set_timesteps`` first)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) or pass prev_timestep explicitly")
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def ddim_alphas(scheduler: DDIMScheduler, timestep: Tensor, prev_timestep: Tensor) -> tuple[Tensor, Tensor]:
    """``(ᾱ_t, ᾱ_{t_prev})``, each ``(B,)`` float32; a negative ``prev_timestep`` means the final (clean) step."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timestep.device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=timestep.device, dtype=torch.float32)
    alpha_t = alphas_cumprod[timestep]
    alpha_prev = torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_std(alpha_t: Tensor, alpha_prev: Tensor, eta: float) -> Tensor:
    """σ_t(η) of DDIM eq. 16: ``η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)``."""
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    # Rounding can make a zero variance slightly negative; sqrt would then return NaN.
    return eta * variance.clamp(min=0).sqrt()


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std²)`` averaged over every non-batch dimension: ``(B, ...)`` → ``(B,)``."""
    std = std.clamp(min=MIN_STD)
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def predicted_x0_eps(
    scheduler: DDIMScheduler, model_output: Tensor, alpha_t: Tensor, sample: Tensor
) -> tuple[Tensor, Tensor]:
    """``(x̂_0, ε̂)`` from the network's output at ``x_t`` (eq. 12), for any ``prediction_type``; ``alpha_t`` is ᾱ_t
    broadcastable to ``sample``. x̂_0 is clipped or thresholded as upstream's ``step`` does (ε is not re-derived:
    upstream's ``use_clipped_model_output=False``)."""
    beta_t = 1 - alpha_t
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if scheduler.config.thresholding:
        pred_x0 = scheduler._threshold_sample(pred_x0)
    elif scheduler.config.clip_sample:
        pred_x0 = pred_x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return pred_x0, pred_eps


def ddim_step_mean_std(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    eta: float,
    prev_timestep: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean ``(B, C, h, w)`` and σ_t ``(B, 1, 1, 1)`` of the DDIM transition ``x_t → x_{t_prev}``."""
    batch, device = sample.shape[0], sample.device
    if prev_timestep is None:
        prev_timestep = default_prev_timestep(scheduler, timestep)
    # 1. current and previous step, one per row
    t = _as_rows(timestep, batch, device)
    t_prev = _as_rows(prev_timestep, batch, device)

    # 2. alphas and betas
    alpha_t, alpha_prev = ddim_alphas(scheduler, t, t_prev)
    alpha_t, alpha_prev = _left_broadcast(alpha_t, sample), _left_broadcast(alpha_prev, sample)

    # 3.–4. predicted x_0 and ε (eq. 12), whatever the network predicts; x_0 clipped or thresholded as upstream
    pred_x0, pred_eps = predicted_x0_eps(scheduler, model_output, alpha_t, sample)

    # 5. σ_t(η) (eq. 16)
    std = ddim_std(alpha_t, alpha_prev, eta)

    # 6. direction pointing to x_t (eq. 12); clamp guards rounding below zero when η = 1
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps

    # 7. mean of x_{t_prev} (eq. 12 without the noise term)
    mean = alpha_prev.sqrt() * pred_x0 + direction
    return mean.to(sample.dtype), std.to(sample.dtype)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_timestep: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step ``x_t → x_{t_prev}`` with its log-density.

    Args:
        scheduler: holds ``alphas_cumprod`` and the prediction type; ``set_timesteps`` must have been called
            unless ``prev_timestep`` is given.
        model_output: network prediction ``(B, C, h, w)`` (ε, x_0 or v per ``scheduler.config.prediction_type``).
        timestep: ``t``, a scalar or ``(B,)``.
        sample: ``x_t`` ``(B, C, h, w)``.
        eta: η of eq. 16; 1 gives DDPM's posterior variance, 0 the deterministic DDIM (degenerate density).
        prev_sample: a recorded ``x_{t_prev}`` to score; sampled (with ``generator``) when ``None``.
        prev_timestep: ``t_prev``, scalar or ``(B,)``, negative for the final step; upstream's rule when ``None``.

    Returns:
        ``prev_sample`` ``(B, C, h, w)`` (detached when given) and its log-density ``(B,)``, mean over dimensions.
    """
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta, prev_timestep)
    if prev_sample is None:
        # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
        noise_device = sample.device if generator is None else generator.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=sample.dtype)
        prev_sample = mean + std * noise.to(sample.device)
    # The sample is data, not a function of the weights: only the mean carries the policy gradient.
    prev_sample = prev_sample.detach()
    return prev_sample, gaussian_logprob(prev_sample, mean, std)


def gaussian_kl_same_std(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """Closed-form ``KL(N(mean, σ²I) ‖ N(ref_mean, σ²I))`` per dimension, averaged as ``gaussian_logprob`` is.

    ``‖mean − ref_mean‖² / (2σ²)`` over the ``D`` non-batch dimensions, divided by ``D``: ``(B, ...)`` → ``(B,)``.
    Flow-GRPO's KL between two transitions of one sampler (same σ_t). The k3 estimator applied to the
    dimension-averaged log-prob of one sample would instead give about ``KL / D²`` in value and a far weaker,
    noisier gradient.
    """
    std = std.clamp(min=MIN_STD)
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
