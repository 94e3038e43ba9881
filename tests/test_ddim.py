"""The DDIM step log-prob: closed forms, hand-computed σ_t, parity with diffusers, exact re-scoring."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from swirl_vl.rl.ddim import ddim_alphas, ddim_std, ddim_step_mean_std, ddim_step_with_logprob, gaussian_logprob


def small_scheduler(**kwargs) -> DDIMScheduler:
    """Four training steps with β = 0.1, 0.2, 0.3, 0.4, so ᾱ = 0.9, 0.72, 0.504, 0.3024; two inference steps (2, 0)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4], clip_sample=False, set_alpha_to_one=True, **kwargs
    )
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [2, 0]
    return scheduler


def test_std_matches_ddim_variance_by_hand() -> None:
    scheduler = small_scheduler()
    alpha_t, alpha_prev = ddim_alphas(scheduler, torch.tensor([2]), torch.tensor([0]))
    assert_close(alpha_t, torch.tensor([0.504]))
    assert_close(alpha_prev, torch.tensor([0.9]))
    # σ² = (1 − 0.9)/(1 − 0.504) · (1 − 0.504/0.9) = 0.1/0.496 · 0.44 = 0.0887097
    assert_close(ddim_std(alpha_t, alpha_prev, eta=1.0), torch.tensor([math.sqrt(0.0887097)]))
    assert_close(ddim_std(alpha_t, alpha_prev, eta=0.5), torch.tensor([0.5 * math.sqrt(0.0887097)]))
    # The last step lands on ᾱ = 1 (set_alpha_to_one): σ = 0, the density is degenerate.
    alpha_t, alpha_prev = ddim_alphas(scheduler, torch.tensor([0]), torch.tensor([-2]))
    assert_close(alpha_prev, torch.tensor([1.0]))
    assert ddim_std(alpha_t, alpha_prev, eta=1.0).item() == 0.0


def test_logprob_is_the_closed_form_gaussian() -> None:
    scheduler = small_scheduler()
    gen = torch.Generator().manual_seed(0)
    eps, x_t = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    prev, logprob = ddim_step_with_logprob(scheduler, eps, 2, x_t, eta=1.0, generator=gen)

    # Hand-built mean and σ (DDIM eq. 12 and 16) with ᾱ_t = 0.504, ᾱ_prev = 0.9.
    var = 0.1 / 0.496 * (1 - 0.504 / 0.9)
    x0 = (x_t - math.sqrt(1 - 0.504) * eps) / math.sqrt(0.504)
    mean = math.sqrt(0.9) * x0 + math.sqrt(1 - 0.9 - var) * eps
    expected = torch.distributions.Normal(mean, math.sqrt(var)).log_prob(prev).mean(dim=(1, 2, 3))
    assert logprob.shape == (3,)
    assert_close(logprob, expected)
    assert_close(gaussian_logprob(prev, mean, torch.tensor(math.sqrt(var))), expected)


def test_matches_diffusers_step_given_the_same_noise() -> None:
    scheduler = small_scheduler()
    eps, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for eta in (1.0, 0.3):
        noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        upstream = scheduler.step(eps, 2, x_t, eta=eta, variance_noise=noise).prev_sample
        ours, _ = ddim_step_with_logprob(scheduler, eps, 2, x_t, eta, generator=torch.Generator().manual_seed(1))
        assert_close(ours, upstream)


def test_eta_zero_is_deterministic_ddim_with_a_finite_floored_density() -> None:
    scheduler = small_scheduler()
    eps, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ours, logprob = ddim_step_with_logprob(scheduler, eps, 2, x_t, eta=0.0)
    assert_close(ours, scheduler.step(eps, 2, x_t, eta=0.0).prev_sample)
    mean, std = ddim_step_mean_std(scheduler, eps, 2, x_t, eta=0.0)
    assert torch.equal(ours, mean) and (std == 0).all()
    # σ = 0: no density. The floor keeps the value finite (−log σ_min − log √2π) so a mask can drop it safely.
    assert torch.isfinite(logprob).all()
    assert_close(logprob, torch.full((2,), -math.log(1e-6) - 0.5 * math.log(2 * math.pi)))


def test_rescoring_a_recorded_sample_gives_the_recorded_logprob_exactly() -> None:
    scheduler = small_scheduler()
    eps, x_t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    prev, logprob = ddim_step_with_logprob(scheduler, eps, 2, x_t, eta=1.0)
    again, rescored = ddim_step_with_logprob(scheduler, eps, 2, x_t, eta=1.0, prev_sample=prev)
    assert torch.equal(again, prev)
    assert torch.equal(rescored, logprob)
    # Another prediction scores the same sample lower on average: it is not where the sample came from.
    _, other = ddim_step_with_logprob(scheduler, eps + 0.5, 2, x_t, eta=1.0, prev_sample=prev)
    assert (other < logprob).all()


def test_per_row_timesteps_match_scalar_steps() -> None:
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    eps, x_t, prev = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, t_prev = torch.tensor([999, 499]), torch.tensor([899, 399])
    _, batched = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, prev_sample=prev, prev_timestep=t_prev)
    for i in range(2):
        _, single = ddim_step_with_logprob(scheduler, eps[i : i + 1], int(t[i]), x_t[i : i + 1], 1.0, prev[i : i + 1])
        assert_close(batched[i : i + 1], single)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_gradient_reaches_the_model_output_not_the_sample(prediction_type: str) -> None:
    scheduler = small_scheduler(prediction_type=prediction_type)
    out = torch.randn(2, 3, 4, 4, requires_grad=True)
    prev, logprob = ddim_step_with_logprob(scheduler, out, 2, torch.randn(2, 3, 4, 4), eta=1.0)
    assert not prev.requires_grad
    logprob.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0
