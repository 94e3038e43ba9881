"""Converters from public layouts to trajectory shards (layout and commands in the README, "Train on your own data").

    python -m datamodules.convert aurora --root DIR --json DIR/test.json --out OUT
    python -m datamodules.convert video --src VIDEOS --out OUT [--length 2] [--fps 2] [--val-fraction 0.1]
    python -m datamodules.convert bytemorph --src BM-Bench/data --out OUT

One module per converter, each returning a ``ConversionReport`` (``report.py``); ``cli.py`` holds the registry of
subcommands and their shared flags. A conversion never destroys data: new shards are written into a staging folder
beside ``--out`` that replaces the old ones only once complete, and one that would write nothing is an error that
leaves ``--out`` as it was.
"""

from .aurora import convert_aurora
from .bytemorph import convert_bytemorph
from .cli import CONVERTERS, main
from .report import ConversionReport
from .video import convert_video

__all__ = ["CONVERTERS", "ConversionReport", "convert_aurora", "convert_bytemorph", "convert_video", "main"]
