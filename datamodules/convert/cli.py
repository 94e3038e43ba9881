"""``python -m datamodules.convert NAME ...``: one subcommand per converter, all with the same flags and output.

Every converter takes ``--out`` (the shard folder), ``--shard-size``, ``--image-size`` and ``--report``, prints
one ``skipped WHERE: REASON: DETAIL`` line per input it left out on stderr and its summary on stdout, and exits
with status 2 and one ``error: ...`` line, ``--out`` untouched, when a setting is wrong or nothing would be written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import aurora, bytemorph, video
from .report import ConversionReport


@dataclass(frozen=True)
class Converter:
    """A subcommand: its own source flags (``add_arguments``) and the conversion (``run``, given all flags)."""

    help: str
    writes: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], ConversionReport]


CONVERTERS: dict[str, Converter] = {
    "aurora": Converter(
        "Aurora-Bench layout (test.json + images) → labelled pairs", "aurora-*.tar", aurora.add_arguments, aurora.run
    ),
    "video": Converter(
        "video files and frame folders → state-only trajectories (SSIM-filtered)",
        "video-train-*.tar and video-val-*.tar",
        video.add_arguments,
        video.run,
    ),
    "bytemorph": Converter(
        "ByteMorph-Bench parquet or side-by-side images + JSON → labelled pairs",
        "bytemorph-*.tar",
        bytemorph.add_arguments,
        bytemorph.run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datamodules.convert", description="Convert data to shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, converter in CONVERTERS.items():
        sub = commands.add_parser(name, help=converter.help, description=converter.help)
        converter.add_arguments(sub)
        sub.add_argument("--out", required=True, help=f"output folder for {converter.writes}")
        sub.add_argument("--shard-size", type=int, default=500, help="trajectories per tar")
        sub.add_argument(
            "--image-size",
            type=int,
            default=None,
            help="resize to N×N (default: keep the originals; video: the centred square)",
        )
        sub.add_argument("--report", default=None, help="also write the report as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = CONVERTERS[args.command].run(args)
    except (ValueError, OSError) as exn:
        parser.exit(2, f"error: {exn}\n")
    for where, reason, detail in report.problems():  # inputs left out by a filter were asked for: not listed
        print(f"skipped {where}: {reason}: {detail}", file=sys.stderr)
    if args.report is not None:
        Path(args.report).write_text(json.dumps(report.as_dict(), indent=1))
    print(report.summary())
