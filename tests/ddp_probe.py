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


class ShardShare(Callback):
    """Each rank writes the share of each model's trained weights it holds (FSDP2 over N processes: about 1/N)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        share = {}
        for which in ("fwm", "idm"):
            params = [p for p in getattr(pl_module, which).model.parameters() if p.requires_grad]
            local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
            share[which] = local / sum(p.numel() for p in params)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"share{trainer.global_rank}.json").write_text(json.dumps(share))
