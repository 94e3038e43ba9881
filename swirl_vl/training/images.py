"""Image grids and action text for TensorBoard, captions drawn in: a header ``x | ŷ_1 … ŷ_K | y``, then per example
its action text above the row and each sample's caption (its reward, say) under its image."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PAD = 2
MIN_CELL = 128
"""Images are upscaled (nearest-neighbour) by a whole factor to at least this many pixels a side, so that 32-px
sprites stay readable and a cell is wide enough for a caption of ~20 characters."""


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


@functools.cache
def _has_glyph(char: str) -> bool:
    """Whether the default font draws ``char`` as itself: its bundled font covers ASCII, not even ``é``, and draws
    the others as the box it draws for a code point that no font has."""
    font = _font()
    if not isinstance(font, ImageFont.FreeTypeFont):  # PIL's bitmap fallback: Latin-1
        return ord(char) < 256
    missing = font.getmask("\U0010ffff")
    mask = font.getmask(char)
    return char.isascii() or (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def _drawable(text: str) -> str:
    """``text`` on one line, in characters the default font draws (``ŷ`` as ``y^``, others it lacks as ``?``)."""
    text = " ".join(str(text).split()).replace("ŷ_", "y^").replace("ŷ", "y^")
    return "".join(c if _has_glyph(c) else "?" for c in text)


def fit_text(text: str, width: float) -> str:
    """``text`` on one line, cut to at most ``width`` pixels in the default font, ending in ``…`` when cut."""
    font = _font()
    text = _drawable(text)
    if font.getlength(text) <= width:
        return text
    ellipsis = "…" if _has_glyph("…") else "..."
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + ellipsis) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ellipsis if lo else ""


def column_headers(num_samples: int) -> list[str]:
    """``x``, ``ŷ`` (one sample) or ``ŷ_1`` … ``ŷ_K``, then ``y``."""
    samples = ["ŷ"] if num_samples == 1 else [f"ŷ_{i + 1}" for i in range(num_samples)]
    return ["x", *samples, "y"]


def _to_pil(image: Tensor, scale: int) -> Image.Image:
    """``(3, H, W)`` in [0, 1] → an RGB image ``scale`` times larger."""
    image = image.detach().float().clamp(0, 1).cpu()[None]
    if scale > 1:
        image = F.interpolate(image, scale_factor=scale, mode="nearest")
    return Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _to_tensor(canvas: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom + 3


def transition_grid(
    x: Tensor,
    y_hats: Tensor,
    y: Tensor,
    captions: Sequence[str] | None = None,
    sample_captions: Sequence[Sequence[str]] | None = None,
    scale: int | None = None,
) -> Tensor:
    """``x (B,3,H,W)``, ``y_hats (B,K,3,H,W)``, ``y (B,3,H,W)`` → one ``(3, H', W')`` grid in [0, 1], a row per example.

    A header row names the columns; ``captions`` (one per example, e.g. the action text) are drawn above each row,
    ``sample_captions`` (``B`` lists of ``K``, e.g. each sample's reward) under each ``ŷ``; text too long for its
    space is cut with ``…``. ``scale``: the upscaling factor (None: enough for ``MIN_CELL`` pixels a side).
    """
    b, k = y_hats.shape[:2]
    h, w = x.shape[-2:]
    scale = scale or max(1, -(-MIN_CELL // max(h, w)))
    font = _font()
    line = _line_height(font)
    cell_w, cell_h = w * scale, h * scale
    cols = k + 2
    row_h = line + cell_h + (line if sample_captions is not None else 0)
    width = PAD + cols * (cell_w + PAD)
    canvas = Image.new("RGB", (width, PAD + line + b * (row_h + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, header in enumerate(column_headers(k)):
        draw.text((PAD + c * (cell_w + PAD), PAD), fit_text(header, cell_w), fill="black", font=font)
    for r in range(b):
        top = PAD + line + r * (row_h + PAD)
        if captions is not None:
            draw.text((PAD, top), fit_text(captions[r], width - 2 * PAD), fill="black", font=font)
        images = [x[r], *y_hats[r], y[r]]
        for c, image in enumerate(images):
            canvas.paste(_to_pil(image, scale), (PAD + c * (cell_w + PAD), top + line))
        if sample_captions is not None:
            for c, text in enumerate(sample_captions[r][:k], start=1):
                xy = (PAD + c * (cell_w + PAD), top + line + cell_h + 1)
                draw.text(xy, fit_text(text, cell_w), fill="black", font=font)
    return _to_tensor(canvas)


def action_grid(x: Tensor, y: Tensor, actions: Sequence[Sequence[str]], scale: int | None = None) -> Tensor:
    """``x (B,3,H,W)``, ``y (B,3,H,W)`` and per pair its lines of text (e.g. the sampled actions with their rewards) →
    one ``(3, H', W')`` grid in [0, 1]: a row per pair, ``x | y | its lines``, each line cut with ``…`` to fit."""
    h, w = x.shape[-2:]
    scale = scale or max(1, -(-MIN_CELL // max(h, w)))
    font = _font()
    line = _line_height(font)
    cell_w, cell_h = w * scale, h * scale
    text_w = 3 * cell_w
    row_h = max(cell_h, line * max((len(a) for a in actions), default=1))
    width = PAD + 2 * (cell_w + PAD) + text_w + PAD
    canvas = Image.new("RGB", (width, PAD + line + len(actions) * (row_h + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, header in enumerate(("x", "y", "sampled actions")):
        draw.text((PAD + c * (cell_w + PAD), PAD), fit_text(header, text_w), fill="black", font=font)
    for r, lines in enumerate(actions):
        top = PAD + line + r * (row_h + PAD)
        for c, image in enumerate((x[r], y[r])):
            canvas.paste(_to_pil(image, scale), (PAD + c * (cell_w + PAD), top))
        for i, text in enumerate(lines):
            draw.text((PAD + 2 * (cell_w + PAD), top + i * line), fit_text(text, text_w), fill="black", font=font)
    return _to_tensor(canvas)


def log_transitions(
    logger: object,
    tag: str,
    x: Tensor,
    y_hats: Tensor,
    y: Tensor,
    captions: list[str],
    step: int,
    sample_captions: Sequence[Sequence[str]] | None = None,
) -> None:
    """Write the captioned grid, and its captions whole as text (one line per row), when the logger is TensorBoard;
    no-op otherwise."""
    if not isinstance(logger, TensorBoardLogger):
        return
    logger.experiment.add_image(tag, transition_grid(x, y_hats, y, captions, sample_captions), step)
    lines = [f"{i}. {c}" for i, c in enumerate(captions)]
    logger.experiment.add_text(tag, "  \n".join(lines), step)


def grouped_lines(texts: Sequence[str], rewards: Sequence[float], group_size: int) -> list[list[str]]:
    """``B*G`` sampled texts and their rewards → per pair, its ``G`` lines ``reward  text``, best first."""
    groups = []
    for start in range(0, len(texts), group_size):
        members = sorted(zip(rewards[start : start + group_size], texts[start : start + group_size]), reverse=True)
        groups.append([f"{r:+.3f}: {t}" for r, t in members])
    return groups


def log_action_groups(
    logger: object, tag: str, x: Tensor, y: Tensor, groups: Sequence[Sequence[str]], step: int
) -> None:
    """Write the pairs with their groups of lines (``grouped_lines``) as a grid and as text, grouped by pair, when the
    logger is TensorBoard; no-op otherwise."""
    if not isinstance(logger, TensorBoardLogger):
        return
    logger.experiment.add_image(tag, action_grid(x, y, groups), step)
    blocks = [f"**pair {i}**  \n" + "  \n".join(f"`{line}`" for line in lines) for i, lines in enumerate(groups)]
    logger.experiment.add_text(tag, "\n\n".join(blocks), step)


def log_texts(logger: object, tag: str, lines: list[str], step: int) -> None:
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, "  \n".join(lines), step)
