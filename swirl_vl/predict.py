"""``predict``: the models' greedy outputs on a shard set, written to files by the ``PredictionWriter`` callback.

``python -m swirl_vl predict`` adds the writer (``--predictions.*``). For every pair of the DataModule's predict split
(the test shards) it writes the FWM's greedy next state ``ŷ`` as a PNG and one line of ``index.jsonl`` with the IDM's
greedy action and the pair's metrics; with ``rollout_trajectories`` the FWM also acts out trajectories' actions from
their first state on its own outputs (``rollouts/``, ``rollouts.jsonl``). ``sheet.html`` is a self-contained contact
sheet: rows ``x | ŷ | y`` with the actions, then the rollouts under the true states. Every file is written under a
temporary name and renamed, so a reader never sees half of one.

Output folder (default ``<log_dir>/predictions``)::

    index.jsonl        {"index", "key", "task", "action", "has_target", "idm_action", "y_hat": "y_hat/<trajectory>/<t>.png",
                        metrics (null where a metric has no answer, e.g. the target metrics of a pair without y)}
    y_hat/<trajectory>/<t>.png
    rollouts.jsonl     {"key", "turn", "task", "action", "image": "rollouts/<trajectory>/<turn>.png"}
    rollouts/<trajectory>/<turn>.png
    sheet.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor
from typing_extensions import override

from datamodules.shards import DecodedTrajectory
from datamodules.trajectory import STAGE_SPLITS
from swirl_vl.eval.rollout import dealt_batches, rollout

PREDICT_SPLIT = STAGE_SPLITS["predict"][0]


def to_uint8(image: Tensor) -> Tensor:
    """``(3, H, W)`` float in ``[0, 1]`` → ``(H, W, 3)`` uint8 on the CPU: the pixels a PNG of it holds."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def png_bytes(image: Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` under a temporary name in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


def safe_name(part: str) -> str:
    """A key part as a file name: characters other than letters, digits, ``._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", part).lstrip(".") or "_"


def pair_file(key: str) -> str:
    """``"<trajectory>/<t>"`` → ``"y_hat/<trajectory>/<t>.png"`` (relative to the output folder)."""
    trajectory, _, step = key.rpartition("/")
    return f"y_hat/{safe_name(trajectory)}/{safe_name(step)}.png"


def rollout_images(
    fwm: Any,
    trajectories: Sequence[DecodedTrajectory],
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> list[tuple[DecodedTrajectory, Tensor]]:
    """Greedy multi-turn rollouts ``(K, 3, H, W)`` from its first state of each trajectory with known actions and
    next states in this process's share (``dealt_batches``: by length, ``batch_size`` at a time)."""
    out = []
    for batch, own in dealt_batches(trajectories, batch_size, rank, world):
        x0 = torch.stack([t.images[0] for t in batch]).to(device)
        out += zip(batch[:own], rollout(fwm, x0, [t.actions for t in batch])[:own])
    return out


def _gather(rows: list[Any]) -> list[Any]:
    """Every rank's ``rows``, concatenated (this rank's alone outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts: list[list[Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part or []]


class PredictionWriter(BasePredictionWriter):
    """Writes ``SwirlModule.predict_step``'s outputs: a PNG of ``ŷ`` per pair, ``index.jsonl``, rollouts, a sheet."""

    def __init__(self, output_dir: str | None = None, rollout_trajectories: int | None = 16, sheet_rows: int = 64):
        """
        Args:
            output_dir: folder for the files (None: ``predictions/`` in the run's log directory).
            rollout_trajectories: multi-turn rollouts of the first N trajectories of the predict split, over all
                devices (None: all; 0: none).
            sheet_rows: pairs (the first ones) and rollouts shown in ``sheet.html`` (0: no sheet).
        """
        if rollout_trajectories is not None and rollout_trajectories < 0:
            raise ValueError(f"--predictions.rollout_trajectories must be ≥ 0 or null; got {rollout_trajectories}")
        if sheet_rows < 0:
            raise ValueError(f"--predictions.sheet_rows must be ≥ 0; got {sheet_rows}")
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.rollout_trajectories = rollout_trajectories
        self.sheet_rows = sheet_rows
        self._rows: list[dict[str, Any]] = []
        self._sheet: list[tuple[int, Tensor, Tensor, Tensor]] = []
        self._seen = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if not hasattr(pl_module, "fwm") or not hasattr(pl_module, "idm"):
            raise TypeError(f"PredictionWriter writes a SwirlModule's predictions; got {type(pl_module).__name__}")
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if self.output_dir is None:
            self.output_dir = Path(log_dir or trainer.default_root_dir) / "predictions"
        self._rows, self._sheet, self._seen = [], [], 0

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        n = len(prediction["key"])
        # Lightning records the sampler's indices for map-style datasets; count the pairs otherwise (one device).
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == n else None
        indices = indices or list(range(self._seen, self._seen + n))
        self._seen += n
        for i, index in enumerate(indices):
            key = prediction["key"][i]
            relative = pair_file(key)
            write_atomically(self.output_dir / relative, png_bytes(prediction["y_hat"][i]))
            metrics = {name: _json_number(values[i]) for name, values in prediction["metrics"].items()}
            has_target = bool(prediction["has_target"][i])
            self._rows.append(
                {
                    "index": index,
                    "key": key,
                    "task": prediction["task"][i],
                    "action": prediction["action"][i],
                    "has_target": has_target,
                    "idm_action": prediction["idm_action"][i] if has_target else None,
                    "y_hat": relative,
                    "metrics": metrics,  # spread into the line at the end, every line with the same names
                }
            )
            if index < self.sheet_rows:
                images = (prediction[name][i].detach().float().cpu() for name in ("x", "y_hat", "y"))
                self._sheet.append((index, *images))

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rollouts = self._write_rollouts(trainer, pl_module)
        rows = {row["index"]: row for row in _gather(self._rows)}  # a DDP sampler pads with repeats: keep one each
        sheet = {entry[0]: entry for entry in _gather(self._sheet)}
        rollouts = _gather(rollouts)
        if trainer.global_rank != 0:
            return
        ordered = _with_every_metric([rows[i] for i in sorted(rows)])
        write_atomically(self.output_dir / "index.jsonl", "".join(json.dumps(row) + "\n" for row in ordered))
        turns = [turn for _, turn_rows, _ in sorted(rollouts, key=lambda r: r[0]) for turn in turn_rows]
        if rollouts:
            write_atomically(self.output_dir / "rollouts.jsonl", "".join(json.dumps(row) + "\n" for row in turns))
        if self.sheet_rows:
            pairs = [(rows[i], *sheet[i][1:]) for i in sorted(sheet) if i in rows]
            shown = sorted(rollouts, key=lambda r: r[0])[: self.sheet_rows]
            write_atomically(self.output_dir / "sheet.html", contact_sheet(pairs, shown))
        rank_zero_info(
            f"[swirl] predictions of {len(ordered)} pairs and {len(rollouts)} rollouts written to {self.output_dir}"
        )

    def _write_rollouts(self, trainer: Trainer, pl_module: LightningModule) -> list[tuple[int, list[dict], Any]]:
        """This rank's share of the rollouts, written as PNGs: ``(position, rows, (states, predicted))`` each."""
        datamodule = trainer.datamodule
        if self.rollout_trajectories == 0 or not hasattr(datamodule, "trajectories"):
            return []
        chosen = datamodule.trajectories(PREDICT_SPLIT)[: self.rollout_trajectories]
        position = {id(t): i for i, t in enumerate(chosen)}
        batch_size = getattr(datamodule, "eval_batch_size", 16)
        share = (trainer.global_rank, trainer.world_size)
        out = []
        for traj, predicted in rollout_images(pl_module.fwm.model, chosen, batch_size, pl_module.device, *share):
            rows = []
            for k, image in enumerate(predicted, start=1):
                relative = f"rollouts/{safe_name(traj.key)}/{k}.png"
                write_atomically(self.output_dir / relative, png_bytes(image))
                task, action = traj.task_at(k - 1), traj.actions[k - 1]
                rows.append({"key": traj.key, "turn": k, "task": task, "action": action, "image": relative})
            at = position[id(traj)]
            shown = (traj.images.float().cpu(), predicted.float().cpu()) if at < self.sheet_rows else None
            out.append((at, rows, shown))
        return out


def _with_every_metric(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Index lines with each row's ``metrics`` spread in, under every name any row has (None where a row has none:
    a batch of target-free pairs alone has no target metric at all), so that every line has the same keys."""
    names = sorted({name for row in rows for name in row["metrics"]})
    return [
        {**{k: v for k, v in row.items() if k != "metrics"}, **{n: row["metrics"].get(n) for n in names}}
        for row in rows
    ]


def _json_number(value: Tensor) -> float | None:
    """A metric value for JSON: rounded, None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if value != value else round(value, 6)


def _img(image: Tensor, scale: int = 4) -> str:
    data = base64.b64encode(png_bytes(image)).decode()
    width = image.shape[-1] * scale
    return f'<img src="data:image/png;base64,{data}" width="{width}" style="image-rendering: pixelated">'


def contact_sheet(
    pairs: Sequence[tuple[dict[str, Any], Tensor, Tensor, Tensor]], rollouts: Sequence[tuple[int, list[dict], Any]]
) -> str:
    """A self-contained HTML page: a row ``x | ŷ | y`` per pair with its actions; then each rollout, true states
    ``x_0..x_K`` above the FWM's ``ŷ_1..ŷ_K`` with the actions between them."""
    e = html.escape
    lines = [
        "<!doctype html><meta charset='utf-8'><title>swirl_vl predictions</title>",
        "<style>body{font-family:sans-serif} td{padding:4px;vertical-align:middle} th{text-align:left}</style>",
        "<h2>Pairs: x | ŷ (FWM, greedy, under the true action) | y</h2>",
        "<table><tr><th>key</th><th>x</th><th>ŷ</th><th>y</th><th>true action / IDM action (greedy)</th></tr>",
    ]
    for row, x, y_hat, y in pairs:
        if row["has_target"]:
            target, idm = _img(y), e(row["idm_action"])
        else:
            target, idm = "<i>no target</i>", "<i>– (needs y)</i>"
        actions = f"{e(row['action'])}<br><i>IDM:</i> {idm}"
        lines.append(
            f"<tr><td>{e(row['key'])}<br><small>{e(row['task'])}</small></td>"
            f"<td>{_img(x)}</td><td>{_img(y_hat)}</td><td>{target}</td><td>{actions}</td></tr>"
        )
    lines.append("</table>")
    shown = [(rows, images) for _, rows, images in rollouts if images is not None]
    if shown:
        lines.append("<h2>Rollouts: true states x_0..x_K (top), the FWM's ŷ_1..ŷ_K on its own outputs (bottom)</h2>")
    for rows, (states, predicted) in shown:
        actions = " → ".join(e(r["action"]) for r in rows)
        lines += [
            f"<p><b>{e(rows[0]['key'])}</b>: {actions}</p><table>",
            "<tr>" + "".join(f"<td>{_img(s)}</td>" for s in states) + "</tr>",
            "<tr><td></td>" + "".join(f"<td>{_img(p)}</td>" for p in predicted) + "</tr></table>",
        ]
    return "\n".join(lines) + "\n"
