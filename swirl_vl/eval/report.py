"""The test report: per-example metrics summed and counted overall and per task, written as JSON and Markdown.

Means are ``sum / count`` per (task, metric), so batches of different sizes and metrics defined on different
subsets (NaN = no answer for that example, e.g. a sensitivity pair without a distinct partner) average
correctly. Under DDP each rank fills its own table and ``gather`` merges them; every rank then holds the
same totals. (Lightning's ``DistributedSampler`` pads the last batch with repeats of the first examples, so
a split that does not divide by the world size counts a few pairs twice.)
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

ALL = "all"


class MetricTable:
    """Sums and counts of per-example metrics, keyed by task (``"all"``: every example) and metric name."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, metrics: Mapping[str, Tensor], tasks: Sequence[str]) -> None:
        """Add a batch: ``metrics`` ``{name: (B,)}``, ``tasks`` the ``B`` examples' tasks; NaN values are skipped."""
        for name, values in metrics.items():
            values = values.detach().float().cpu()
            if values.shape != (len(tasks),):
                raise ValueError(f"metric {name!r} has shape {tuple(values.shape)} for {len(tasks)} examples")
            for task, value in zip(tasks, values.tolist()):
                if math.isnan(value):
                    continue
                for key in (ALL, task):
                    self.sums[key][name] += value
                    self.counts[key][name] += 1

    def merge(self, other: MetricTable) -> None:
        for task, sums in other.sums.items():
            for name, value in sums.items():
                self.sums[task][name] += value
                self.counts[task][name] += other.counts[task][name]

    def means(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: mean}}``, ``"all"`` first, then tasks in sorted order; metrics sorted."""
        tasks = sorted(self.sums, key=lambda t: (t != ALL, t))
        return {t: {n: self.sums[t][n] / self.counts[t][n] for n in sorted(self.sums[t])} for t in tasks}

    def rows(self) -> list[dict[str, Any]]:
        """One row per task (``"all"`` first): ``{"task", "pairs", <metric>: mean, …}``.

        ``pairs`` is the largest count of any metric of the row (turn metrics count trajectories instead).
        """
        return [
            {"task": task, "pairs": max(self.counts[task].values()), **means} for task, means in self.means().items()
        ]

    def state(self) -> dict[str, Any]:
        return {
            "sums": {t: dict(s) for t, s in self.sums.items()},
            "counts": {t: dict(c) for t, c in self.counts.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MetricTable:
        table = cls()
        for task, sums in state["sums"].items():
            table.sums[task].update(sums)
            table.counts[task].update(state["counts"][task])
        return table


def gather(table: MetricTable) -> MetricTable:
    """The table merged over all ranks (a collective: every rank must call it); ``table`` itself outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return table
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, table.state())
    merged = MetricTable()
    for state in states:
        merged.merge(MetricTable.from_state(state))
    return merged


def format_markdown(table: MetricTable) -> str:
    """A Markdown table: one row per metric, one column per task (``all`` first); ``–`` where undefined."""
    means = table.means()
    tasks = list(means)
    names = sorted({n for m in means.values() for n in m}, key=_metric_order)
    lines = [
        "| metric | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
        "| pairs | " + " | ".join(str(max(table.counts[t].values())) for t in tasks) + " |",
    ]
    for name in names:
        cells = [f"{means[t][name]:.4f}" if name in means[t] else "–" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric_order(name: str) -> tuple[int, str]:
    """Single-step metrics first, then turns in numeric order (``turn_10`` after ``turn_9``)."""
    if name.startswith("turn_"):
        turn, _, rest = name[len("turn_") :].partition("/")
        return (1 + int(turn), rest) if turn.isdigit() else (1, name)
    return (0, name)


def write_report(table: MetricTable, log_dir: str | Path, extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``test_metrics.json`` (rows, counts and ``extra``) and ``test_metrics.md`` under ``log_dir``.

    Each file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), "rows": table.rows(), "counts": table.state()["counts"]}
    paths = (log_dir / "test_metrics.json", log_dir / "test_metrics.md")
    for path, text in zip(paths, (json.dumps(payload, indent=2) + "\n", format_markdown(table))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


def data_skipped(trainer: Any) -> dict[str, dict[str, int]]:
    """The samples the trainer's DataModule skipped, over every device, by split and reason (``{}``: none, or a
    DataModule that does not count them). A collective under DDP: every rank must call it."""
    count = getattr(trainer.datamodule, "skipped_on_all_devices", None)
    return {} if count is None else count()


def skipped_scalars(skipped: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """``data_skipped``'s counts as TensorBoard scalars ``data/skipped/<split>/<reason>``."""
    return {
        f"data/skipped/{split}/{reason}": float(n)
        for split, reasons in skipped.items()
        for reason, n in reasons.items()
    }


def skipped_line(skipped: Mapping[str, Mapping[str, int]]) -> str:
    """One line for the log, e.g. ``skipped samples: labelled 3 (bad_image 2, bad_json 1); test 1 (bad_image 1)``."""
    parts = [
        f"{split} {sum(reasons.values())} (" + ", ".join(f"{r} {n}" for r, n in reasons.items()) + ")"
        for split, reasons in skipped.items()
    ]
    return "skipped samples: " + "; ".join(parts)
