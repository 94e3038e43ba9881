"""Sprite-world stand-ins for the FWM and IDM whose every metric has a known answer (no weights).

``OracleFWM`` acts out an action exactly and scores ``y`` 0 when it is that outcome, -1 otherwise; ``OracleIDM``
names the action that explains a transition. ``blind=True`` makes each ignore its condition (constant scores).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from datamodules import sprites
from datamodules.shards import DecodedTrajectory
from swirl_vl.models.base import ForwardWorldModel, InverseDynamicsModel, Rollout
from swirl_vl.models.vq import render_tensor


def _rollout(images: Tensor | None = None, texts: list[str] | None = None) -> Rollout:
    n = len(texts) if texts is not None else images.shape[0]
    return Rollout(1, torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool), images=images, texts=texts)


def act(image: Tensor, action: str) -> Tensor:
    """``(3, 32, 32)``: the rendered outcome of ``action`` on the parsed image (unchanged if it is invalid)."""
    state = sprites.parse(image)
    return render_tensor(sprites.apply(state, action) or state).to(image)


class OracleFWM(ForwardWorldModel):
    image_size = 32

    def __init__(self, blind: bool = False) -> None:
        super().__init__()
        self.blind = blind
        self.inputs: list[Tensor] = []
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so Lightning has something to place

    def sample(self, x: Tensor, z: list[str], num_samples: int = 1, greedy: bool = False, **gen) -> Rollout:
        self.inputs.append(x.clone())
        return _rollout(images=torch.stack([act(img, a) for img, a in zip(x, z)]))

    def log_likelihood(self, x: Tensor, z: list[str], y: Tensor, group_size: int = 1) -> Tensor:
        if self.blind:
            return torch.zeros(len(z))
        return torch.tensor([0.0 if torch.equal(act(i, a), t) else -1.0 for i, a, t in zip(x, z, y)])

    def sft_loss(self, x: Tensor, z: list[str], y: Tensor) -> Tensor:
        raise NotImplementedError("an oracle does not train")

    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("an oracle does not train")

    def save_pretrained(self, path: str | Path) -> None:
        raise NotImplementedError("an oracle has no weights")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OracleFWM:
        raise NotImplementedError("an oracle has no weights")


class OracleIDM(InverseDynamicsModel):
    image_size = 32

    def __init__(self, blind: bool = False) -> None:
        super().__init__()
        self.blind = blind
        self.anchor = nn.Parameter(torch.zeros(()))

    def sample(self, x: Tensor, y: Tensor, num_samples: int = 1, greedy: bool = False, **gen) -> Rollout:
        texts = []
        for a, b in zip(x, y):
            before, after = sprites.parse(a), sprites.parse(b)
            texts.append(next((z for z in sprites.valid_actions(before) if sprites.apply(before, z) == after), ""))
        return _rollout(texts=texts)

    def log_likelihood(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        if self.blind:
            return torch.zeros(len(z))
        return torch.tensor([0.0 if torch.equal(act(i, a), t) else -1.0 for i, t, a in zip(x, y, z)])

    def sft_loss(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        raise NotImplementedError("an oracle does not train")

    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("an oracle does not train")

    def save_pretrained(self, path: str | Path) -> None:
        raise NotImplementedError("an oracle has no weights")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OracleIDM:
        raise NotImplementedError("an oracle has no weights")


def sprite_trajectories(n: int, length: int, seed: int = 0) -> list[DecodedTrajectory]:
    """``n`` random sprite trajectories of ``length`` states, as the DataModule decodes them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        states, actions = sprites.random_trajectory(rng, length)
        meta = {
            "task": "mixed",
            "tasks": [sprites.action_type(a) for a in actions],
            "states": [s.to_json() for s in states],
        }
        out.append(DecodedTrajectory(f"t{i}", torch.stack([render_tensor(s) for s in states]), list(actions), meta))
    return out


def sprite_batch(n: int, seed: int = 0) -> dict:
    """A pair batch of ``n`` one-step transitions (the DataModule's layout)."""
    trajs = sprite_trajectories(n, 2, seed)
    return {
        "x": torch.stack([t.images[0] for t in trajs]),
        "y": torch.stack([t.images[1] for t in trajs]),
        "action": [t.actions[0] for t in trajs],
        "task": [t.task_at(0) for t in trajs],
    }


def sprite_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` labelled one-step transitions rendered directly: x, y ``(n, 3, 32, 32)`` and the actions."""
    rng = random.Random(seed)
    xs, ys, zs = [], [], []
    for _ in range(n):
        states, actions = sprites.random_trajectory(rng, 2)
        xs.append(render_tensor(states[0]))
        ys.append(render_tensor(states[1]))
        zs.append(actions[0])
    return torch.stack(xs), torch.stack(ys), zs


def sft_loss_after(model: nn.Module, loss: Callable[[], Tensor], steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """``loss()`` before and after ``steps`` AdamW steps on ``model``'s trainable parameters (a model learns)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = loss().item()
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    return first, loss().item()
