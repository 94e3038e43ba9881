import math

import pytest
import torch

from swirl_vl.rl.grpo import clipped_surrogate, group_advantages, grpo_loss, k3_kl


def test_group_advantages_hand_computed():
    # Group 1: rewards 1, 2, 3 -> mean 2, unbiased std 1 -> A = (-1, 0, 1) / (1 + 1e-4).
    # Group 2: all equal -> no signal, masked out.
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    out = group_advantages(r, group_size=3)
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4)
    torch.testing.assert_close(out.advantages[:3], expected)
    assert out.advantages[3:].eq(0).all()
    assert out.valid.tolist() == [True] * 3 + [False] * 3
    assert out.frac_zero_std == pytest.approx(0.5)
    assert out.advantages.dtype == torch.float32


def test_group_advantages_half_precision_and_tiny_spread_do_not_explode():
    # bf16 rewards that differ only by rounding must not become advantages in the thousands.
    r = torch.tensor([-3.0, -3.0, -3.0, -3.0], dtype=torch.bfloat16)
    out = group_advantages(r, group_size=4)
    assert out.advantages.abs().max() == 0
    assert not out.valid.any()


def test_nonfinite_reward_drops_its_group_and_is_counted():
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0, 2.0, 3.0])
    out = group_advantages(r, group_size=3)
    assert out.num_nonfinite_groups == 1
    assert out.valid.tolist() == [False] * 3 + [True] * 3
    assert torch.isfinite(out.advantages).all()


def test_group_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match="G=4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_k3_kl_closed_form_and_masking():
    logp = torch.tensor([[math.log(0.5), -float("inf")]])
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    mask = torch.tensor([[True, False]])
    kl = k3_kl(logp, ref, mask)
    d = math.log(0.25) - math.log(0.5)
    assert kl[0, 0].item() == pytest.approx(math.exp(d) - d - 1)
    assert kl[0, 1].item() == 0.0


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(2, 1, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    out = clipped_surrogate(logp, old, adv, mask, clip_eps=0.2)
    # A>0, ρ=1.5: min(1.5, 1.2) = 1.2.  A<0, ρ=0.5: min(-0.5, -0.8) = -0.8.
    torch.testing.assert_close(out, torch.tensor([[-1.2], [0.8]]))


def test_grpo_loss_value_kl_and_clip_frac():
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]])).requires_grad_()
    old = torch.zeros(2, 2)
    ref = torch.zeros(2, 2)
    mask = torch.tensor([[True, False], [True, True]])
    adv = torch.tensor([1.0, -1.0])
    out = grpo_loss(logp, old, adv, mask, kl=k3_kl(logp, ref, mask), beta=0.1, clip_eps=0.2)
    surrogate = torch.tensor([-1.2, 0.8, 1.0])  # valid tokens: (0,0), (1,0), (1,1)
    kl = torch.tensor([1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1, 0.0])
    assert out.loss.item() == pytest.approx(((surrogate + 0.1 * kl).sum() / 3).item(), rel=1e-6)
    assert out.kl.item() == pytest.approx((kl.sum() / 3).item(), rel=1e-6)
    assert out.clip_frac.item() == pytest.approx(2 / 3)
    out.loss.backward()
    assert logp.grad[0, 1] == 0  # masked token gets no gradient


def test_grpo_loss_ignores_invalid_rows_and_padding_inf_gives_finite_grad():
    logp = torch.tensor([[-1.0, -float("inf")], [-2.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -float("inf")], [-2.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    valid = torch.tensor([True, False])
    out = grpo_loss(logp, old, torch.tensor([2.0, 5.0]), mask, valid=valid, kl=k3_kl(logp, old, mask), beta=0.04)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1].eq(0).all()  # invalid group: neither policy nor KL term
    # ratio 1 at the first step: gradient of -ρA w.r.t. logp is -A, normalised by 1 valid token.
    assert logp.grad[0, 0].item() == pytest.approx(-2.0)


def test_grpo_loss_with_no_valid_token_is_zero_with_grad():
    logp = torch.zeros(2, 3, requires_grad=True)
    out = grpo_loss(
        logp, logp.detach(), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), valid=torch.zeros(2, dtype=torch.bool)
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert logp.grad is not None and logp.grad.eq(0).all()


def test_unscaled_advantages_keep_the_reward_scale():
    rewards = torch.tensor([-0.01, -0.03, -2.0, -4.0])  # group 1: all right, judge noise; group 2: real spread
    scaled = group_advantages(rewards, 2).advantages
    plain = group_advantages(rewards, 2, scale=False).advantages
    torch.testing.assert_close(plain, torch.tensor([0.01, -0.01, 1.0, -1.0]))
    # With scaling, the noise group gets the same ±0.707 as the informative one.
    torch.testing.assert_close(scaled[:2].abs(), scaled[2:].abs(), atol=1e-2, rtol=0)


def test_a_groups_repeated_rollouts_get_one_reward_pass_between_them() -> None:
    from swirl_vl.training.swirl import rollout_keys, scored_once

    images = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # two groups of 3: group 0 drew images 0, 1, 0; group 1 drew image 0 three times (a repeat across groups
    # belongs to another prompt and is scored again)
    drawn = images[[0, 1, 0, 0, 0, 0]]
    texts = ["a", "b", "a", "c", "c", "c"]
    scored: list[int] = []

    def score(batch: torch.Tensor, words: list[str]) -> torch.Tensor:
        scored.append(len(batch))
        return batch.flatten(1).sum(1) + torch.tensor([ord(w) for w in words], dtype=torch.float)

    keys = rollout_keys(drawn, group_size=3)
    assert keys[0] == keys[2] and keys[0] != keys[3] and len(set(keys)) == 3
    rewards = scored_once(score, keys, drawn, texts)
    assert scored == [3]
    torch.testing.assert_close(rewards, drawn.flatten(1).sum(1) + torch.tensor([97.0, 98, 97, 99, 99, 99]))
    scored_once(score, rollout_keys(images, group_size=1), images, texts[:3])
    assert scored == [3, 3]  # nothing repeated: one pass over every row
