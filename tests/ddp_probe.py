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


class NoLabelsOnRank1(Callback):
    """Rank 1's Phase I steps keep no pseudo-label (as when its IDM is unsure of every pair) while rank 0's keep
    theirs: the ranks must still take part in the same collectives (DDP's gradient averaging, FSDP2's gathers)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 1:
            return
        labels = pl_module.filtered_labels

        def none_kept(pairs):
            labels(pairs)  # the IDM labels the pairs as on every rank, then the filter keeps none
            return None

        pl_module.filtered_labels = none_kept


class RestoredState(Callback):
    """Rank 0 saves, at train start (after a resume has restored everything), the whole weights and optimiser
    moments of the module as every process holds them together (gathered from FSDP2's shards; a collective)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(pl_module, options=options)
        moments = [get_optimizer_state_dict(pl_module, opt, options=options) for opt in trainer.optimizers]
        if trainer.global_rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"weights": weights, "optimizers": moments}, self.out_dir / "restored.pt")
