"""A callback for DDP tests: each rank writes a digest of its weights at the end of fit (ranks must agree)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch import Callback


class WeightDigest(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        digest = {
            name: [float(p.detach().double().sum()), float(p.detach().double().abs().sum())]
            for name, p in pl_module.named_parameters()
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(digest))
        tmp.replace(path)
