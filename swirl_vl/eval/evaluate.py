"""Per-example evaluation of an FWM and an IDM on a batch of pairs; the modules average and log.

Sprite batches carry ground-truth states (``x_state``/``y_state`` JSON), which give the exact
metrics: ``fwm_state_acc`` (the parsed generated image is the true next state) and ``idm_action_acc``
(the predicted action applied to the parsed ``x`` gives the parsed ``y``, whatever its wording).

A pair whose next state is unknown (``has_target`` False: a benchmark entry with a source image and an
instruction only) gets the metrics that need no target (``fwm_change_l1``: how far ``ŷ`` moved from ``x``) and NaN
for the rest, which the report leaves out of its means; the IDM, which needs ``y``, does not see it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from datamodules import sprites
from swirl_vl.eval.metrics import image_metrics, l1
from swirl_vl.eval.text_metrics import rouge_l, sentence_bleu
from swirl_vl.models.base import ForwardWorldModel, InverseDynamicsModel


def _has_states(batch: dict) -> bool:
    return all(bool(s) for s in batch.get("y_state", [""])) and all(bool(s) for s in batch.get("x_state", [""]))


def target_rows(batch: dict) -> Tensor:
    """``(B,)`` bool on the CPU: which pairs have an observed next state (all, for a batch without ``has_target``)."""
    has = batch.get("has_target")
    return torch.ones(len(batch["action"]), dtype=torch.bool) if has is None else has.bool().cpu()


def select_rows(batch: dict, rows: Tensor) -> dict:
    """The sub-batch of the pairs where ``rows`` (``(B,)`` bool) is True: tensors indexed, lists filtered."""
    keep = rows.nonzero().flatten().tolist()
    return {
        name: value[rows.to(value.device)] if isinstance(value, Tensor) else [value[i] for i in keep]
        for name, value in batch.items()
    }


def spread(metrics: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """Per-example metrics of the ``rows`` sub-batch back at the full batch's size, NaN (no answer) elsewhere."""
    out = {}
    for name, values in metrics.items():
        full = torch.full((rows.numel(),), float("nan"), device=values.device)
        full[rows.to(values.device)] = values.float()
        out[name] = full
    return out


def on_target_rows(batch: dict, compute: Callable[[dict], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``compute(batch)``'s per-example metrics for the pairs that have a next state, NaN for the others."""
    rows = target_rows(batch)
    if rows.all():
        return compute(batch)
    return spread(compute(select_rows(batch, rows)), rows) if rows.any() else {}


@torch.no_grad()
def evaluate_fwm(fwm: ForwardWorldModel, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
    """Greedy next states for ``batch`` and per-example metrics ``{name: (B,)}``; returns (metrics, ŷ)."""
    y_hat = fwm.sample(batch["x"], batch["action"], num_samples=1, greedy=True).images
    metrics = {"fwm_change_l1": l1(y_hat.float().clamp(0, 1), batch["x"].float())}
    scored = {"y_hat": y_hat, "y": batch["y"], "action": batch["action"], "has_target": target_rows(batch)}
    metrics |= on_target_rows(scored, lambda pairs: image_metrics(pairs["y_hat"], pairs["y"]))
    if _has_states(batch):
        truth = [sprites.SpriteState.from_json(s) for s in batch["y_state"]]
        hits = [sprites.parse(img) == t for img, t in zip(y_hat.float().cpu(), truth)]
        metrics["fwm_state_acc"] = torch.tensor(hits, dtype=torch.float32, device=y_hat.device)
    return metrics, y_hat


@torch.no_grad()
def evaluate_idm(idm: InverseDynamicsModel, batch: dict) -> tuple[dict[str, Tensor], list[str]]:
    """Greedy actions for ``batch`` and per-example metrics ``{name: (B,)}``; returns (metrics, texts).

    Pairs without a next state get NaN metrics and an empty text: the IDM cannot say what led to an unseen state.
    """
    rows = target_rows(batch)
    if not rows.all():
        if not rows.any():
            return {}, [""] * rows.numel()
        metrics, texts = evaluate_idm(idm, select_rows(batch, rows))
        found = iter(texts)
        return spread(metrics, rows), [next(found) if row else "" for row in rows.tolist()]
    texts = idm.sample(batch["x"], batch["y"], num_samples=1, greedy=True).texts
    device = batch["x"].device
    exact = [p.strip().lower() == t.strip().lower() for p, t in zip(texts, batch["action"])]
    metrics = {
        "idm_exact": torch.tensor(exact, dtype=torch.float32, device=device),
        "idm_bleu": torch.tensor([sentence_bleu(p, t) for p, t in zip(texts, batch["action"])], device=device),
        "idm_rouge_l": torch.tensor([rouge_l(p, t) for p, t in zip(texts, batch["action"])], device=device),
    }
    if _has_states(batch):
        xs = [sprites.SpriteState.from_json(s) for s in batch["x_state"]]
        ys = [sprites.SpriteState.from_json(s) for s in batch["y_state"]]
        hits = [sprites.apply(x, p) == y for x, p, y in zip(xs, texts, ys)]
        metrics["idm_action_acc"] = torch.tensor(hits, dtype=torch.float32, device=device)
    return metrics, texts


@torch.no_grad()
def evaluate_cycle(fwm: ForwardWorldModel, batch: dict, idm_texts: list[str]) -> dict[str, Tensor]:
    """``cycle_l1`` ``(B,)``: L1 between ``y`` and the FWM's greedy ``ŷ`` under the IDM's greedy action for ``(x, y)``.

    Needs no action label: a low value says the IDM names an action the FWM can act out. NaN for pairs without ``y``.
    """

    def cycle(pairs: dict) -> dict[str, Tensor]:
        y_hat = fwm.sample(pairs["x"], pairs["idm_action"], num_samples=1, greedy=True).images
        return {"cycle_l1": l1(y_hat.float().clamp(0, 1), pairs["y"].float())}

    return on_target_rows({**batch, "idm_action": idm_texts}, cycle)
