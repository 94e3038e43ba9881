"""LightningDataModules over trajectory shards: resampled pair streams for training, in-memory eval splits.

A pair batch is a dict::

    x        (B, 3, H, W) float in [0, 1]   state before the action
    y        (B, 3, H, W) float in [0, 1]   state after the action; NaN where it is unknown (see has_target)
    has_target (B,) bool                    whether y was observed: False for an open step (a benchmark entry
                                            with a source and an instruction only), which only the test split has
    action   list[str]   the action text; "" for the unlabelled split (the others skip trajectories lacking one)
    task     list[str]   task of the step (sprites: the action type)
    key      list[str]   "{trajectory key}/{step}"
    x_state  list[str]   JSON of the ground-truth state before (sprites), "" when unknown
    y_state  list[str]   JSON of the ground-truth state after, "" when unknown
"""

from __future__ import annotations

import glob
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .shards import SKIP_REASONS, DecodedTrajectory, SkipCounter, iter_trajectories
from .sprites import MANIFEST as SPRITE_MANIFEST
from .sprites import write_sprite_splits

Pair = dict[str, Any]
SPLITS = ("labelled", "unlabelled", "val", "test")
STAGE_SPLITS = {
    "fit": ("labelled", "unlabelled", "val", "test"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
"""The splits each Trainer stage reads (``fit`` evaluates on the test split at every stage boundary; ``predict``
writes out the test split's pairs)."""

STREAMED_SPLITS = ("labelled", "unlabelled")
"""The splits read as streams, each DDP rank its own share; every rank decodes the other splits whole."""

_SPLIT_SOURCES = {
    "labelled": (
        "labelled training pairs of your own, e.g. `python -m datamodules.convert aurora --root DIR --json "
        "TRAIN.json --out {out}` (never the benchmark's test.json)"
    ),
    "unlabelled": "state-only pairs, e.g. `python -m datamodules.convert video --src VIDEOS --out {out}`",
    "val": (
        "held-out pairs, e.g. `python -m datamodules.convert aurora --root AURORA --json AURORA/test.json --out {out}` "
        "(ByteMorph-Bench: `python -m datamodules.convert bytemorph --src BM-Bench/data --out {out}`)"
    ),
    "test": (
        "the benchmark, e.g. `python -m datamodules.convert aurora --root AURORA --json AURORA/test.json --out {out}` "
        "(ByteMorph-Bench: `python -m datamodules.convert bytemorph --src BM-Bench/data --out {out}`)"
    ),
}


def expand_pairs(traj: DecodedTrajectory, with_actions: bool, tasks: Iterable[str] | None = None) -> Iterator[Pair]:
    """The (x_t, x_{t+1}, action_t) pairs of a trajectory, optionally only the steps whose task is in ``tasks``;
    an open trajectory's last pair has ``"y": None``."""
    wanted = None if tasks is None else set(tasks)
    states = traj.meta.get("states")
    if not (isinstance(states, list) and len(states) == len(traj.images)):
        states = None
    for t in range(len(traj.actions)):
        task = traj.task_at(t)
        if wanted is not None and task not in wanted:
            continue
        observed = t + 1 < len(traj.images)
        yield {
            "x": traj.images[t],
            "y": traj.images[t + 1] if observed else None,
            "action": (traj.actions[t] or "") if with_actions else "",
            "task": task,
            "key": f"{traj.key}/{t}",
            "x_state": json.dumps(states[t]) if states else "",
            "y_state": json.dumps(states[t + 1]) if states and observed else "",
        }


def collate_pairs(pairs: list[Pair]) -> Pair:
    """Stack images (an unknown ``y`` becomes NaN, flagged False in ``has_target``), keep text fields as lists."""
    x = torch.stack([p["x"] for p in pairs])
    y = [p["y"] if p["y"] is not None else torch.full_like(p["x"], float("nan")) for p in pairs]
    batch: Pair = {"x": x, "y": torch.stack(y), "has_target": torch.tensor([p["y"] is not None for p in pairs])}
    for name in ("action", "task", "key", "x_state", "y_state"):
        batch[name] = [p[name] for p in pairs]
    return batch


class PairDataset(Dataset):
    """Map-style pairs held in memory (eval splits): deterministic order, split by Lightning's sampler under DDP."""

    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Pair:
        return self.pairs[index]


def _stream_base() -> tuple[int, int, int]:
    """(rank, worker, per-epoch base seed of the DataLoader, or -1 in the main process)."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    info = torch.utils.data.get_worker_info()
    # the loader draws info.seed afresh each epoch from the (seeded) main-process RNG: distinct epochs, reproducible
    return rank, worker, -1 if info is None else info.seed - info.id


class ResampledShards(IterableDataset):
    """Endless stream of ``{"url": shard}`` drawn with replacement.

    Seeded by (seed, epoch) only, so every rank and worker draws the same sequence and ``split_by_node`` /
    ``split_by_worker`` hand out disjoint slices of it. Being endless, it never runs dry when there are fewer
    shards than ranks × workers (the case that hangs a non-resampled WebDataset under DDP).
    """

    def __init__(self, urls: list[str], seed: int) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch = urls, seed, 0

    def __iter__(self) -> Iterator[dict[str, str]]:
        _, _, base = _stream_base()
        rng = random.Random(f"{self.seed}-{self.epoch if base < 0 else base}")
        self.epoch += 1  # advances in the main process (num_workers=0); workers get a fresh base seed instead
        while True:
            yield {"url": rng.choice(self.urls)}


class _ReadPairs:
    """Pipeline stage: shard urls → decoded pairs; fails clearly once every shard proved to hold nothing valid."""

    def __init__(
        self, urls: list[str], image_size: int, skipped: SkipCounter, tasks: list[str] | None, labelled: bool
    ) -> None:
        self.urls, self.image_size, self.skipped, self.tasks, self.labelled = urls, image_size, skipped, tasks, labelled

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[Pair]:
        productive: set[str] = set()
        barren: set[str] = set()
        for item in src:
            count = 0
            for traj in iter_trajectories([item["url"]], self.image_size, self.skipped, self.tasks, self.labelled):
                for pair in expand_pairs(traj, self.labelled, self.tasks):
                    count += 1
                    yield pair
            (productive if count else barren).add(item["url"])
            if not productive and len(barren) == len(set(self.urls)):
                raise RuntimeError(
                    f"no valid {'labelled ' if self.labelled else ''}pair in any shard of {self.urls}; "
                    f"skipped so far: {self.skipped.as_dict()}"
                )


class _Shuffle:
    """Pipeline stage: shuffle buffer seeded per rank, worker and epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __call__(self, src: Iterator[Pair]) -> Iterator[Pair]:
        rank, worker, base = _stream_base()
        rng = random.Random(f"{self.seed}-{rank}-{worker}-{self.epoch if base < 0 else base}")
        self.epoch += 1
        buf: list[Pair] = []
        for pair in src:
            buf.append(pair)
            if len(buf) >= self.size:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class TrajectoryDataModule(L.LightningDataModule):
    """Trajectory shards (README, "Train on your own data") as pair batches: resampled streams for training, in-memory eval splits."""

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        unlabelled_batch_size: int | None = None,
        labelled: str | None = "labelled/*.tar",
        unlabelled: str | None = "unlabelled/*.tar",
        val: str | None = "val/*.tar",
        test: str | None = "test/*.tar",
        pairs_per_epoch: int = 2048,
        tasks: list[str] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        """
        Args:
            root: Folder holding the shards; split patterns are relative to it.
            image_size: Side of the square images in pixels; frames of another size are resized (bicubic).
            batch_size: Training pairs per batch, per device (for each of the labelled and unlabelled streams).
            eval_batch_size: Validation/test pairs per batch, per device.
            num_workers: DataLoader worker processes per device (0: load in the main process).
            unlabelled_batch_size: Pairs per batch of the unlabelled stream (None: batch_size). An RL step uses the
                first ``rl_batch_size`` pairs of it: set the two equal so that the stream decodes no more.
            labelled: Glob of the action-labelled shards (SFT), relative to root or absolute; None to leave out.
            unlabelled: Glob of the state-only shards (SWIRL; their actions are ignored); None to leave out.
            val: Glob of the validation shards; None for no validation.
            test: Glob of the test shards; None for no test split.
            pairs_per_epoch: Training pairs per epoch per device and per stream, rounded down to whole batches.
            tasks: Keep only pairs of these tasks (e.g. ["move", "paint"] or ["magicbrush"]); None keeps all.
            seed: Seed of the training streams (shard draws and shuffle buffers).
            shuffle_buffer: Pairs held in each training shuffle buffer.
        """
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1 or (unlabelled_batch_size is not None and unlabelled_batch_size < 1):
            raise ValueError("batch_size, eval_batch_size and unlabelled_batch_size must be >= 1")
        if pairs_per_epoch < max(batch_size, unlabelled_batch_size or 0):
            raise ValueError(
                f"pairs_per_epoch={pairs_per_epoch} is below one batch (batch_size={batch_size}, "
                f"unlabelled_batch_size={unlabelled_batch_size})"
            )
        self.save_hyperparameters()
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.stream_batch_sizes = {"labelled": batch_size, "unlabelled": unlabelled_batch_size or batch_size}
        self.num_workers = num_workers
        self.patterns = {"labelled": labelled, "unlabelled": unlabelled, "val": val, "test": test}
        self.pairs_per_epoch = pairs_per_epoch
        self.tasks = list(tasks) if tasks is not None else None
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._skipped = {split: SkipCounter(workers=num_workers) for split in SPLITS}
        self._trajectories: dict[str, list[DecodedTrajectory]] = {}

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Skipped samples by split and reason, in this process and its DataLoader workers (this device only)."""
        return {split: counter.as_dict() for split, counter in self._skipped.items()}

    def skipped_on_all_devices(self) -> dict[str, dict[str, int]]:
        """``skipped`` over every DDP rank, splits and reasons with none left out: the streamed splits' counts summed
        (each rank reads its own share), the others' taken once (each rank decodes them whole). A collective where the
        trainer is distributed: every rank must call it."""
        counts = torch.tensor([[self._skipped[s].counts[r] for r in SKIP_REASONS] for s in SPLITS], dtype=torch.int64)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            device = trainer.strategy.root_device  # NCCL gathers GPU tensors only
            counts = merge_rank_skips(trainer.strategy.all_gather(counts.to(device)).cpu())
        return {
            split: {reason: n for reason, n in zip(SKIP_REASONS, row) if n}
            for split, row in zip(SPLITS, counts.tolist())
            if any(row)
        }

    def shards(self, split: str) -> list[str]:
        """The shard files of a split, sorted; a clear error when its pattern matches none."""
        pattern = self.patterns[split]
        if pattern is None:
            raise ValueError(f"split '{split}' is disabled (its pattern is None)")
        full = pattern if Path(pattern).is_absolute() else str(Path(self.root) / pattern)
        found = sorted(p for p in glob.glob(full) if Path(p).is_file())
        if not found:
            out = _glob_free_prefix(full)
            raise FileNotFoundError(
                f"split '{split}': pattern {full!r} matches no shard. Write {_SPLIT_SOURCES[split].format(out=out)}, "
                f"or point --data.init_args.{split} at existing .tar files."
            )
        return found

    def missing_shards(self, stage: str) -> list[str]:
        """One message per split that ``stage`` reads and whose pattern matches no shard."""
        missing = []
        for split in STAGE_SPLITS.get(stage, ()):
            if self.patterns[split] is not None:
                try:
                    self.shards(split)
                except FileNotFoundError as exn:
                    missing.append(str(exn))
        return missing

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """``missing_shards(stage)`` from the constructor arguments alone; the CLI asks before building any model."""
        return cls(**init_args).missing_shards(stage)

    def setup(self, stage: str) -> None:
        # fail before training starts, not at the first batch, and name every missing split at once
        missing = self.missing_shards(stage)
        if missing:
            raise FileNotFoundError("\n".join(missing))

    def train_dataloader(self) -> dict[str, DataLoader]:
        """``{"labelled": ..., "unlabelled": ...}`` pair loaders (disabled splits left out); combine max_size_cycle."""
        loaders = {s: self._stream(s) for s in ("labelled", "unlabelled") if self.patterns[s] is not None}
        if not loaders:
            raise ValueError("both 'labelled' and 'unlabelled' are None: nothing to train on")
        return loaders

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if self.patterns["val"] is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test") if self.patterns["test"] is not None else []

    def predict_dataloader(self) -> DataLoader | list:
        """The test split's pairs, in order (point ``--data.test`` at other shards to predict on them)."""
        return self.test_dataloader()

    def trajectories(self, split: str) -> list[DecodedTrajectory]:
        """Whole trajectories of a split (loaded once, in shard order), for multi-turn evaluation.

        The unlabelled split comes with its actions blanked to None: it is state-only by definition. The other
        splits keep only trajectories with an action and a task at every step, so that evaluation never runs
        under an empty instruction; the rest are counted in ``skipped``. Only the test split keeps open
        trajectories (a last action without its next state); the others count them as ``no_target``.
        """
        if split not in self._trajectories:
            shards = self.shards(split)
            labelled = split != "unlabelled"
            skipped, open_steps = self._skipped[split], split == "test"
            trajs = list(iter_trajectories(shards, self.image_size, skipped, self.tasks, labelled, open_steps))
            if not trajs:
                raise RuntimeError(f"split '{split}': no valid trajectory in {shards}; skipped: {self.skipped[split]}")
            if split == "unlabelled":
                for traj in trajs:
                    traj.actions = [None] * len(traj.actions)
            self._trajectories[split] = trajs
        return self._trajectories[split]

    def pairs(self, split: str) -> list[Pair]:
        """All pairs of a split in deterministic order (actions hidden for the unlabelled split)."""
        with_actions = split != "unlabelled"
        return [p for traj in self.trajectories(split) for p in expand_pairs(traj, with_actions, self.tasks)]

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            PairDataset(self.pairs(split)),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=0,  # already decoded in memory: workers would only copy tensors
            collate_fn=collate_pairs,
        )

    def _stream(self, split: str) -> DataLoader:
        """Endless resampled pair stream cut into equal epochs, so every DDP rank runs the same number of batches."""
        urls = self.shards(split)
        workers = max(1, self.num_workers)
        batch_size = self.stream_batch_sizes[split]
        batches_per_device = self.pairs_per_epoch // batch_size
        per_worker = math.ceil(batches_per_device / workers)
        seed = _split_seed(self.seed, split)
        pipeline = wds.DataPipeline(
            ResampledShards(urls, seed),
            wds.split_by_node,
            wds.split_by_worker,
            _ReadPairs(urls, self.image_size, self._skipped[split], self.tasks, labelled=split == "labelled"),
            _Shuffle(self.shuffle_buffer, seed),
            wds.batched(batch_size, collation_fn=collate_pairs, partial=False),
        )
        # with_epoch counts per worker; with_length lets Lightning size the epoch (per_worker × workers per device)
        dataset = pipeline.with_epoch(per_worker).with_length(per_worker * workers, silent=True)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,  # fresh workers each epoch pick up a fresh base seed
        )


def merge_rank_skips(gathered: torch.Tensor) -> torch.Tensor:
    """Skip counts of every rank ``(ranks, len(SPLITS), len(SKIP_REASONS))`` → the run's ``(len(SPLITS),
    len(SKIP_REASONS))``: summed over ranks for the streamed splits, the largest rank's count for the others (each
    rank decoded them whole, so each counted every skip)."""
    streamed = torch.tensor([split in STREAMED_SPLITS for split in SPLITS])[:, None]
    return torch.where(streamed, gathered.sum(0), gathered.amax(0))


def _glob_free_prefix(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard: where the shards it looks for belong."""
    parts = Path(pattern).parts
    stop = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
    return str(Path(*parts[:stop])) if stop else "."


def _split_seed(seed: int, split: str) -> int:
    return random.Random(f"{seed}-{split}").randrange(2**31)


class SpriteDataModule(TrajectoryDataModule):
    """The sprite world: generates its shards under ``root`` on first use, then reuses them."""

    MANIFEST = SPRITE_MANIFEST

    def __init__(
        self,
        root: str = "data/sprites",
        image_size: int = 32,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        unlabelled_batch_size: int | None = None,
        pairs_per_epoch: int = 2048,
        tasks: list[str] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        labelled_trajectories: int = 1500,
        unlabelled_trajectories: int = 15000,
        val_trajectories: int = 100,
        test_trajectories: int = 200,
        length: int = 3,
        test_length: int = 6,
        shard_size: int = 500,
    ) -> None:
        """
        Args:
            root: Folder for the generated shards (labelled/, unlabelled/, val/, test/ and a manifest).
            image_size: Side of the square images in pixels; the world renders 32, other sizes are resized.
            batch_size: Training pairs per batch, per device (for each of the labelled and unlabelled streams).
            eval_batch_size: Validation/test pairs per batch, per device.
            num_workers: DataLoader worker processes per device (0: load in the main process).
            unlabelled_batch_size: Pairs per batch of the unlabelled stream (None: batch_size). An RL step uses the
                first ``rl_batch_size`` pairs of it: set the two equal so that the stream decodes no more.
            pairs_per_epoch: Training pairs per epoch per device and per stream, rounded down to whole batches.
            tasks: Keep only pairs of these action types ("move", "paint", "remove", "add"); None keeps all.
            seed: Seed of the generated world and of the training streams.
            shuffle_buffer: Pairs held in each training shuffle buffer.
            labelled_trajectories: Action-labelled trajectories (SFT).
            unlabelled_trajectories: State-only trajectories (SWIRL).
            val_trajectories: Validation trajectories.
            test_trajectories: Test trajectories (multi-turn).
            length: States per labelled/unlabelled/val trajectory (length - 1 actions).
            test_length: States per test trajectory.
            shard_size: Trajectories per shard file.
        """
        super().__init__(
            root=root,
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            unlabelled_batch_size=unlabelled_batch_size,
            pairs_per_epoch=pairs_per_epoch,
            tasks=tasks,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
        )
        self.save_hyperparameters()
        self.generation = {
            "seed": seed,
            "labelled": labelled_trajectories,
            "unlabelled": unlabelled_trajectories,
            "val": val_trajectories,
            "test": test_trajectories,
            "length": length,
            "test_length": test_length,
            "shard_size": shard_size,
        }

    @classmethod
    def from_folder(cls, root: str | Path, **kwargs: Any) -> SpriteDataModule:
        """The data module of shards already under ``root``, with the generation settings its manifest records, so
        that ``prepare_data`` reuses them as written (a module built with other settings would regenerate them).

        ``kwargs``: the other arguments (batch sizes, workers, ...). Raises ``FileNotFoundError`` without a manifest.
        """
        manifest = Path(root) / cls.MANIFEST
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{manifest}: no readable sprite manifest; generate the data first") from e
        names = {"labelled": "labelled_trajectories", "unlabelled": "unlabelled_trajectories"}
        names |= {"val": "val_trajectories", "test": "test_trajectories"}
        names |= {k: k for k in ("seed", "length", "test_length", "shard_size")}
        return cls(root=str(root), **{names[k]: v for k, v in recorded.items() if k in names}, **kwargs)

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        return []  # prepare_data generates whatever is missing

    def prepare_data(self) -> None:
        """Generate the shards unless the manifest shows a complete set made with the same settings.

        Generation swaps in a finished set, manifest included, so a crash leaves the folder as it was.
        """
        if not self._is_complete(Path(self.root) / self.MANIFEST):
            write_sprite_splits(self.root, **self.generation)

    def _is_complete(self, manifest: Path) -> bool:
        """The manifest records these settings, and each split folder holds exactly its shards, at their sizes."""
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in self.generation.items()):
            return False
        shards, sizes = recorded.get("shards", {}), recorded.get("bytes")  # manifests before sizes lack "bytes"
        for split in SPLITS:
            names, folder = shards.get(split), manifest.parent / split
            if not names or sorted(p.name for p in folder.glob("*.tar")) != sorted(names):
                return False
            if sizes is not None and [(folder / n).stat().st_size for n in names] != sizes.get(split):
                return False
        return True
