"""Video files and frame folders → state-only trajectory shards, with the paper's near-identical-pair filter.

    python -m datamodules.convert video --src VIDEOS --out OUT [--length 2] [--stride 1 | --fps F]
        [--image-size N] [--max-per-clip N] [--val-fraction 0.1] [--ssim-threshold 0.95] [--workers N]

A clip is a video file (``.mp4``, ``.webm``, ``.avi``, ``.mkv``, ``.mov``; decoded with PyAV one frame at a time)
or a folder holding frame images (``.png``, ``.jpg``; in natural order, ``motion_2`` before ``motion_10``), found
anywhere under ``--src``. From each clip's sampled frames (every ``--stride``-th, or ``--fps`` per second of video
time), consecutive windows of ``--length`` frames become trajectories with no actions; each window starts at the
last frame of the one before, so every sampled transition is in at most one trajectory.

SSIM filter (SWIRL drops pairs whose SSIM ≥ 0.95: nothing happens between them): a pair of consecutive sampled
frames at or above ``--ssim-threshold`` is dropped and *cuts* the clip there: the window in progress is abandoned
(its pairs are counted as ``incomplete``) and a new one starts at the later frame. So no written trajectory holds a
near-identical step, and with ``--length 2`` every sampled transition is either written or dropped as ``ssim``.
SSIM is measured on the stored frames in grayscale (PIL's ITU-R 601 luma), reduced to at most 256 px per side.

Clips are split into ``train`` and ``val`` by a hash of their path relative to ``--src``, so the frames of one clip
never reach both and a clip keeps its split across runs (``OUT/video-train-*.tar``, ``OUT/video-val-*.tar``).
Empty, corrupt or truncated files, and clips with fewer than ``--length`` sampled frames, are skipped and reported.
With ``--workers N`` clips are converted in N processes; the shards are the same bytes whatever N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..shards import SkipCounter, Trajectory, iter_samples, to_rgb, write_shards
from .report import ConversionReport, check_sizes, key_stem, staged_shards
from .ssim import ssim

PREFIX = "video"
SPLITS = ("train", "val")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
SSIM_MAX_SIDE = 256
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_STATE = re.compile(r"(\d+)\.(png|jpg)")


@dataclass(frozen=True)
class VideoSettings:
    """How clips become trajectories (the ``video`` flags; see the module docstring)."""

    length: int = 2
    stride: int = 1
    fps: float | None = None
    image_size: int | None = None
    max_per_clip: int | None = None
    ssim_threshold: float = 0.95
    task: str = "video"


@dataclass(frozen=True)
class Clip:
    """One input: a video file or a frame folder; ``name`` is its path relative to ``--src``."""

    path: Path
    name: str
    folder: bool
    split: str

    @property
    def key(self) -> str:
        digest = hashlib.sha1(self.name.encode()).hexdigest()[:8]  # names that sanitise alike stay apart
        return f"{key_stem(Path(self.name).stem)[:40]}-{digest}"


def split_of(name: str, val_fraction: float) -> str:
    """``"val"`` for a share ``val_fraction`` of clip names, by hash: the same name always gets the same split."""
    draw = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return "val" if draw < val_fraction else "train"


def _natural(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def find_clips(src: Path, val_fraction: float = 0.0) -> list[Clip]:
    """Video files and frame folders under ``src`` (or ``src`` itself, a video file), sorted by relative path."""
    if src.is_file():
        return [Clip(src, src.name, False, split_of(src.name, val_fraction))]
    clips = []
    for folder, _, files in os.walk(src):
        here = Path(folder)
        if any(Path(f).suffix.lower() in FRAME_SUFFIXES for f in files):
            name = here.relative_to(src).as_posix() if here != src else src.name
            clips.append(Clip(here, name, True, split_of(name, val_fraction)))
        for f in files:
            if Path(f).suffix.lower() in VIDEO_SUFFIXES:
                name = (here / f).relative_to(src).as_posix()
                clips.append(Clip(here / f, name, False, split_of(name, val_fraction)))
    return sorted(clips, key=lambda c: _natural(c.name))


class _Frame(NamedTuple):
    index: int  # in the clip, before sampling
    time: float | None  # seconds of video time; None in frame folders
    stored: Image.Image | bytes  # what goes into the shard
    gray: np.ndarray  # (h, w) in [0, 1], what SSIM compares


@dataclass
class _ClipStats:
    frames: int = 0  # decoded (videos: every frame; folders: the sampled ones)
    sampled: int = 0
    trajectories: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _square(image: Image.Image, size: int | None) -> Image.Image:
    """The centred square of ``image`` resized to ``size`` × ``size`` (bicubic); unchanged when ``size`` is None."""
    if size is None:
        return image
    w, h = image.size
    if (w, h) == (size, size):
        return image
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def _gray(image: Image.Image) -> np.ndarray:
    gray = image.convert("L")
    factor = math.ceil(max(gray.size) / SSIM_MAX_SIDE)
    if factor > 1:  # SSIM of full HD frames would cost more than decoding them
        gray = gray.reduce(factor)
    return np.asarray(gray, dtype=np.float64) / 255.0


def _video_frames(path: Path, s: VideoSettings, stats: _ClipStats) -> Iterator[_Frame]:
    if path.stat().st_size == 0:
        raise _Skip("empty_file", "zero bytes")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _Skip("no_video_stream", f"streams: {[st.type for st in container.streams]}")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else None
        next_time: float | None = None
        for i, frame in enumerate(container.decode(stream)):
            stats.frames += 1
            time = frame.time
            if s.fps is None:
                if i % s.stride:
                    continue
            else:
                if time is None:
                    if rate is None:
                        raise _Skip("no_timestamps", "frames carry no time and the stream no rate; use --stride")
                    time = i / rate
                if next_time is not None and time < next_time - 1e-6:
                    continue
                next_time = (time if next_time is None else next_time) + 1.0 / s.fps
                while next_time <= time + 1e-6:  # after a gap in the video, one frame, not a burst
                    next_time += 1.0 / s.fps
            image = _square(frame.to_image(), s.image_size)
            yield _Frame(i, time, image, _gray(image))


def _folder_frames(folder: Path, s: VideoSettings, stats: _ClipStats) -> Iterator[_Frame]:
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() in FRAME_SUFFIXES), key=lambda f: _natural(f.name))
    for i, path in enumerate(files[:: s.stride]):
        stats.frames += 1
        data = path.read_bytes()
        try:
            with Image.open(path) as raw:
                raw.load()
                image = to_rgb(raw)
        except Exception as exn:  # PIL raises many kinds; one bad frame makes the folder unusable as a clip
            raise _Skip("bad_frame", f"{path.name}: {type(exn).__name__}: {exn}") from exn
        keep_bytes = s.image_size is None and data.startswith((_PNG_MAGIC, _JPEG_MAGIC))
        image = _square(image, s.image_size)
        yield _Frame(i * s.stride, None, data if keep_bytes else image, _gray(image))


def _trajectories(frames: Iterator[_Frame], clip: Clip, s: VideoSettings, stats: _ClipStats) -> Iterator[Trajectory]:
    """Windows of ``s.length`` frames, cut at every near-identical pair (module docstring)."""
    window: list[_Frame] = []
    scores: list[float] = []
    for frame in frames:
        stats.sampled += 1
        if window:
            score = ssim(window[-1].gray, frame.gray)
            if score >= s.ssim_threshold:
                stats.dropped["ssim"] += 1
                if len(window) > 1:
                    stats.dropped["incomplete"] += len(window) - 1
                window, scores = [frame], []
                continue
            scores.append(score)
        window.append(frame)
        if len(window) == s.length:
            meta = {
                "task": s.task,
                "source": "video",
                "clip": clip.name,
                "split": clip.split,
                "frames": [f.index for f in window],
                "times": [None if f.time is None else round(f.time, 6) for f in window],
                "ssim": [round(x, 6) for x in scores],
            }
            yield Trajectory(
                f"{clip.key}-{stats.trajectories:05d}", [f.stored for f in window], [None] * len(scores), meta
            )
            stats.trajectories += 1
            stats.pairs += s.length - 1
            if stats.trajectories == s.max_per_clip:
                return  # the rest of the clip is never decoded
            window, scores = [window[-1]], []
    if len(window) > 1:
        stats.dropped["incomplete"] += len(window) - 1


@dataclass(frozen=True)
class _Job:
    index: int
    clip: Clip
    settings: VideoSettings
    parts: Path  # folder for the clip's own tar, repacked into the shards in clip order


@dataclass
class _Result:
    job: _Job
    stats: _ClipStats
    part: Path | None = None
    skip: tuple[str, str] | None = None


def _convert_clip(job: _Job) -> _Result:
    """One clip → one tar of its trajectories (streamed: at most ``length`` frames are held at a time)."""
    clip, s, stats = job.clip, job.settings, _ClipStats()
    frames = _folder_frames(clip.path, s, stats) if clip.folder else _video_frames(clip.path, s, stats)
    try:
        with closing(frames):
            trajs = _trajectories(frames, clip, s, stats)
            parts = write_shards(trajs, job.parts, prefix=f"part{job.index:07d}", shard_size=2**62)
    except _Skip as exn:
        return _Result(job, stats, skip=(exn.reason, exn.detail))
    except (av.FFmpegError, OSError, EOFError) as exn:  # a corrupt or truncated file; a bug still raises
        return _Result(job, stats, skip=("bad_video", f"{type(exn).__name__}: {exn}"))
    if not stats.trajectories and stats.sampled < s.length:
        return _Result(job, stats, skip=("too_short", f"{stats.sampled} sampled frames, --length {s.length}"))
    return _Result(job, stats, part=parts[0] if parts else None)


def _run(jobs: list[_Job], workers: int, progress: bool) -> Iterator[_Result]:
    """Results in clip order, from ``workers`` processes (forked: they inherit the imports, torch's seconds)."""
    bar = tqdm(total=len(jobs), unit="clip", desc="video", disable=None if progress else True, leave=False)
    with bar:
        if workers == 1 or len(jobs) < 2:
            for job in jobs:
                yield _convert_clip(job)
                bar.update()
            return
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(min(workers, len(jobs))) as pool:
            for result in pool.imap(_convert_clip, jobs):
                yield result
                bar.update()


def _read_parts(paths: list[Path]) -> Iterator[Trajectory]:
    """The trajectories of the clips' tars, in order; each tar is removed once read (images pass through as bytes)."""
    for path in paths:
        for sample in iter_samples([str(path)], SkipCounter()):
            states = sorted((int(m.group(1)), name) for name in sample if (m := _STATE.fullmatch(name)))
            actions, meta = json.loads(sample["actions.json"]), json.loads(sample["meta.json"])
            yield Trajectory(sample["__key__"], [sample[name] for _, name in states], actions, meta)
        path.unlink()


def convert_video(
    src: str | Path,
    out: str | Path,
    length: int = 2,
    stride: int = 1,
    fps: float | None = None,
    image_size: int | None = None,
    max_per_clip: int | None = None,
    val_fraction: float = 0.0,
    ssim_threshold: float = 0.95,
    workers: int = 1,
    shard_size: int = 500,
    task: str = "video",
    progress: bool = True,
) -> ConversionReport:
    """Clips under ``src`` → ``out/video-{train,val}-*.tar``, replacing the ones there only once all are written.

    Raises a ValueError (``out`` left as it was) for bad settings, ``--fps`` with frame folders (they carry no
    time), or a conversion that would write no trajectory.
    """
    src = Path(src)
    check_sizes(image_size, shard_size)
    if length < 2:
        raise ValueError(f"--length must be >= 2 (2: pairs), got {length}")
    if stride < 1:
        raise ValueError(f"--stride must be >= 1, got {stride}")
    if fps is not None and stride != 1:
        raise ValueError("--fps and --stride exclude each other: give one")
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    if max_per_clip is not None and max_per_clip < 1:
        raise ValueError(f"--max-per-clip must be >= 1, got {max_per_clip}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not math.isfinite(ssim_threshold):
        raise ValueError(f"--ssim-threshold must be a number, got {ssim_threshold}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not task.strip():
        raise ValueError("--task-name must not be empty")
    if not src.exists():
        raise ValueError(f"--src {src} does not exist")
    clips = find_clips(src, val_fraction)
    if fps is not None and any(c.folder for c in clips):
        folder = next(c.name for c in clips if c.folder)
        raise ValueError(f"--fps needs frame times, and frame folders have none (e.g. {folder!r}): use --stride")
    settings = VideoSettings(length, stride, fps, image_size, max_per_clip, ssim_threshold, task.strip())
    report = ConversionReport(inputs=len(clips))
    parts: dict[str, list[Path]] = {split: [] for split in SPLITS}
    with staged_shards(out, [f"{PREFIX}-{split}" for split in SPLITS]) as stage:
        (stage / "parts").mkdir()
        jobs = [_Job(i, clip, settings, stage / "parts") for i, clip in enumerate(clips)]
        for result in _run(jobs, workers, progress):
            stats, clip = result.stats, result.job.clip
            report.frames_decoded += stats.frames
            report.dropped += stats.dropped
            if result.skip is not None:
                report.skip(clip.name, *result.skip)
                continue
            report.written += stats.trajectories
            report.pairs += stats.pairs
            if result.part is not None:
                parts[clip.split].append(result.part)
        shards = []
        for split in SPLITS:
            shards += write_shards(_read_parts(parts[split]), stage, prefix=f"{PREFIX}-{split}", shard_size=shard_size)
        shutil.rmtree(stage / "parts")
        if not shards:
            empty = f"no video file ({', '.join(VIDEO_SUFFIXES)}) or frame folder in it"
            raise report.nothing_written(src, out, empty=empty)
    report.shards = [Path(out) / p.name for p in shards]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="a folder searched recursively for clips, or one video file")
    parser.add_argument("--length", type=int, default=2, help="states per trajectory (2: pairs)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--stride", type=int, default=1, help="keep every K-th frame (default 1: all)")
    sampling.add_argument("--fps", type=float, default=None, help="keep F frames per second of video time")
    parser.add_argument("--max-per-clip", type=int, default=None, help="at most N trajectories per clip")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of clips (by name hash) for val")
    parser.add_argument(
        "--ssim-threshold", type=float, default=0.95, help="drop pairs with SSIM >= this (above 1: keep every pair)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes, one clip per task")
    parser.add_argument("--task-name", default="video", help="the task written into each trajectory's meta.json")


def run(args: argparse.Namespace) -> ConversionReport:
    return convert_video(
        args.src,
        args.out,
        length=args.length,
        stride=args.stride,
        fps=args.fps,
        image_size=args.image_size,
        max_per_clip=args.max_per_clip,
        val_fraction=args.val_fraction,
        ssim_threshold=args.ssim_threshold,
        workers=args.workers,
        shard_size=args.shard_size,
        task=args.task_name,
    )
