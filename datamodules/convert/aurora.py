"""Aurora-Bench layout → labelled pair shards.

    python -m datamodules.convert aurora --root DIR --json DIR/test.json --out OUT [--tasks magicbrush ag]

A JSON list of ``{"input", "output", "instruction", "task", ...}`` with image paths relative to ``--root``; one
pair (T = 2) per entry, the instruction as the action, written as ``OUT/aurora-*.tar``. An entry without
``output`` (the whole benchmark's ``clevr``, ``emu`` and ``epic`` tasks give a source image and an instruction only)
becomes an open trajectory: the source, and the instruction as an action whose next state is unknown. Only the test
split reads those: ``test`` generates their next states and scores them with the metrics that need no target.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ..shards import Trajectory, write_shards
from .report import ConversionReport, check_sizes, key_stem, load_image, staged_shards

PREFIX = "aurora"


def _load_image(path: Path, image_size: int | None) -> Image.Image | bytes:
    return load_image(path.read_bytes(), image_size)


def _inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` unless that leaves ``root`` (an absolute path or '..'); judged on the names, so that
    symlinks the user placed inside ``root`` still work."""
    path = Path(os.path.abspath(root / relative))
    return path if path.is_relative_to(os.path.abspath(root)) else None


def _aurora_trajectories(
    entries: list[Any], root: Path, stem: str, tasks: set[str] | None, image_size: int | None, report: ConversionReport
) -> Iterator[Trajectory]:
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            report.skip(where, "bad_entry", f"not an object: {entry!r:.80}")
            continue
        task, instruction = entry.get("task"), entry.get("instruction")
        if not isinstance(task, str) or not task.strip():
            report.skip(where, "bad_task", f"task {task!r}")
            continue
        if tasks is not None and task not in tasks:
            report.skip(where, "task", f"task {task!r} not selected")
            continue
        if not isinstance(instruction, str) or not instruction.strip():
            report.skip(where, "empty_instruction", f"instruction {instruction!r}")
            continue
        if not entry.get("input"):
            report.skip(where, "no_input", "entry has no input image path")
            continue
        names = ("input", "output") if entry.get("output") else ("input",)  # no output: a target-free entry
        paths = [_inside(root, str(entry[name])) for name in names]
        if None in paths:
            report.skip(where, "outside_root", f"{' or '.join(repr(entry[n]) for n in names)} leaves {root}")
            continue
        images = []
        for path in paths:
            try:
                images.append(_load_image(path, image_size))
            except FileNotFoundError:
                report.skip(where, "missing_file", str(path))
                break
            except Exception as exn:
                report.skip(where, "bad_image", f"{path}: {type(exn).__name__}: {exn}")
                break
        if len(images) != len(paths):
            continue
        extra = {k: v for k, v in entry.items() if k not in ("instruction", "task")}
        meta = {"task": task, "source": "aurora-bench", "index": i, **extra}
        if len(images) == 1:
            meta["open"] = True  # the instruction's next state is unknown: test data only
        report.wrote(len(images), open_step=len(images) == 1)
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
    check_sizes(image_size, shard_size)
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
    report = ConversionReport(inputs=len(entries))
    stem = key_stem(json_path.stem)
    trajs = _aurora_trajectories(entries, root, stem, set(tasks) if tasks else None, image_size, report)
    with staged_shards(out, [PREFIX]) as stage:
        shards = write_shards(trajs, stage, prefix=PREFIX, shard_size=shard_size)
        if not shards:
            raise report.nothing_written(json_path, out, empty="the list is empty")
    report.shards = [Path(out) / p.name for p in shards]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="folder the image paths in the JSON are relative to")
    parser.add_argument("--json", required=True, help="the entries file, e.g. DIR/test.json")
    parser.add_argument("--tasks", nargs="+", default=None, help="keep only these tasks (default: all)")


def run(args: argparse.Namespace) -> ConversionReport:
    return convert_aurora(args.root, args.json, args.out, args.tasks, args.shard_size, args.image_size)
