"""Per-example evaluation of an FWM and an IDM on a batch of pairs; the modules average and log.

Sprite batches carry ground-truth states (``x_state``/``y_state`` JSON), which give the exact
metrics: ``fwm_state_acc`` (the parsed generated image is the true next state) and ``idm_action_acc``
(the predicted action applied to the parsed ``x`` gives the parsed ``y``, whatever its wording).
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules import sprites
from swirl_vl.eval.metrics import image_metrics, l1
from swirl_vl.eval.text_metrics import rouge_l, sentence_bleu
from swirl_vl.models.base import ForwardWorldModel, InverseDynamicsModel


def _has_states(batch: dict) -> bool:
    return all(bool(s) for s in batch.get("y_state", [""])) and all(bool(s) for s in batch.get("x_state", [""]))


@torch.no_grad()
def evaluate_fwm(fwm: ForwardWorldModel, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
    """Greedy next states for ``batch`` and per-example metrics ``{name: (B,)}``; returns (metrics, ŷ)."""
    y_hat = fwm.sample(batch["x"], batch["action"], num_samples=1, greedy=True).images
    metrics = image_metrics(y_hat, batch["y"])
    if _has_states(batch):
        truth = [sprites.SpriteState.from_json(s) for s in batch["y_state"]]
        hits = [sprites.parse(img) == t for img, t in zip(y_hat.float().cpu(), truth)]
        metrics["fwm_state_acc"] = torch.tensor(hits, dtype=torch.float32, device=y_hat.device)
    return metrics, y_hat


@torch.no_grad()
def evaluate_idm(idm: InverseDynamicsModel, batch: dict) -> tuple[dict[str, Tensor], list[str]]:
    """Greedy actions for ``batch`` and per-example metrics ``{name: (B,)}``; returns (metrics, texts)."""
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

    Needs no action label: a low value says the IDM names an action the FWM can act out.
    """
    y_hat = fwm.sample(batch["x"], idm_texts, num_samples=1, greedy=True).images
    return {"cycle_l1": l1(y_hat.float().clamp(0, 1), batch["y"].float())}
