"""Judge-free sensitivity tests: does each model prefer the true condition to another pair's?

``fwm_action_sensitivity``: ``log P(y | x, z) > log P(y | x, z')`` with ``z'`` another pair's action;
``idm_image_sensitivity``: ``log Q(z | x, y) > log Q(z | x, y')`` with ``y'`` another pair's next state.
The partner of pair ``i`` is pair ``(i + 1) mod B`` (a derangement of the batch); pairs whose partner's
condition equals their own, or whose action is unknown (empty), have no answer and are NaN. Ties count as
failures, so a model that ignores its condition scores 0, not 0.5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from swirl_vl.models.base import ForwardWorldModel, InverseDynamicsModel


def partner_index(batch_size: int) -> Tensor:
    """``(B,)`` index of each pair's partner: roll by one (no pair is its own partner when ``B ≥ 2``)."""
    return torch.arange(batch_size).roll(-1)


def _interleave(a: Tensor, b: Tensor) -> Tensor:
    """``(B, ...)``, ``(B, ...)`` → ``(2B, ...)`` with rows ``a_0, b_0, a_1, b_1, …``."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def _preference(scores: Tensor, valid: Tensor) -> Tensor:
    """``(2B,)`` interleaved (true, other) scores → ``(B,)``: 1 where true > other, 0 where not, NaN where invalid."""
    true, other = scores.float().view(-1, 2).unbind(1)
    won = (true > other).float()
    return torch.where(valid.to(won.device), won, torch.full_like(won, float("nan")))


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run with the global RNG seeded (reproducible ELBO draws), leaving the caller's RNG state untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def fwm_action_sensitivity(fwm: ForwardWorldModel, x: Tensor, z: list[str], y: Tensor, seed: int | None = 0) -> Tensor:
    """``(B,)`` in ``{0, 1, NaN}``: whether ``log P(y | x, z)`` beats ``log P(y | x, z_partner)``.

    ``x``, ``y``: ``(B, 3, H, W)``. The two scores of a pair are computed in one call as a group of 2, so a
    sampled estimate (the diffusion ELBO) uses the same ``(t, ε)`` draws for both and only ``z`` differs.
    """
    partner = partner_index(len(z)).tolist()
    z_other = [z[j] for j in partner]
    valid = torch.tensor([bool(a.strip()) and a.strip().lower() != b.strip().lower() for a, b in zip(z, z_other)])
    if not valid.any():
        return torch.full((len(z),), float("nan"), device=x.device)
    texts = [t for pair in zip(z, z_other) for t in pair]  # (2B,) true, other, true, other, …
    with _seeded(seed, x.device):
        scores = fwm.log_likelihood(_interleave(x, x), texts, _interleave(y, y), group_size=2)
    return _preference(scores, valid)


@torch.no_grad()
def idm_image_sensitivity(idm: InverseDynamicsModel, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
    """``(B,)`` in ``{0, 1, NaN}``: whether ``log Q(z | x, y)`` beats ``log Q(z | x, y_partner)``; ``x``, ``y``:
    ``(B, 3, H, W)``. Pairs whose partner's next state is the same image, or whose action is unknown, are NaN."""
    y_other = y[partner_index(len(z)).to(y.device)]
    same = (y_other == y).flatten(1).all(1).cpu()
    valid = ~same & torch.tensor([bool(a.strip()) for a in z])
    if not valid.any():
        return torch.full((len(z),), float("nan"), device=x.device)
    texts = [a for a in z for _ in range(2)]
    scores = idm.log_likelihood(_interleave(x, x), _interleave(y, y_other), texts)
    return _preference(scores, valid)
