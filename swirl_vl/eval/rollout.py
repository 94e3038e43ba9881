"""Multi-turn rollouts: the FWM acts out a trajectory's actions on its own outputs, scored turn by turn.

Turn ``k`` (1-based) is the FWM's greedy image after ``k`` actions, each predicted from the previous
prediction (turn 1 from the true first state), against the true state ``k``. Errors compound, so the
per-turn curve shows how far the model can be trusted as a simulator; ``turn_1`` equals the single-step
metrics on the first pair of each trajectory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import groupby

import torch
from torch import Tensor

from datamodules import sprites
from datamodules.shards import DecodedTrajectory
from swirl_vl.eval.metrics import image_metrics
from swirl_vl.models.base import ForwardWorldModel


@torch.no_grad()
def rollout(fwm: ForwardWorldModel, x0: Tensor, actions: Sequence[Sequence[str]]) -> Tensor:
    """Greedy ``K``-step rollouts ``(N, K, 3, H, W)`` from first states ``x0`` ``(N, 3, H, W)`` under ``N``
    action sequences of one length ``K``."""
    turns = {len(a) for a in actions}
    if len(turns) != 1 or len(actions) != x0.shape[0]:
        raise ValueError(f"need {x0.shape[0]} action sequences of one length; got lengths {sorted(turns)}")
    current, predicted = x0, []
    for k in range(turns.pop()):
        current = fwm.sample(current, [a[k] for a in actions], num_samples=1, greedy=True).images
        predicted.append(current)
    return torch.stack(predicted, dim=1)


def turn_metrics(predicted: Tensor, truth: Tensor, states: Sequence[Sequence[object]] | None = None) -> list[dict]:
    """Per-turn per-example metrics: element ``k - 1`` is ``{"turn_k/fwm_l1": (N,), …}``.

    ``predicted``, ``truth``: ``(N, K, 3, H, W)``. ``states``: per trajectory, the ``K`` true sprite states
    after each action (JSON), which add ``turn_k/fwm_state_acc``.
    """
    out = []
    for k in range(predicted.shape[1]):
        metrics = image_metrics(predicted[:, k], truth[:, k])
        if states is not None:
            hits = [
                sprites.parse(img) == sprites.SpriteState.from_json(s[k])
                for img, s in zip(predicted[:, k].float().cpu(), states)
            ]
            metrics["fwm_state_acc"] = torch.tensor(hits, dtype=torch.float32, device=predicted.device)
        out.append({f"turn_{k + 1}/{name}": values for name, values in metrics.items()})
    return out


def rollable(traj: DecodedTrajectory) -> bool:
    """Whether a trajectory can be rolled out and scored: every action known, every next state observed."""
    return all(a for a in traj.actions) and not traj.open_ended


def _true_states(traj: DecodedTrajectory) -> list | None:
    states = traj.meta.get("states")
    return states if isinstance(states, list) and len(states) == len(traj.images) else None


@torch.no_grad()
def rollout_trajectories(
    fwm: ForwardWorldModel,
    trajectories: Sequence[DecodedTrajectory],
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[dict[str, Tensor], list[str]]]:
    """Roll out this process's share (``dealt_batches``) of the trajectories with known actions; yields
    ``({"turn_k/…": (n,)}, tasks)`` per turn and batch.

    ``tasks`` are the tasks of step ``k`` of each trajectory, so a per-task table groups turn ``k`` by the kind
    of its last action. Trajectories are batched by length; those with an unknown action or next state are
    left out.
    """
    for batch, own in dealt_batches(trajectories, batch_size, rank, world):
        images = torch.stack([t.images for t in batch]).to(device)  # (n, K+1, 3, H, W)
        predicted = rollout(fwm, images[:, 0], [t.actions for t in batch])[:own]
        if own == 0:
            continue
        batch, images = batch[:own], images[:own]
        states = [_true_states(t) for t in batch]
        known = None if any(s is None for s in states) else [s[1:] for s in states]
        for k, metrics in enumerate(turn_metrics(predicted, images[:, 1:], known)):
            yield metrics, [t.task_at(k) for t in batch]


def dealt_batches(
    trajectories: Sequence[DecodedTrajectory], batch_size: int, rank: int = 0, world: int = 1
) -> Iterator[tuple[list[DecodedTrajectory], int]]:
    """This process's rollout batches ``(batch, own)`` of the usable ``trajectories``, of which the first ``own``
    are its share: batched by length, up to ``batch_size`` each, the ``world`` processes taking turns within a length.

    Every process gets as many batches as the others, each with as many turns (under FSDP2 every forward pass is a
    collective, so all must make as many); one left without a trajectory of its own in a batch rolls out a repeat
    of another's (``own`` 0), whose result the caller drops.
    """
    usable = sorted((t for t in trajectories if rollable(t)), key=lambda t: len(t.actions))
    for _, same_length in groupby(usable, key=lambda t: len(t.actions)):
        group = list(same_length)
        for start in range(0, len(group), batch_size * world):
            mine = group[start : start + batch_size * world][rank::world]
            yield (mine or group[start : start + 1]), len(mine)
