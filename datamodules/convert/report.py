"""What every converter shares: the report it returns, image loading, and the staged write that never destroys data."""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..shards import staged_folder, to_rgb

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ConversionReport:
    """What a conversion wrote, dropped and skipped.

    ``skipped``: inputs left out (an entry, a row, a video), by reason; ``details`` holds one
    ``(where, reason, detail)`` line per skipped input, and reasons in ``asked`` (a filter the user chose, such as
    ``--tasks``) are counted there but are not problems. ``dropped``: pairs of otherwise usable inputs left out by a
    filter (the video converter's SSIM filter), by reason.
    """

    inputs: int = 0
    written: int = 0  # trajectories
    pairs: int = 0  # consecutive (x_t, x_{t+1}) pairs in them
    target_free: int = 0  # open steps among them: a source and an action, the next state unknown (benchmarks)
    shards: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    details: list[tuple[str, str, str]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    frames_decoded: int = 0  # video only: every decoded frame, sampled or not
    asked: frozenset[str] = frozenset({"task"})

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.details.append((where, reason, detail))

    def wrote(self, states: int, open_step: bool = False) -> None:
        """Count one written trajectory of ``states`` states (``open_step``: plus a last action without its next
        state, counted as a pair without a target)."""
        self.written += 1
        self.pairs += states - 1 + open_step
        self.target_free += open_step

    def problems(self) -> list[tuple[str, str, str]]:
        """The skipped inputs that were not asked for, in input order."""
        return [d for d in self.details if d[1] not in self.asked]

    def summary(self) -> str:
        if self.pairs == self.written:
            wrote = f"written {self.written} pairs in {len(self.shards)} shards"
        else:
            wrote = f"written {self.written} trajectories ({self.pairs} pairs) in {len(self.shards)} shards"
        if self.target_free:
            wrote = wrote.replace(" in ", f" ({self.target_free} without a target, for test only) in ", 1)
        dropped = f"; dropped {self.dropped.total()} pairs ({_reasons(self.dropped)})" if self.dropped else ""
        return f"{wrote}{dropped}; {self.skips()}"

    def skips(self) -> str:
        return f"skipped {self.skipped.total()} ({_reasons(self.skipped)})"

    def nothing_written(self, source: object, out: object, empty: str = "no input found") -> ValueError:
        """The error a conversion raises when it would write no trajectory (``out`` is left as it was)."""
        problems = self.problems()
        first = f"; first: {problems[0][0]}: {problems[0][1]}: {problems[0][2]}" if problems else ""
        dropped = f", dropped {self.dropped.total()} pairs ({_reasons(self.dropped)})" if self.dropped else ""
        why = f"{self.skips()}{dropped}{first}" if self.inputs else empty
        return ValueError(f"nothing to write from {source} ({why}); {out} left as it was")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--report``)."""
        return {
            "inputs": self.inputs,
            "written": self.written,
            "pairs": self.pairs,
            "target_free": self.target_free,
            "shards": [str(p) for p in self.shards],
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "frames_decoded": self.frames_decoded,
            "details": [{"where": w, "reason": r, "detail": d} for w, r, d in self.details],
        }


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items())) or "none"


def load_image(data: bytes, image_size: int | None) -> Image.Image | bytes:
    """Original PNG/JPEG bytes when no resize is asked (no recompression); otherwise a decoded RGB image."""
    with Image.open(io.BytesIO(data)) as raw:
        raw.load()  # decode fully now: a truncated file must be skipped here, not crash a training run
        if image_size is None and data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
            return data
        image = to_rgb(raw)
    return resize(image, image_size)


def resize(image: Image.Image, image_size: int | None) -> Image.Image:
    """``image_size`` × ``image_size`` (bicubic), or unchanged when None or already that size."""
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


def key_stem(name: str) -> str:
    """``name`` as a shard key part: webdataset splits keys at '.', and '/' would make a folder."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def check_sizes(image_size: int | None, shard_size: int) -> None:
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")


@contextmanager
def staged_shards(out: str | Path, prefixes: Iterable[str]) -> Iterator[Path]:
    """A staging folder for new ``{prefix}-*.tar`` shards that replaces those in ``out`` only once the block ends.

    An exception in the block (a conversion that writes nothing raises ``nothing_written``) leaves ``out`` as it was;
    files in ``out`` with other names stay.
    """
    replaces = [p for prefix in prefixes for p in (f"{prefix}-*.tar", f"{prefix}-*.tar.tmp")]
    with staged_folder(out, replaces=replaces) as stage:
        yield stage
