"""Trajectory shards: writing plain tar files and decoding their samples robustly.

One sample = one trajectory: ``{key}.0.png``, ``{key}.1.png``, … (or ``.jpg``), ``{key}.actions.json``
(``T-1`` entries, text or null) and ``{key}.meta.json`` (``{"task", "source", ...}``). Bad samples and bad
shards are skipped and counted in a ``SkipCounter``, never fatal.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps

_FRAME = re.compile(r"(\d+)\.(png|jpg|jpeg)")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
SKIP_REASONS = ("bad_shard", "bad_image", "missing_state", "bad_json", "actions_length", "bad_action", "task")


@dataclass
class Trajectory:
    """A trajectory to write: ``T`` images (PIL, or PNG/JPEG bytes kept as they are), ``T-1`` actions."""

    key: str
    images: list[Image.Image | bytes]
    actions: list[str | None]
    meta: dict[str, Any]


@dataclass
class DecodedTrajectory:
    """A trajectory read from a shard: ``images`` (T, 3, H, W) float in [0, 1]."""

    key: str
    images: torch.Tensor
    actions: list[str | None]
    meta: dict[str, Any]
    url: str = ""

    def task_at(self, t: int) -> str:
        """Task of step ``t``: per-step ``meta["tasks"]`` when present (sprites), else ``meta["task"]``."""
        tasks = self.meta.get("tasks")
        if isinstance(tasks, list) and len(tasks) == len(self.actions) and isinstance(tasks[t], str):
            return tasks[t]
        return str(self.meta.get("task", ""))


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.detail = reason, message


@dataclass
class SkipCounter:
    """Counts skipped samples by reason and warns (a few times per reason, so logs stay readable).

    Samples left out by a task filter are counted but not warned about: that was asked for.
    """

    counts: Counter = field(default_factory=Counter)
    max_warnings: int = 5

    def record(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if reason != "task" and self.counts[reason] <= self.max_warnings:
            warnings.warn(f"skipped ({reason}): {message}", stacklevel=2)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


class ShardErrorHandler:
    """webdataset exception handler: like ``warn_and_continue`` (without its sleep), counting bad shards."""

    def __init__(self, skipped: SkipCounter) -> None:
        self.skipped = skipped

    def __call__(self, exn: Exception) -> bool:
        shard = next((str(a) for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "?")
        self.skipped.record("bad_shard", f"unreadable or truncated shard {shard}: {exn.args[0] if exn.args else exn!r}")
        return True


def _encode_image(image: Image.Image | bytes) -> tuple[str, bytes]:
    """(extension, bytes): PNG/JPEG bytes pass through untouched; PIL images become lossless PNG."""
    if isinstance(image, bytes):
        if image.startswith(_PNG_MAGIC):
            return "png", image
        if image.startswith(_JPEG_MAGIC):
            return "jpg", image
        raise ValueError("encoded images must be PNG or JPEG bytes")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards: same input, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _check(traj: Trajectory) -> None:
    if not traj.key or "." in traj.key or "/" in traj.key:
        raise ValueError(f"trajectory key {traj.key!r} must be non-empty with no '.' or '/' (webdataset splits there)")
    if len(traj.images) < 2:
        raise ValueError(f"trajectory {traj.key}: needs at least 2 images, got {len(traj.images)}")
    if len(traj.actions) != len(traj.images) - 1:
        raise ValueError(f"trajectory {traj.key}: {len(traj.images)} images need {len(traj.images) - 1} actions")
    if not all(a is None or isinstance(a, str) for a in traj.actions):
        raise ValueError(f"trajectory {traj.key}: actions must be strings or None")


def write_shards(
    trajectories: Iterable[Trajectory], out_dir: str | Path, prefix: str = "shard", shard_size: int = 500
) -> list[Path]:
    """Write ``out_dir/{prefix}-000000.tar``, … with ``shard_size`` trajectories each; returns their paths.

    Each shard is written as ``*.tar.tmp`` and renamed when complete, so a crash leaves no half-written
    ``.tar``. Shards of an earlier run with the same prefix that this run did not rewrite are removed.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    keys: set[str] = set()
    tar: tarfile.TarFile | None = None
    tmp = out / "unused"
    count = 0
    try:
        for traj in trajectories:
            _check(traj)
            if traj.key in keys:
                raise ValueError(f"duplicate trajectory key {traj.key!r}")
            keys.add(traj.key)
            if tar is None or count == shard_size:
                if tar is not None:
                    tar.close()
                    os.replace(tmp, tmp.with_suffix(""))
                    written.append(tmp.with_suffix(""))
                tmp = out / f"{prefix}-{len(written):06d}.tar.tmp"
                tar, count = tarfile.open(tmp, "w"), 0
            for t, image in enumerate(traj.images):
                ext, data = _encode_image(image)
                _add_member(tar, f"{traj.key}.{t}.{ext}", data)
            _add_member(tar, f"{traj.key}.actions.json", json.dumps(traj.actions).encode())
            _add_member(tar, f"{traj.key}.meta.json", json.dumps(traj.meta).encode())
            count += 1
        if tar is not None:
            tar.close()
            os.replace(tmp, tmp.with_suffix(""))
            written.append(tmp.with_suffix(""))
    except BaseException:
        if tar is not None:
            tar.close()
        tmp.unlink(missing_ok=True)
        raise
    for stale in [*out.glob(f"{prefix}-*.tar"), *out.glob(f"{prefix}-*.tar.tmp")]:
        if stale not in written:
            stale.unlink()
    return written


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits, CMYK/P/L converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 65535 → 255
        elif image.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        image = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_image(data: bytes, image_size: int | None) -> torch.Tensor:
    """Encoded image → (3, image_size, image_size) float in [0, 1]; bicubic resize only when needed."""
    try:
        with Image.open(io.BytesIO(data)) as raw:
            raw.load()
            image = to_rgb(ImageOps.exif_transpose(raw))
    except Exception as exn:
        raise SampleError("bad_image", f"undecodable image ({type(exn).__name__}: {exn})") from exn
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _load_json(sample: dict[str, Any], name: str, where: str) -> Any:
    try:
        return json.loads(sample[name])
    except Exception as exn:
        raise SampleError("bad_json", f"{where}: {name} is not valid JSON ({exn})") from exn


def decode_trajectory(
    sample: dict[str, Any],
    image_size: int | None,
    tasks: Iterable[str] | None = None,
    require_actions: bool = False,
) -> DecodedTrajectory:
    """Raw webdataset sample → ``DecodedTrajectory``; raises ``SampleError`` (a ``ValueError``) when unusable.

    ``require_actions``: every action must be a non-empty string (labelled data); otherwise actions that
    are not non-empty strings become None. ``tasks``: keep only trajectories with a step in these tasks.
    """
    key = str(sample.get("__key__", "?"))
    where = f"sample {key} in {sample.get('__url__', '?')}"
    meta = _load_json(sample, "meta.json", where) if "meta.json" in sample else {}
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"{where}: meta.json must be an object")
    frames = {int(m.group(1)): name for name in sample if (m := _FRAME.fullmatch(name))}
    length = len(frames)
    if length < 2 or sorted(frames) != list(range(length)):
        raise SampleError("missing_state", f"{where}: frames {sorted(frames)} are not 0..T-1 with T >= 2")
    # missing actions.json = state-only data
    actions = _load_json(sample, "actions.json", where) if "actions.json" in sample else [None] * (length - 1)
    if not isinstance(actions, list) or len(actions) != length - 1:
        raise SampleError("actions_length", f"{where}: {length} frames need a list of {length - 1} actions")
    usable = [isinstance(a, str) and a.strip() != "" for a in actions]
    if require_actions and not all(usable):
        raise SampleError("bad_action", f"{where}: empty or non-string action in {actions!r}")
    actions = [a.strip() if ok else None for a, ok in zip(actions, usable)]
    record = DecodedTrajectory(key, torch.empty(0), actions, meta, str(sample.get("__url__", "")))
    if tasks is not None:
        wanted = set(tasks)
        if not any(record.task_at(t) in wanted for t in range(length - 1)):
            raise SampleError("task", f"{where}: task {meta.get('task')!r} not in {sorted(wanted)}")
    try:
        images = [decode_image(sample[frames[t]], image_size) for t in range(length)]
    except SampleError as exn:
        raise SampleError(exn.reason, f"{where}: {exn.detail}") from exn
    if image_size is None and len({tuple(i.shape) for i in images}) > 1:
        raise SampleError("bad_image", f"{where}: frames differ in size and no image_size was given")
    record.images = torch.stack(images)
    return record


def iter_samples(urls: Iterable[str], handler: ShardErrorHandler) -> Iterator[dict[str, Any]]:
    """Raw samples of the given shards, in order; unreadable or truncated shards go to ``handler``."""
    return wds.tarfile_samples(({"url": u} for u in urls), handler=handler)


def iter_trajectories(
    urls: Iterable[str],
    image_size: int | None,
    skipped: SkipCounter,
    tasks: Iterable[str] | None = None,
    require_actions: bool = False,
) -> Iterator[DecodedTrajectory]:
    """Decoded trajectories of the given shards, in order; bad samples are skipped and counted."""
    for sample in iter_samples(urls, ShardErrorHandler(skipped)):
        try:
            yield decode_trajectory(sample, image_size, tasks, require_actions)
        except SampleError as exn:
            skipped.record(exn.reason, exn.detail)
