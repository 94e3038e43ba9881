"""Supervised warm start: ``FWMModule`` and ``IDMModule``, each a LightningModule usable alone.

``SwirlModule`` composes the two and reuses their ``sft_loss``, ``make_optimizer`` and ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from swirl_vl.eval.evaluate import evaluate_fwm, evaluate_idm
from swirl_vl.models.base import ForwardWorldModel, InverseDynamicsModel
from swirl_vl.training.images import log_texts, log_transitions


def labelled_pairs(batch: dict) -> dict:
    """The labelled pair batch, whether the DataModule gave one loader or a ``{split: batch}`` dict."""
    return batch["labelled"] if "labelled" in batch else batch


def _adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class _WorldModelModule(LightningModule):
    """What FWM and IDM modules share: optimiser, SFT step, evaluation and its logging."""

    prefix: str

    def __init__(self, optimizer: OptimizerCallable, log_images: int) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.log_images = log_images

    def sft_loss(self, batch: dict) -> Tensor:
        raise NotImplementedError

    def evaluate(self, batch: dict) -> tuple[dict[str, Tensor], object]:
        """Per-example metrics ``{name: (B,)}`` and the model's greedy outputs."""
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer([p for p in self.model.parameters() if p.requires_grad])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer()

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pairs = labelled_pairs(batch)
        loss = self.sft_loss(pairs)
        self.log(f"{self.prefix}/sft_loss", loss, prog_bar=True, batch_size=len(pairs["action"]))
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        metrics, outputs = self.evaluate(batch)
        for name, values in metrics.items():
            self.log(f"{stage}/{name}", values.mean(), batch_size=values.numel(), sync_dist=True)
        if batch_idx == 0 and self.log_images:
            self.log_outputs(batch, outputs, f"{stage}/{self.prefix}", self.global_step)

    def log_outputs(self, batch: dict, outputs: object, tag: str, step: int) -> None:
        raise NotImplementedError


class FWMModule(_WorldModelModule):
    """Trains the forward world model ``P_θ(y | x, z)`` on labelled pairs."""

    prefix = "fwm"

    def __init__(self, model: ForwardWorldModel, optimizer: OptimizerCallable = _adamw, log_images: int = 8) -> None:
        """
        Args:
            model: the FWM backend (``TokenFWM`` or ``DiffusionFWM``), injected by ``class_path``.
            optimizer: optimiser factory for the FWM's trainable parameters.
            log_images: rows of ``x | ŷ | y`` written to TensorBoard per evaluation (0: none).
        """
        super().__init__(optimizer, log_images)
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model

    @override
    def sft_loss(self, batch: dict) -> Tensor:
        return self.model.sft_loss(batch["x"], batch["action"], batch["y"])

    @override
    def evaluate(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        return evaluate_fwm(self.model, batch)

    @override
    def log_outputs(self, batch: dict, outputs: Tensor, tag: str, step: int) -> None:
        k = self.log_images
        log_transitions(
            self.logger, tag, batch["x"][:k], outputs[:k, None], batch["y"][:k], list(batch["action"][:k]), step
        )


class IDMModule(_WorldModelModule):
    """Trains the inverse dynamics model ``Q_φ(z | x, y)`` on labelled pairs."""

    prefix = "idm"

    def __init__(self, model: InverseDynamicsModel, optimizer: OptimizerCallable = _adamw, log_images: int = 8) -> None:
        """
        Args:
            model: the IDM backend (``VLMIDM``), injected by ``class_path``.
            optimizer: optimiser factory for the IDM's trainable parameters.
            log_images: sampled actions written to TensorBoard as text per evaluation (0: none).
        """
        super().__init__(optimizer, log_images)
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model

    @override
    def sft_loss(self, batch: dict) -> Tensor:
        return self.model.sft_loss(batch["x"], batch["y"], batch["action"])

    @override
    def evaluate(self, batch: dict) -> tuple[dict[str, Tensor], list[str]]:
        return evaluate_idm(self.model, batch)

    @override
    def log_outputs(self, batch: dict, outputs: list[str], tag: str, step: int) -> None:
        lines = [f"predicted: `{p}` — true: `{t}`" for p, t in zip(outputs, batch["action"])][: self.log_images]
        log_texts(self.logger, tag, lines, step)
