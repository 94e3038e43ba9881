"""TrajectoryDataModule / SpriteDataModule: batch format, epochs, errors, preparation, determinism."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import trajectory
from datamodules.sprites import SpriteState, apply, parse, write_sprite_splits
from datamodules.trajectory import SpriteDataModule, TrajectoryDataModule

KEYS = {"x", "y", "has_target", "action", "task", "key", "x_state", "y_state"}
SMALL = {"labelled": 20, "unlabelled": 40, "val": 10, "test": 6, "length": 3, "test_length": 4, "shard_size": 16}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sprites")
    write_sprite_splits(out, seed=0, **SMALL)
    return out


def _check_batch(batch: dict, size: int, hidden_actions: bool) -> None:
    assert set(batch) == KEYS
    assert batch["has_target"].dtype == torch.bool and batch["has_target"].all()  # every sprite step has its state
    assert batch["x"].shape == batch["y"].shape == (size, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert 0 <= batch["x"].min() and batch["x"].max() <= 1
    assert all(len(batch[k]) == size for k in KEYS - {"x", "y"})
    for x, y, action, xs, ys in zip(batch["x"], batch["y"], batch["action"], batch["x_state"], batch["y_state"]):
        before, after = SpriteState.from_json(xs), SpriteState.from_json(ys)
        assert parse(x) == before and parse(y) == after  # images and ground truth agree
        assert action == "" if hidden_actions else apply(before, action) == after


def test_training_batches(root: Path) -> None:
    dm = TrajectoryDataModule(str(root), shuffle_buffer=64, batch_size=8, pairs_per_epoch=40)
    dm.setup("fit")
    loaders = dm.train_dataloader()
    assert set(loaders) == {"labelled", "unlabelled"}
    for name, loader in loaders.items():
        batches = list(loader)
        assert len(batches) == len(loader) == 5  # 40 pairs / 8
        for batch in batches:
            _check_batch(batch, 8, hidden_actions=name == "unlabelled")


def test_the_unlabelled_stream_has_its_own_batch_size(root: Path) -> None:
    """An RL step uses ``rl_batch_size`` unlabelled pairs: the stream can decode just those, the labelled one keeps
    the SFT batch."""
    dm = TrajectoryDataModule(str(root), shuffle_buffer=64, batch_size=8, unlabelled_batch_size=4, pairs_per_epoch=40)
    dm.setup("fit")
    loaders = dm.train_dataloader()
    for name, size, count in (("labelled", 8, 5), ("unlabelled", 4, 10)):
        batches = list(loaders[name])
        assert len(batches) == len(loaders[name]) == count
        for batch in batches:
            _check_batch(batch, size, hidden_actions=name == "unlabelled")
    with pytest.raises(ValueError, match="below one batch"):
        TrajectoryDataModule(str(root), batch_size=8, unlabelled_batch_size=64, pairs_per_epoch=40)


def test_eval_batches_and_trajectories(root: Path) -> None:
    dm = TrajectoryDataModule(str(root), eval_batch_size=7)
    val = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in val) == 20  # 10 trajectories × 2 steps
    _check_batch(val[0], 7, hidden_actions=False)
    trajs = dm.trajectories("test")
    assert len(trajs) == 6 and trajs[0].images.shape == (4, 3, 32, 32) and len(trajs[0].actions) == 3
    assert sum(len(b["key"]) for b in dm.test_dataloader()) == 18


def test_val_split_is_deterministic(root: Path) -> None:
    a = next(iter(TrajectoryDataModule(str(root)).val_dataloader()))
    b = next(iter(TrajectoryDataModule(str(root)).val_dataloader()))
    assert a["key"] == b["key"] and a["action"] == b["action"]
    torch.testing.assert_close(a["x"], b["x"])
    assert a["key"][:3] == ["sprites-val-000000/0", "sprites-val-000000/1", "sprites-val-000001/0"]


def test_training_stream_is_seeded(root: Path) -> None:
    def keys(seed: int) -> list[str]:
        dm = TrajectoryDataModule(str(root), shuffle_buffer=64, batch_size=8, pairs_per_epoch=16, seed=seed)
        return [k for b in dm.train_dataloader()["unlabelled"] for k in b["key"]]

    assert keys(1) == keys(1) and keys(1) != keys(2)


def test_task_filter(root: Path) -> None:
    dm = TrajectoryDataModule(str(root), shuffle_buffer=64, batch_size=4, pairs_per_epoch=8, tasks=["move"])
    for batch in dm.train_dataloader()["labelled"]:
        assert set(batch["task"]) == {"move"} and all(a.startswith("move ") for a in batch["action"])
    assert {t for b in dm.val_dataloader() for t in b["task"]} == {"move"}


def test_missing_split_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'labelled'.*nothing/\*\.tar.*--json TRAIN\.json"):
        TrajectoryDataModule(str(root), labelled="nothing/*.tar").setup("fit")
    with pytest.raises(FileNotFoundError, match="datamodules.convert"):
        TrajectoryDataModule(str(tmp_path)).val_dataloader()
    dm = TrajectoryDataModule(str(root), unlabelled=None, val=None)
    dm.setup("fit")
    assert set(dm.train_dataloader()) == {"labelled"} and dm.val_dataloader() == []


def test_absolute_patterns_and_shared_shards(root: Path) -> None:
    pattern = str(root / "val" / "*.tar")
    dm = TrajectoryDataModule("/nonexistent", labelled=pattern, unlabelled=pattern, val=pattern, test=pattern)
    dm.setup("fit")
    assert dm.shards("labelled") == dm.shards("unlabelled")


def test_fewer_shards_than_ranks_does_not_hang(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")  # 4 ranks, 1 labelled shard: resampling keeps every rank fed
    dm = TrajectoryDataModule(str(root), shuffle_buffer=64, batch_size=4, pairs_per_epoch=12)
    assert len(list(dm.train_dataloader()["labelled"])) == 3


def test_workers_split_the_epoch(root: Path) -> None:
    dm = TrajectoryDataModule(str(root), shuffle_buffer=64, batch_size=4, pairs_per_epoch=12, num_workers=2)
    loader = dm.train_dataloader()["unlabelled"]
    assert len(list(loader)) == len(loader) == 4  # ceil(3 batches / 2 workers) × 2 workers


def test_corrupt_shards_are_skipped_in_training(root: Path, tmp_path: Path) -> None:
    for i, shard in enumerate(sorted((root / "unlabelled").glob("*.tar"))[:2]):
        (tmp_path / f"good-{i}.tar").write_bytes(shard.read_bytes())
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    dm = TrajectoryDataModule(str(tmp_path), labelled=None, unlabelled="*.tar", batch_size=4, pairs_per_epoch=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(dm.train_dataloader()["unlabelled"])) == 50
    assert dm.skipped["unlabelled"].get("bad_shard", 0) >= 1


def _rewrite_samples(source: Path, target: Path, edits: dict[str, dict[str, bytes | None]]) -> None:
    """Copy a shard, replacing (bytes) or dropping (None) members of the samples named in ``edits``."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src.getmembers():
            key, name = member.name.split(".", 1)
            data = edits.get(key, {}).get(name, src.extractfile(member).read())
            if data is not None:
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))


def test_eval_splits_skip_trajectories_without_actions_or_task(root: Path, tmp_path: Path) -> None:
    (val_shard,) = sorted((root / "val").glob("*.tar"))
    meta = json.loads(tarfile.open(val_shard).extractfile("sprites-val-000000.meta.json").read())
    untasked = json.dumps({k: v for k, v in meta.items() if k not in ("task", "tasks")}).encode()
    edits = {
        "sprites-val-000000": {"actions.json": b'["", "move the red square left"]'},
        "sprites-val-000001": {"actions.json": b"[null, null]"},
        "sprites-val-000002": {"actions.json": b'[7, "x"]'},
        "sprites-val-000003": {"actions.json": None},
        "sprites-val-000004": {"meta.json": untasked},
        "sprites-val-000005": {"meta.json": json.dumps({**meta, "task": None, "tasks": None}).encode()},
    }
    (tmp_path / "val").mkdir()
    _rewrite_samples(val_shard, tmp_path / "val" / "v.tar", edits)
    dm = TrajectoryDataModule(str(tmp_path), test=str(root / "test" / "*.tar"))
    with pytest.warns(UserWarning, match="skipped"):
        pairs = dm.pairs("val")
    assert len(pairs) == 2 * 4 and all(p["action"] and p["task"] for p in pairs)  # 10 trajectories, 6 unusable
    dm.pairs("test")
    assert dm.skipped == {
        "labelled": {},
        "unlabelled": {},
        "val": {"bad_action": 3, "missing_actions": 1, "bad_task": 2},
        "test": {},
    }


def test_skips_in_dataloader_workers_are_counted_per_split(root: Path, tmp_path: Path) -> None:
    write_sprite_splits(tmp_path / "one", labelled=1, unlabelled=1, val=1, test=1)  # 2 pairs: many shard draws
    (tmp_path / "good.tar").write_bytes((tmp_path / "one" / "unlabelled" / "sprites-000000.tar").read_bytes())
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    dm = TrajectoryDataModule(
        str(tmp_path),
        labelled="good.tar",
        unlabelled="*.tar",
        batch_size=4,
        pairs_per_epoch=32,
        num_workers=2,
        shuffle_buffer=8,
    )
    torch.manual_seed(0)  # the workers' shard draws follow the loader's base seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loader in dm.train_dataloader().values():
            assert len(list(loader)) == 8
    assert dm.skipped["labelled"] == {} and dm.skipped["unlabelled"]["bad_shard"] >= 2  # both workers drew it


def test_nothing_valid_names_the_shards(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    dm = TrajectoryDataModule(str(tmp_path), labelled="*.tar", unlabelled=None, batch_size=2, pairs_per_epoch=4)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"no valid labelled pair.*bad\.tar"):
        warnings.simplefilter("ignore")
        next(iter(dm.train_dataloader()["labelled"]))
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"no valid trajectory.*bad\.tar"):
        warnings.simplefilter("ignore")
        dm.trajectories("labelled")


def test_sprite_datamodule_prepares_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {
        "labelled_trajectories": 4,
        "unlabelled_trajectories": 6,
        "val_trajectories": 3,
        "test_trajectories": 2,
        "shard_size": 4,
    }
    dm = SpriteDataModule(root=str(tmp_path / "world"), batch_size=2, pairs_per_epoch=4, **sizes)
    dm.prepare_data()
    manifest = json.loads((tmp_path / "world" / SpriteDataModule.MANIFEST).read_text())
    assert manifest["shards"]["unlabelled"] == ["sprites-000000.tar", "sprites-000001.tar"]
    dm.setup("fit")
    assert len(list(dm.train_dataloader()["labelled"])) == 2

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated shards that were already there")

    monkeypatch.setattr(trajectory, "write_sprite_splits", fail)
    SpriteDataModule(root=str(tmp_path / "world"), **sizes).prepare_data()  # reused
    again = SpriteDataModule.from_folder(tmp_path / "world", batch_size=2)  # the manifest's settings: reused too
    again.prepare_data()
    assert again.generation == dm.generation and again.hparams.batch_size == 2
    with pytest.raises(FileNotFoundError, match="no readable sprite manifest"):
        SpriteDataModule.from_folder(tmp_path / "nowhere")
    with pytest.raises(AssertionError):  # different settings: regenerated
        SpriteDataModule(root=str(tmp_path / "world"), seed=1, **sizes).prepare_data()
    # that generation "crashed" before swapping its set in: the seed-0 set is still whole, and reused
    SpriteDataModule(root=str(tmp_path / "world"), **sizes).prepare_data()
    assert json.loads((tmp_path / "world" / SpriteDataModule.MANIFEST).read_text()) == manifest


def test_a_sprite_set_changed_since_generation_is_regenerated(tmp_path: Path) -> None:
    sizes = {"labelled_trajectories": 4, "unlabelled_trajectories": 6, "val_trajectories": 3, "test_trajectories": 2}
    world = tmp_path / "world"
    SpriteDataModule(root=str(world), shard_size=4, **sizes).prepare_data()
    first = world / "unlabelled" / "sprites-000000.tar"
    original = first.read_bytes()
    for damage in ("truncate", "extra shard"):
        if damage == "truncate":  # a cut that still ends on a tar boundary reads as a smaller, valid set
            first.write_bytes(original[: len(original) // 2 // 512 * 512])
        else:
            (world / "unlabelled" / "sprites-000002.tar").write_bytes(original)
        SpriteDataModule(root=str(world), shard_size=4, **sizes).prepare_data()
        assert first.read_bytes() == original
        assert sorted(p.name for p in (world / "unlabelled").iterdir()) == ["sprites-000000.tar", "sprites-000001.tar"]


class _Probe(L.LightningModule):
    """Checks what Lightning hands over from the dict of training loaders."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch["labelled"]["x"].shape[0], batch["unlabelled"]["x"].shape[0]))
        assert batch["unlabelled"]["action"] == [""] * 4
        return self.layer(batch["labelled"]["x"].mean().view(1, 1)).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        assert set(batch) == KEYS

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit(root: Path, tmp_path: Path) -> None:
    probe = _Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        probe,
        datamodule=TrajectoryDataModule(
            str(root), shuffle_buffer=64, batch_size=4, pairs_per_epoch=12, eval_batch_size=8
        ),
    )
    assert probe.seen == [(4, 4)] * 3


def test_open_steps_reach_the_test_split_only_with_an_unknown_next_state(tmp_path: Path) -> None:
    from PIL import Image

    from datamodules.shards import Trajectory, write_shards

    def image(value: int) -> Image.Image:
        return Image.new("RGB", (8, 8), (value, 0, 0))

    trajs = [
        Trajectory("closed", [image(10), image(20)], ["edit"], {"task": "magicbrush"}),
        Trajectory("open", [image(30)], ["turn it brown"], {"task": "clevr", "open": True}),
        Trajectory("longer", [image(40), image(50)], ["first", "then"], {"task": "epic", "open": True}),
    ]
    write_shards(trajs, tmp_path, prefix="bench")
    everywhere = {split: "bench-*.tar" for split in ("labelled", "unlabelled", "val", "test")}
    dm = TrajectoryDataModule(str(tmp_path), 8, batch_size=2, eval_batch_size=8, pairs_per_epoch=2, **everywhere)
    (batch,) = list(dm.test_dataloader())
    assert batch["key"] == ["closed/0", "open/0", "longer/0", "longer/1"]
    assert batch["has_target"].tolist() == [True, False, True, False]
    assert batch["y"][[1, 3]].isnan().all() and batch["y"][[0, 2]].isfinite().all()
    assert batch["task"] == ["magicbrush", "clevr", "epic", "epic"] and batch["action"][1] == "turn it brown"
    with pytest.warns(UserWarning, match="no_target"):
        assert [p["key"] for p in dm.pairs("val")] == ["closed/0"]
    assert dm.skipped["val"] == {"no_target": 2} and "test" not in {s for s, n in dm.skipped.items() if n}
    # The training streams never yield a step without its next state either.
    with pytest.warns(UserWarning, match="no_target"):
        streamed = next(iter(dm.train_dataloader()["labelled"]))
    assert streamed["has_target"].all() and set(streamed["key"]) == {"closed/0"}
