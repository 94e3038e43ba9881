"""Image grids and action text for TensorBoard: one row per example, ``x | ŷ_1..ŷ_k | y``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid


def transition_grid(x: Tensor, y_hats: Tensor, y: Tensor, scale: int = 4) -> Tensor:
    """``x (B,3,H,W)``, ``y_hats (B,K,3,H,W)``, ``y (B,3,H,W)`` → one ``(3, H', W')`` grid, a row per example.

    Upscaled by ``scale`` with nearest-neighbour so 32-px sprites stay readable in TensorBoard.
    """
    rows = torch.cat([x[:, None], y_hats, y[:, None]], dim=1)  # (B, K+2, 3, H, W)
    b, k = rows.shape[:2]
    flat = rows.reshape(b * k, *rows.shape[2:]).float().clamp(0, 1).cpu()
    if scale > 1:
        flat = F.interpolate(flat, scale_factor=scale, mode="nearest")
    return make_grid(flat, nrow=k, padding=2, pad_value=1.0)


def log_transitions(
    logger: object, tag: str, x: Tensor, y_hats: Tensor, y: Tensor, captions: list[str], step: int
) -> None:
    """Write the grid and its captions (one line per row) when the logger is TensorBoard; no-op otherwise."""
    if not isinstance(logger, TensorBoardLogger):
        return
    logger.experiment.add_image(tag, transition_grid(x, y_hats, y), step)
    lines = [f"{i}. {c}" for i, c in enumerate(captions)]
    logger.experiment.add_text(tag, "  \n".join(lines), step)


def log_texts(logger: object, tag: str, lines: list[str], step: int) -> None:
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, "  \n".join(lines), step)
