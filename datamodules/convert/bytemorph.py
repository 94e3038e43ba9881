"""ByteMorph → labelled pair shards: one pair per sample, the edit prompt as the action and the edit type as the task.

    python -m datamodules.convert bytemorph --src BM-Bench/data --out OUT [--tasks TYPE ...] [--layout auto]

Two layouts (``--layout auto`` picks parquet when ``--src`` is or holds a ``.parquet`` file):

- ``parquet``, as ByteMorph-Bench is published (ByteDance-Seed/BM-Bench, ``data/test-*.parquet``): one row per
  sample with ``src_img`` and ``tgt_img`` (encoded image bytes, or Hugging Face image structs ``{"bytes", "path"}``),
  ``edit_prompt`` and ``edit_type``; the other columns (``image_id``, ``edit_prompt_rewrite_instruction``, the
  captions) go into ``meta.json``. Files are read a few rows at a time, never whole.
- ``side-by-side``, as the official code reads its folders (ByteMorph's ``image_datasets/dataset.py``): each image
  (``.png``, ``.jpg``) holds the source in its left half and the target in its right half, beside a JSON file of the
  same stem with the instruction under ``"edit"`` (or ``"edit_prompt"``) and the type under ``"edit_type"``, or else
  the type is the name of the image's folder (as its evaluation reads ``ByteMorph-Bench-Test/<type>/<id>.png``).

Writes ``OUT/bytemorph-*.tar``. PNG/JPEG bytes of the parquet layout are kept as they are unless ``--image-size``
resizes them; the halves of a side-by-side image are stored as PNG.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from ..shards import Trajectory, to_rgb, write_shards
from .report import ConversionReport, check_sizes, key_stem, load_image, resize, staged_shards

PREFIX = "bytemorph"
REQUIRED_COLUMNS = ("src_img", "tgt_img", "edit_prompt", "edit_type")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUTS = ("auto", "parquet", "side-by-side")
_BATCH_ROWS = 16  # rows held decoded at once (a row holds two full-size images)


def _parquet_files(src: Path) -> list[Path]:
    return [src] if src.is_file() else sorted(src.rglob("*.parquet"))


def _scalar_fields(record: dict[str, Any], leave_out: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: v for k, v in record.items() if k not in leave_out and (v is None or isinstance(v, (str, int, float, bool)))
    }


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _image_bytes(cell: object) -> bytes | None:
    if isinstance(cell, dict):  # a Hugging Face ``Image`` feature: {"bytes": ..., "path": ...}
        cell = cell.get("bytes")
    return bytes(cell) if isinstance(cell, (bytes, bytearray)) and cell else None


def _edit_usable(
    report: ConversionReport,
    where: str,
    task: str | None,
    instruction: str | None,
    tasks: set[str] | None,
    no_task: str,
    no_instruction: str,
) -> bool:
    """Whether a sample's edit type and instruction make a labelled pair; if not, it is skipped in ``report`` with its
    reason (``no_task`` / ``no_instruction``: what the layout held instead)."""
    if task is None:
        report.skip(where, "bad_task", no_task)
    elif tasks is not None and task not in tasks:
        report.skip(where, "task", f"edit type {task!r} not selected")
    elif instruction is None:
        report.skip(where, "empty_instruction", no_instruction)
    else:
        return True
    return False


def _parquet_rows(files: list[Path], src: Path) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(row index in its file, row, file name relative to ``src``) for every row, a batch of rows at a time."""
    for path in files:
        parquet = pq.ParquetFile(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; it has {parquet.schema_arrow.names}")
        name = path.name if path == src else path.relative_to(src).as_posix()
        row = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                yield row, record, name
                row += 1


def _parquet_trajectories(
    files: list[Path], src: Path, stem: str, tasks: set[str] | None, image_size: int | None, report: ConversionReport
) -> Iterator[Trajectory]:
    for row, record, name in _parquet_rows(files, src):
        where = f"row {row} of {name}"
        report.inputs += 1
        task, instruction = _text(record.get("edit_type")), _text(record.get("edit_prompt"))
        no_task, no_instruction = f"edit_type {record.get('edit_type')!r}", f"edit_prompt {record.get('edit_prompt')!r}"
        if not _edit_usable(report, where, task, instruction, tasks, no_task, no_instruction):
            continue
        images = []
        for column, reason in (("src_img", "no_input"), ("tgt_img", "no_output")):
            data = _image_bytes(record.get(column))
            if data is None:
                report.skip(where, reason, f"{column} holds no image bytes")
                break
            try:
                images.append(load_image(data, image_size))
            except Exception as exn:  # PIL raises many kinds for a damaged image
                report.skip(where, "bad_image", f"{column}: {type(exn).__name__}: {exn}")
                break
        if len(images) != 2:
            continue
        meta = {"task": task, "source": "bytemorph", "layout": "parquet", "file": name, "row": row}
        meta |= _scalar_fields(record, (*REQUIRED_COLUMNS, "task", "source"))
        report.wrote(2)
        yield Trajectory(f"{PREFIX}-{stem}-{report.written - 1:06d}", images, [instruction], meta)


def _side_by_side_images(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _halves(path: Path, image_size: int | None) -> list[Image.Image]:
    """Left half (source) and right half (target), split at ``width // 2`` as the official code does."""
    with Image.open(path) as raw:
        raw.load()
        image = to_rgb(raw)
    w, h = image.size
    if w < 2:
        raise ValueError(f"{w} px wide: no two halves")
    return [resize(image.crop(box), image_size) for box in ((0, 0, w // 2, h), (w // 2, 0, w, h))]


def _side_by_side_trajectories(
    images: list[Path], src: Path, stem: str, tasks: set[str] | None, image_size: int | None, report: ConversionReport
) -> Iterator[Trajectory]:
    for path in images:
        name = path.relative_to(src).as_posix()
        report.inputs += 1
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            report.skip(name, "missing_json", f"no {sidecar.name} beside it")
            continue
        try:
            info = json.loads(sidecar.read_text())
        except ValueError as exn:
            report.skip(name, "bad_json", f"{sidecar.name}: {exn}")
            continue
        if not isinstance(info, dict):
            report.skip(name, "bad_json", f"{sidecar.name}: not an object")
            continue
        folder = path.parent.name if path.parent != src else None
        task = _text(info.get("edit_type", folder))
        instruction = _text(info.get("edit", info.get("edit_prompt")))
        no_task = f"no edit_type in {sidecar.name} and no type folder"
        if not _edit_usable(
            report, name, task, instruction, tasks, no_task, f"no edit (or edit_prompt) in {sidecar.name}"
        ):
            continue
        try:
            pair = _halves(path, image_size)
        except Exception as exn:  # PIL raises many kinds for a damaged image
            report.skip(name, "bad_image", f"{type(exn).__name__}: {exn}")
            continue
        meta = {"task": task, "source": "bytemorph", "layout": "side-by-side", "image": name}
        meta |= _scalar_fields(info, ("edit", "edit_prompt", "edit_type", "task", "source", "layout", "image"))
        report.wrote(2)
        yield Trajectory(f"{PREFIX}-{stem}-{report.written - 1:06d}", pair, [instruction], meta)


def _known_tasks(layout: str, files: list[Path], src: Path) -> set[str]:
    if layout == "parquet":
        found = set()
        for path in files:
            if "edit_type" in pq.ParquetFile(path).schema_arrow.names:
                found |= {
                    t for v in pq.read_table(path, columns=["edit_type"]).column(0).to_pylist() if (t := _text(v))
                }
        return found
    found = set()
    for path in files:
        try:
            info = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        folder = path.parent.name if path.parent != src else None
        if isinstance(info, dict) and (task := _text(info.get("edit_type", folder))):
            found.add(task)
    return found


def convert_bytemorph(
    src: str | Path,
    out: str | Path,
    layout: str = "auto",
    tasks: list[str] | None = None,
    shard_size: int = 500,
    image_size: int | None = None,
) -> ConversionReport:
    """ByteMorph parquet or side-by-side folders → ``out/bytemorph-*.tar``, replacing the old ones once complete.

    Raises a ValueError (``out`` left as it was) for bad settings, a parquet file without the required columns,
    unknown ``tasks`` (listing the known ones), or a conversion that would write no pair.
    """
    src = Path(src)
    check_sizes(image_size, shard_size)
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if not src.exists():
        raise ValueError(f"--src {src} does not exist")
    if layout == "auto":
        has_parquet = src.suffix == ".parquet" if src.is_file() else any(src.rglob("*.parquet"))
        layout = "parquet" if has_parquet else "side-by-side"
    if layout == "side-by-side" and not src.is_dir():
        raise ValueError(f"--src {src}: the side-by-side layout is a folder of images and JSON files")
    files = _parquet_files(src) if layout == "parquet" else _side_by_side_images(src)
    if tasks is not None:
        known = sorted(_known_tasks(layout, files, src))
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; edit types in {src}: {known}")
    report = ConversionReport()
    stem = key_stem(src.stem if src.is_file() else src.name)
    wanted = set(tasks) if tasks else None
    if layout == "parquet":
        trajs = _parquet_trajectories(files, src, stem, wanted, image_size, report)
    else:
        trajs = _side_by_side_trajectories(files, src, stem, wanted, image_size, report)
    with staged_shards(out, [PREFIX]) as stage:
        shards = write_shards(trajs, stage, prefix=PREFIX, shard_size=shard_size)
        if not shards:
            raise report.nothing_written(src, out, empty=f"no {layout} sample in it")
    report.shards = [Path(out) / p.name for p in shards]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="a .parquet file, a folder of them, or a side-by-side folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="default: parquet if --src holds any")
    parser.add_argument("--tasks", nargs="+", default=None, help="keep only these edit types (default: all)")


def run(args: argparse.Namespace) -> ConversionReport:
    return convert_bytemorph(args.src, args.out, args.layout, args.tasks, args.shard_size, args.image_size)
