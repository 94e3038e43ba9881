"""Converters from public layouts to trajectory shards (layout in the README, "Train on your own data").

    python -m datamodules.convert aurora --root DIR --json DIR/test.json --out OUT [--tasks magicbrush ag]

``aurora``: the Aurora-Bench layout (a JSON list of ``{"input", "output", "instruction", "task", ...}`` with
image paths relative to ``--root``); one pair (T = 2) per entry, the instruction as the action.

A conversion never destroys data: the new shards are written into a staging folder beside ``--out`` that
replaces the old ``aurora-*.tar`` only once complete, and one that would write nothing is an error that
leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .shards import Trajectory, staged_folder, to_rgb, write_shards

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ConversionReport:
    """What a conversion wrote and what it skipped (reason → count, plus one line per skipped entry)."""

    written: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    details: list[tuple[int, str, str]] = field(default_factory=list)  # (entry index, reason, detail)

    def skip(self, index: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.details.append((index, reason, detail))

    def summary(self) -> str:
        return f"written {self.written} pairs in {len(self.shards)} shards; {self.skips()}"

    def skips(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())) or "none"
        return f"skipped {self.skipped.total()} ({reasons})"


def _load_image(path: Path, image_size: int | None) -> Image.Image | bytes:
    """Original PNG/JPEG bytes when no resize is asked (no recompression); otherwise a decoded RGB image."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as raw:
        raw.load()  # decode fully now: a truncated file must be skipped here, not crash a training run
        if image_size is None and data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
            return data
        image = to_rgb(raw)
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


def _inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` unless that leaves ``root`` (an absolute path or '..'); judged on the names, so that
    symlinks the user placed inside ``root`` still work."""
    path = Path(os.path.abspath(root / relative))
    return path if path.is_relative_to(os.path.abspath(root)) else None


def _aurora_trajectories(
    entries: list[Any], root: Path, stem: str, tasks: set[str] | None, image_size: int | None, report: ConversionReport
) -> Iterator[Trajectory]:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            report.skip(i, "bad_entry", f"not an object: {entry!r:.80}")
            continue
        task, instruction = entry.get("task"), entry.get("instruction")
        if not isinstance(task, str) or not task.strip():
            report.skip(i, "bad_task", f"task {task!r}")
            continue
        if tasks is not None and task not in tasks:
            report.skip(i, "task", f"task {task!r} not selected")
            continue
        if not isinstance(instruction, str) or not instruction.strip():
            report.skip(i, "empty_instruction", f"instruction {instruction!r}")
            continue
        if not entry.get("input") or not entry.get("output"):
            report.skip(i, "no_output" if entry.get("input") else "no_input", "entry has no image path")
            continue
        paths = [_inside(root, str(entry[name])) for name in ("input", "output")]
        if None in paths:
            report.skip(i, "outside_root", f"{entry['input']!r} or {entry['output']!r} leaves {root}")
            continue
        images = []
        for path in paths:
            try:
                images.append(_load_image(path, image_size))
            except FileNotFoundError:
                report.skip(i, "missing_file", str(path))
                break
            except Exception as exn:
                report.skip(i, "bad_image", f"{path}: {type(exn).__name__}: {exn}")
                break
        if len(images) != 2:
            continue
        extra = {k: v for k, v in entry.items() if k not in ("instruction", "task")}
        meta = {"task": task, "source": "aurora-bench", "index": i, **extra}
        report.written += 1
        yield Trajectory(f"aurora-{stem}-{i:06d}", images, [instruction.strip()], meta)


def convert_aurora(
    root: str | Path,
    json_path: str | Path,
    out: str | Path,
    tasks: list[str] | None = None,
    shard_size: int = 500,
    image_size: int | None = None,
) -> ConversionReport:
    """Aurora-Bench JSON + images → ``out/aurora-*.tar``, replacing the ones there only once all are written.

    Raises a ValueError (``out`` left as it was) for bad settings, unknown ``tasks`` (listing the known ones),
    a JSON file that is not a list of entries, or a conversion that would write no pair.
    """
    root, json_path = Path(root), Path(json_path)
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a folder")
    if not json_path.exists() and (root / json_path).exists():
        json_path = root / json_path
    try:
        entries = json.loads(json_path.read_text())
    except ValueError as exn:  # JSONDecodeError, UnicodeDecodeError: neither names the file
        raise ValueError(f"{json_path}: not valid JSON ({exn})") from exn
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of entries")
    known = sorted({e["task"] for e in entries if isinstance(e, dict) and isinstance(e.get("task"), str)})
    if tasks is not None:
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks in {json_path}: {known}")
    report = ConversionReport()
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", json_path.stem)  # keys may not hold '.' (webdataset splits there)
    trajs = _aurora_trajectories(entries, root, stem, set(tasks) if tasks else None, image_size, report)
    with staged_folder(out, replaces=["aurora-*.tar", "aurora-*.tar.tmp"]) as stage:
        shards = write_shards(trajs, stage, prefix="aurora", shard_size=shard_size)
        if not shards:
            first = next((f"; first: entry {i}: {r}: {d}" for i, r, d in report.details if r != "task"), "")
            why = report.skips() + first if entries else "the list is empty"
            raise ValueError(f"no pair to write from {json_path} ({why}); {out} left as it was")
    report.shards = [Path(out) / p.name for p in shards]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.convert", description="Convert data to shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    aurora = commands.add_parser("aurora", help="Aurora-Bench layout (test.json + images)")
    aurora.add_argument("--root", required=True, help="folder the image paths in the JSON are relative to")
    aurora.add_argument("--json", required=True, help="the entries file, e.g. DIR/test.json")
    aurora.add_argument("--out", required=True, help="output folder for aurora-*.tar")
    aurora.add_argument("--tasks", nargs="+", default=None, help="keep only these tasks (default: all)")
    aurora.add_argument("--shard-size", type=int, default=500, help="pairs per tar")
    aurora.add_argument("--image-size", type=int, default=None, help="resize to N×N (default: keep the originals)")
    args = parser.parse_args(argv)
    try:
        report = convert_aurora(args.root, args.json, args.out, args.tasks, args.shard_size, args.image_size)
    except (ValueError, OSError) as exn:
        parser.exit(2, f"error: {exn}\n")
    for index, reason, detail in report.details:
        if reason != "task":  # entries left out by --tasks were asked for; list only the problems
            print(f"skipped entry {index}: {reason}: {detail}", file=sys.stderr)
    print(report.summary())


if __name__ == "__main__":
    main()
