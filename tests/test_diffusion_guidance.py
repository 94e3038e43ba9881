"""Dual classifier-free guidance, conditioning dropout and the closed-form diffusion KL of ``DiffusionFWM``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

from swirl_vl.models.diffusion_fwm import ConditioningDropout, DiffusionFWM
from swirl_vl.models.tiny_diffusion import build_tiny_instruct_pix2pix
from swirl_vl.rl.ddim import gaussian_kl_same_std, gaussian_logprob
from swirl_vl.rl.grpo import k3_kl
from swirl_vl.rl.guidance import dual_guidance

ACTIONS = ["move the red circle left", "add a red square at row 2 column 3"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_instruct_pix2pix(tmp_path_factory.mktemp("guidance") / "tiny", seed=0)


def images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_dual_guidance_hand_computed() -> None:
    text, image, uncond = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0])
    # 1 + 7.5 (3 - 2) + 1.5 (2 - 1) = 10
    assert dual_guidance(text, image, uncond, 7.5, 1.5).item() == pytest.approx(10.0)
    assert dual_guidance(text, image, uncond, 1.0, 1.0).item() == pytest.approx(3.0)  # scales 1: the conditional
    assert dual_guidance(text, image, uncond, 0.0, 0.0).item() == pytest.approx(1.0)  # scales 0: unconditional


def test_gaussian_kl_matches_torch_distributions_per_dimension() -> None:
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0]).view(3, 1, 1, 1)
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).mean(dim=(1, 2, 3))
    assert_close(gaussian_kl_same_std(mean, ref, std), expected)
    assert gaussian_kl_same_std(mean, mean, std).abs().max() == 0


def test_k3_on_dimension_averaged_logprobs_is_far_weaker_than_the_closed_form() -> None:
    # Why diffusion steps get the closed form: one sample's dimension-averaged log-ratio is ~KL, so k3 on it is ~KL²/2.
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 3, 8, 8, generator=g)
    ref = mean + 0.05 * torch.randn(64, 3, 8, 8, generator=g)
    std = torch.full((64, 1, 1, 1), 0.5)
    sample = mean + std * torch.randn(64, 3, 8, 8, generator=g)
    closed = gaussian_kl_same_std(mean, ref, std).mean()
    mask = torch.ones(64, 1, dtype=torch.bool)
    k3 = k3_kl(gaussian_logprob(sample, mean, std)[:, None], gaussian_logprob(sample, ref, std)[:, None], mask).mean()
    assert closed > 50 * k3


def test_guidance_changes_samples_and_scales_one_is_one_branch(tiny_path: Path) -> None:
    x = images(2)
    plain = DiffusionFWM(str(tiny_path), num_inference_steps=3, guidance_scale=1.0, image_guidance_scale=1.0)
    guided = DiffusionFWM(str(tiny_path), num_inference_steps=3, guidance_scale=3.0, image_guidance_scale=1.5)
    a = plain.sample(x, ACTIONS, greedy=True).images
    b = guided.sample(x, ACTIONS, greedy=True).images
    assert (a - b).abs().max() > 1e-3
    # Per-call scales override the model's; as in diffusers' pipeline, a text scale ≤ 1 turns guidance off.
    c = guided.sample(x, ACTIONS, greedy=True, guidance_scale=1.0, image_guidance_scale=1.5).images
    assert_close(a, c)


def test_guided_rollout_is_rescored_exactly_and_the_kl_is_the_closed_form(tiny_path: Path) -> None:
    fwm = DiffusionFWM(str(tiny_path), num_inference_steps=4, guidance_scale=2.0, image_guidance_scale=1.5).eval()
    torch.manual_seed(0)
    rollout = fwm.sample(images(2), ACTIONS, num_samples=2)
    assert rollout.context["guidance"].tolist() == [2.0, 1.5]
    scores = fwm.policy_scores(rollout, reference=fwm)
    # The ratio is 1 before an update: the guided transition is recomputed with the sampler's scales.
    assert_close(scores.logp.detach(), rollout.old_logprobs, rtol=1e-5, atol=1e-5)
    assert scores.kl.abs().max() < 1e-10

    ref = copy.deepcopy(fwm)
    with torch.no_grad():
        for p in fwm.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    scores = fwm.policy_scores(rollout, reference=ref)
    mean, std, _ = fwm.transition_means(rollout)
    ref_mean, _, _ = ref.transition_means(rollout)
    expected = ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3))
    assert_close(scores.kl[rollout.mask], expected.detach(), rtol=1e-4, atol=1e-8)
    assert (scores.kl[~rollout.mask] == 0).all() and (scores.kl[rollout.mask] > 0).all()
    scores.kl.sum().backward()  # the KL has a gradient into the policy, none into the reference
    assert fwm.unet.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ref.parameters())


def test_conditioning_dropout_shares_and_sft_without_conditioning(tiny_path: Path) -> None:
    drop_text, drop_image = ConditioningDropout(0.1, 0.2, 0.3).masks(20000, torch.Generator().manual_seed(0))
    assert (drop_text & ~drop_image).float().mean() == pytest.approx(0.1, abs=0.01)
    assert (drop_image & ~drop_text).float().mean() == pytest.approx(0.2, abs=0.01)
    assert (drop_text & drop_image).float().mean() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="conditioning_dropout"):
        ConditioningDropout(0.5, 0.4, 0.3)

    x, y, z = images(2), images(2, seed=1), ACTIONS
    # Everything dropped: the loss no longer depends on the instruction or the source image.
    fwm = DiffusionFWM(str(tiny_path), conditioning_dropout=ConditioningDropout(text=0.0, image=0.0, both=1.0))
    fwm.train()
    torch.manual_seed(0)
    a = fwm.sft_loss(x, z, y)
    torch.manual_seed(0)
    b = fwm.sft_loss(images(2, seed=5), ["remove the green triangle"] * 2, y)
    assert_close(a, b)
    fwm.eval()  # no dropout outside training
    torch.manual_seed(0)
    c = fwm.sft_loss(x, z, y)
    torch.manual_seed(0)
    d = fwm.sft_loss(images(2, seed=5), ["remove the green triangle"] * 2, y)
    assert (c - d).abs() > 1e-6


def test_nft_optimality_and_loss_gradient_is_advantage_weighted_denoising() -> None:
    from swirl_vl.rl.nft import nft_loss, optimality

    assert_close(optimality(torch.tensor([-10.0, -2.5, 0.0, 5.0]), 5.0), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    g = torch.Generator().manual_seed(0)
    x0, pred = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g).requires_grad_()
    r = torch.tensor([1.0, 0.5, 0.0])
    nft_loss(pred, pred.detach(), x0, r, beta=0.5).sum().backward()
    # On-policy (old = current): the gradient is (2r − 1) × that of the adaptively weighted denoising error.
    weight = (pred.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (2 * r - 1).view(3, 1, 1, 1) * 2 * (pred.detach() - x0) / weight / x0[0].numel()
    assert_close(pred.grad, expected)
    assert pred.grad[1].abs().max() < 1e-7  # no preference, no update (up to rounding)


def test_forward_process_objective_trains_a_diffusion_fwm_only(tiny_path: Path) -> None:
    from swirl_vl.models.token_fwm import TokenFWM
    from swirl_vl.training.objectives import ForwardProcess

    objective = ForwardProcess(nft_beta=1.0)
    fwm = DiffusionFWM(str(tiny_path), num_inference_steps=3).eval()
    torch.manual_seed(0)
    rollout = fwm.sample(images(2), ACTIONS, num_samples=2, eta=0.0)  # any sampler: no step densities needed
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])  # the second group has no spread: left out
    out = objective(fwm, copy.deepcopy(fwm), rollout, rewards, beta=0.1)
    out.loss.backward()
    assert out.advantages.valid.tolist() == [True, True, False, False]
    assert torch.isfinite(out.loss) and out.kl == 0  # the reference is the policy itself
    assert fwm.unet.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fwm_objective ForwardProcess needs a diffusion FWM"):
        objective.check(TokenFWM.__new__(TokenFWM))
