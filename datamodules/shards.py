"""Trajectory shards: writing plain tar files and decoding their samples robustly.

One sample = one trajectory: ``{key}.0.png``, ``{key}.1.png``, … (or ``.jpg``), ``{key}.actions.json``
(``T-1`` entries, text or null) and ``{key}.meta.json`` (``{"task", "source", ...}``). Bad samples and bad
shards are skipped and counted in a ``SkipCounter``, never fatal and never silent.

An *open* trajectory (``meta["open"]`` true) has ``T`` actions: its last action's next state was never observed (a
benchmark entry that gives a source image and an instruction but no target, such as Aurora-Bench's ``clevr``,
``emu`` and ``epic``). It may hold a single state. The flag is explicit so that a closed trajectory that lost its
last frame is never taken for an open one. Only evaluation reads open steps (``open_steps=True``); elsewhere such a sample is
skipped and counted as ``no_target``.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

_FRAME = re.compile(r"(\d+)\.(png|jpg|jpeg)")
_MEMBER = re.compile(r"((?:.*/|)[^.]+)[.]([^/]*)")  # webdataset's split: key up to the first '.' of the last part
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
SKIP_REASONS = (
    "bad_shard",
    "duplicate_key",
    "duplicate_member",
    "bad_image",
    "missing_state",
    "bad_json",
    "actions_length",
    "missing_actions",
    "bad_action",
    "bad_task",
    "task",
    "no_target",
)


@dataclass
class Trajectory:
    """A trajectory to write: ``T`` images (PIL, or PNG/JPEG bytes kept as they are), ``T-1`` actions (``T`` for an
    open trajectory, ``meta["open"]`` true, whose last action has no observed next state)."""

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

    @property
    def open_ended(self) -> bool:
        """Whether the last action's next state is unknown (``meta["open"]``: ``T`` actions for ``T`` states)."""
        return self.meta.get("open") is True

    def task_at(self, t: int) -> str:
        """Task of step ``t``: per-step ``meta["tasks"]`` when present (sprites), else ``meta["task"]``; "" if none."""
        tasks = self.meta.get("tasks")
        if isinstance(tasks, list) and len(tasks) == len(self.actions) and isinstance(tasks[t], str):
            return tasks[t]
        task = self.meta.get("task")
        return task if isinstance(task, str) else ""


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.detail = reason, message


class SkipCounter:
    """Counts skipped samples by reason (``SKIP_REASONS``) and warns, a few times per reason and process.

    The counts live in shared memory, one row per process (0: the process that made the counter, 1 + i:
    DataLoader worker i), so the workers' skips reach the totals and no two processes write the same cell.
    ``workers``: how many DataLoader workers may record. Samples left out by a task filter are counted but
    not warned about: that was asked for.
    """

    def __init__(self, workers: int = 0, max_warnings: int = 5) -> None:
        self.workers, self.max_warnings = workers, max_warnings
        self._table = torch.zeros(workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def record(self, reason: str, message: str) -> None:
        info = torch.utils.data.get_worker_info()
        row, column = 0 if info is None else 1 + info.id, SKIP_REASONS.index(reason)
        if row > self.workers:
            raise RuntimeError(
                f"DataLoader worker {row - 1} records into a SkipCounter made for {self.workers} workers"
            )
        self._table[row, column] += 1
        if reason != "task" and self._table[row, column] <= self.max_warnings:
            warnings.warn(f"skipped ({reason}): {message}", stacklevel=2)

    @property
    def counts(self) -> Counter:
        """Skips by reason, summed over the processes; reasons never seen are left out."""
        return Counter({r: n for r, n in zip(SKIP_REASONS, self._table.sum(0).tolist()) if n})

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


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
    n = len(traj.images)
    if traj.meta.get("open") is True:  # the last action's next state is unknown
        if n < 1 or len(traj.actions) != n:
            raise ValueError(f"open trajectory {traj.key}: {n} images need {n} actions, the last without its state")
        if not (isinstance(traj.actions[-1], str) and traj.actions[-1].strip()):
            raise ValueError(f"open trajectory {traj.key}: the last action must be a non-empty string")
    elif n < 2:
        raise ValueError(f"trajectory {traj.key}: needs at least 2 images, got {n} (or meta 'open' for a last action)")
    elif len(traj.actions) != n - 1:
        raise ValueError(f"trajectory {traj.key}: {n} images need {n - 1} actions")
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


@contextmanager
def staged_folder(out: str | Path, replaces: Iterable[str]) -> Iterator[Path]:
    """A fresh sibling folder of ``out`` to write a new set into; it takes the place of ``out`` once the block ends.

    ``out`` is not touched until then: an exception in the block removes the staging folder, and a killed process
    leaves it beside ``out`` as ``.{name}.*.partial``, never inside it. At the swap, the entries of the old ``out``
    whose names match a glob of ``replaces`` go with it; the others move into the new folder.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not out.exists():
        stage.rename(out)
        return
    old = stage.with_suffix(".old")
    out.rename(old)
    stage.rename(out)
    patterns = list(replaces)
    for entry in old.iterdir():
        if not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            entry.rename(out / entry.name)
    shutil.rmtree(old)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits, CMYK/P/L converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"{image.mode} image holds NaN or infinite values")
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
    labelled: bool = False,
    open_steps: bool = False,
) -> DecodedTrajectory:
    """Raw sample → ``DecodedTrajectory``; raises ``SampleError`` (a ``ValueError``) when unusable.

    ``labelled`` (labelled, val and test data): every step needs a non-empty action and a task; otherwise
    actions that are not non-empty strings become None. ``tasks``: keep only trajectories with a step in these.
    ``open_steps``: accept an open trajectory (its last action has no next state; evaluation only).
    """
    key = str(sample.get("__key__", "?"))
    where = f"sample {key} in {sample.get('__url__', '?')}"
    meta = _load_json(sample, "meta.json", where) if "meta.json" in sample else {}
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"{where}: meta.json must be an object")
    frames: dict[int, str] = {}
    for name in sample:
        if m := _FRAME.fullmatch(name):
            if int(m.group(1)) in frames:
                raise SampleError(
                    "duplicate_member", f"{where}: frame {m.group(1)} given twice ({frames[int(m.group(1))]}, {name})"
                )
            frames[int(m.group(1))] = name
    length, is_open = len(frames), meta.get("open") is True
    if length < 2 - is_open or sorted(frames) != list(range(length)):
        at_least = "T >= 1 (open)" if is_open else "T >= 2"
        raise SampleError("missing_state", f"{where}: frames {sorted(frames)} are not 0..T-1 with {at_least}")
    if "actions.json" in sample:
        actions = _load_json(sample, "actions.json", where)
    elif labelled:
        raise SampleError("missing_actions", f"{where}: no actions.json in a split that needs actions")
    else:
        actions = [None] * (length - 1)  # state-only data
    if is_open and not open_steps:
        raise SampleError(
            "no_target", f"{where}: its last action has no next state; only the test split evaluates such steps"
        )
    if not isinstance(actions, list) or len(actions) != length - 1 + is_open:
        need = f"{length} actions, the last open" if is_open else f"{length - 1} actions"
        raise SampleError("actions_length", f"{where}: {length} frames need a list of {need}")
    usable = [isinstance(a, str) and a.strip() != "" for a in actions]
    if is_open and not usable[-1]:
        raise SampleError("bad_action", f"{where}: the open last action is empty or not a string: {actions[-1]!r}")
    if labelled and not all(usable):
        raise SampleError("bad_action", f"{where}: empty or non-string action in {actions!r}")
    actions = [a.strip() if ok else None for a, ok in zip(actions, usable)]
    record = DecodedTrajectory(key, torch.empty(0), actions, meta, str(sample.get("__url__", "")))
    if labelled and not all(record.task_at(t).strip() for t in range(len(actions))):
        raise SampleError("bad_task", f"{where}: task {meta.get('task')!r} is not a non-empty string")
    if tasks is not None:
        wanted = set(tasks)
        if not any(record.task_at(t) in wanted for t in range(len(actions))):
            raise SampleError("task", f"{where}: task {meta.get('task')!r} not in {sorted(wanted)}")
    try:
        images = [decode_image(sample[frames[t]], image_size) for t in range(length)]
    except SampleError as exn:
        raise SampleError(exn.reason, f"{where}: {exn.detail}") from exn
    if image_size is None and len({tuple(i.shape) for i in images}) > 1:
        raise SampleError("bad_image", f"{where}: frames differ in size and no image_size was given")
    record.images = torch.stack(images)
    return record


def iter_samples(urls: Iterable[str], skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", "0.png": bytes, ...}`` of local tar shards, in order.

    Members group into samples as in webdataset (key: the name up to the first '.' of its last part; extension
    lower-cased), but nothing is lost unseen: a shard that cannot be read or that stops before its end-of-archive
    marker (truncated, or a garbage header that ``tarfile`` takes for the end) counts as ``bad_shard``, and the
    sample it was reading is dropped; a sample holding a member twice counts as ``duplicate_member``; a key seen
    before in these shards counts as ``duplicate_key`` (the first sample with it is kept).
    """
    seen: set[str] = set()
    for url in urls:
        yield from _shard_samples(url, seen, skipped)


def _shard_samples(url: str, seen: set[str], skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    sample: dict[str, Any] = {}
    problem: tuple[str, str] | None = None  # (reason, detail) that makes the sample being read unusable
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                match = _MEMBER.fullmatch(member.name)
                if not member.isreg() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != sample.get("__key__"):
                    if sample:
                        yield from _finish(sample, problem, skipped)
                    sample, problem = {"__key__": key, "__url__": url}, None
                    if key in seen:
                        problem = ("duplicate_key", f"sample {key} in {url}: key seen before; the first is kept")
                    seen.add(key)
                if ext in sample and problem is None:
                    problem = ("duplicate_member", f"sample {key} in {url}: {member.name} appears twice")
                data = tar.extractfile(member).read()
                sample.setdefault(ext, data)
            f.seek(tar.offset)
            if f.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset} (truncated or garbage header)")
    except (OSError, tarfile.TarError) as exn:
        lost = f"; sample {sample['__key__']} and any after it are lost" if sample else ""
        skipped.record("bad_shard", f"unreadable or truncated shard {url}: {exn}{lost}")
        return
    if sample:
        yield from _finish(sample, problem, skipped)


def _finish(sample: dict[str, Any], problem: tuple[str, str] | None, skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    if problem is None:
        yield sample
    else:
        skipped.record(*problem)


def iter_trajectories(
    urls: Iterable[str],
    image_size: int | None,
    skipped: SkipCounter,
    tasks: Iterable[str] | None = None,
    labelled: bool = False,
    open_steps: bool = False,
) -> Iterator[DecodedTrajectory]:
    """Decoded trajectories of the given shards, in order; bad samples are skipped and counted."""
    for sample in iter_samples(urls, skipped):
        try:
            yield decode_trajectory(sample, image_size, tasks, labelled, open_steps)
        except SampleError as exn:
            skipped.record(exn.reason, exn.detail)
