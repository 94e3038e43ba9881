"""Trajectory shards: writing atomically, reading back, and skipping what is broken."""

import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shards import (
    SampleError,
    SkipCounter,
    Trajectory,
    decode_image,
    decode_trajectory,
    iter_trajectories,
    write_shards,
)


def _image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _traj(i: int, length: int = 3) -> Trajectory:
    actions = [f"action {i} {t}" for t in range(length - 1)]
    return Trajectory(
        f"traj-{i:04d}", [_image(i * 10 + t) for t in range(length)], actions, {"task": "t", "source": "x"}
    )


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _raw_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A tar of hand-made members: {"__key__": key, "0.png": bytes, ...}."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                if name != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _good(key: str, actions: list | None = None, meta: dict | None = None) -> dict[str, bytes]:
    return {
        "__key__": key,
        "0.png": _encode(_image(1)),
        "1.png": _encode(_image(2)),
        "actions.json": json.dumps(actions if actions is not None else ["go"]).encode(),
        "meta.json": json.dumps(meta or {"task": "t", "source": "test"}).encode(),
    }


def test_round_trip(tmp_path: Path) -> None:
    trajs = [_traj(i) for i in range(7)]
    paths = write_shards(trajs, tmp_path, prefix="demo", shard_size=3)
    assert [p.name for p in paths] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    skipped = SkipCounter()
    back = list(iter_trajectories([str(p) for p in paths], 32, skipped))
    assert skipped.as_dict() == {} and len(back) == 7
    for src, got in zip(trajs, back):
        assert got.key == src.key and got.actions == src.actions and got.meta == src.meta
        expected = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in src.images])
        torch.testing.assert_close(got.images, expected)


def test_shards_are_plain_tar(tmp_path: Path) -> None:
    (path,) = write_shards([_traj(0, length=2)], tmp_path)
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["traj-0000.0.png", "traj-0000.1.png", "traj-0000.actions.json", "traj-0000.meta.json"]


def test_jpeg_bytes_are_kept(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _image(3).save(buf, format="JPEG")
    (path,) = write_shards([Trajectory("j", [buf.getvalue(), _image(4)], [None], {"task": "t"})], tmp_path)
    with tarfile.open(path) as tar:
        assert tar.extractfile("j.0.jpg").read() == buf.getvalue()
    (got,) = iter_trajectories([str(path)], 32, SkipCounter())
    assert got.actions == [None] and got.images.shape == (2, 3, 32, 32)


def test_crash_mid_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    def crashing() -> Iterator[Trajectory]:
        yield _traj(0)
        yield _traj(1)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_shards(crashing(), tmp_path, shard_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # complete one kept, no .tmp


def test_rewrite_removes_stale_shards_and_checks_input(tmp_path: Path) -> None:
    write_shards([_traj(i) for i in range(4)], tmp_path, shard_size=1)
    write_shards([_traj(i) for i in range(2)], tmp_path, shard_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ValueError, match="no '.'"):
        write_shards([Trajectory("a.b", [_image(0), _image(1)], ["x"], {})], tmp_path / "x")
    with pytest.raises(ValueError, match="actions"):
        write_shards([Trajectory("a", [_image(0), _image(1)], [], {})], tmp_path / "y")
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([_traj(0), _traj(0)], tmp_path / "z")


def test_corrupt_and_truncated_shards_are_skipped(tmp_path: Path) -> None:
    paths = write_shards([_traj(i) for i in range(6)], tmp_path, shard_size=2)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2 + 100])  # truncated inside the second sample
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 50)
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match="shard"):
        back = list(iter_trajectories([str(p) for p in [paths[0], paths[1], garbage, paths[2]]], 32, skipped))
    keys = [t.key for t in back]
    assert {"traj-0000", "traj-0001", "traj-0002", "traj-0004", "traj-0005"} <= set(keys)
    assert "traj-0003" not in keys
    assert skipped.counts["bad_shard"] >= 2


def _cut_at_sample(path: Path, index: int, garbage: bool) -> None:
    """Damage a shard at the header of sample ``index``'s first member: cut the file there, or overwrite that header."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[4 * index].offset  # 2 frames, actions.json, meta.json per sample
    data = path.read_bytes()
    path.write_bytes(data[:offset] + (b"garbage!" * 64 + data[offset + 512 :] if garbage else b""))


@pytest.mark.parametrize("garbage", [False, True], ids=["cut_at_a_member_boundary", "garbage_header"])
def test_shards_damaged_mid_file_are_counted(tmp_path: Path, garbage: bool) -> None:
    (path,) = write_shards([_traj(i, length=2) for i in range(6)], tmp_path, shard_size=6)
    _cut_at_sample(path, 3, garbage)  # tarfile takes either for the end of the archive
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match=r"shard.*traj-0002 and any after it are lost"):
        back = list(iter_trajectories([str(path)], 32, skipped))
    # traj-0002 looks whole but cannot be told from one cut before its last members, so it goes too
    assert [t.key for t in back] == ["traj-0000", "traj-0001"] and skipped.as_dict() == {"bad_shard": 1}


def test_duplicate_keys_and_members_are_counted(tmp_path: Path) -> None:
    twice = _good("twice")
    png_and_jpg = {**_good("both"), "0.jpg": _encode(_image(1), "JPEG")}
    shard = tmp_path / "s.tar"
    _raw_shard(shard, [_good("ok1"), png_and_jpg, _good("ok2"), _good("ok1"), _good("ok3")])
    with tarfile.open(shard, "a") as tar:  # the same member twice in a row
        for name in ("0.png", "0.png", "1.png", "actions.json"):
            info = tarfile.TarInfo(f"twice.{name}")
            info.size = len(twice[name])
            tar.addfile(info, io.BytesIO(twice[name]))
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match="duplicate"):
        back = list(iter_trajectories([str(shard)], 32, skipped))
    assert [t.key for t in back] == ["ok1", "ok2", "ok3"]
    assert skipped.as_dict() == {"duplicate_member": 2, "duplicate_key": 1}


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_float_images_are_bad(value: float) -> None:
    pixels = np.zeros((8, 8), dtype=np.float32)
    pixels[3, 4] = value
    with pytest.raises(SampleError, match="NaN or infinite") as info:
        decode_image(_encode(Image.fromarray(pixels), "TIFF"), 8)
    assert info.value.reason == "bad_image"


def test_labelled_reading_needs_an_action_and_a_task_at_every_step() -> None:
    no_actions = {k: v for k, v in _good("k").items() if k != "actions.json"}
    cases = {
        "missing_actions": no_actions,
        "bad_action": {**_good("k"), "actions.json": b"[null]"},
        "bad_task": {**_good("k"), "meta.json": b'{"source": "test"}'},
    }
    for reason, sample in cases.items():
        with pytest.raises(SampleError) as info:
            decode_trajectory(sample, 32, labelled=True)
        assert info.value.reason == reason
    assert decode_trajectory(no_actions, 32).actions == [None]  # state-only reading: unknown
    numbered = decode_trajectory({**_good("k"), "meta.json": b'{"task": 7}'}, 32)
    assert numbered.task_at(0) == ""  # never the text "7" or "None"


def test_counts_from_dataloader_workers_reach_the_counter(tmp_path: Path) -> None:
    class Record(torch.utils.data.Dataset):
        def __init__(self, skipped: SkipCounter) -> None:
            self.skipped = skipped

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> int:
            self.skipped.record("bad_image" if i % 2 else "task", f"item {i}")
            return i

    skipped = SkipCounter(workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sorted(torch.utils.data.DataLoader(Record(skipped), batch_size=None, num_workers=2)) == list(range(6))
    skipped.record("task", "main process")
    assert skipped.as_dict() == {"bad_image": 3, "task": 4}


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    broken_image = _good("badimg")
    broken_image["1.png"] = b"\x89PNG\r\n\x1a\n not really"
    missing = _good("missing")
    del missing["1.png"]
    bad_json = _good("badjson")
    bad_json["meta.json"] = b"{not json"
    shard = tmp_path / "s.tar"
    _raw_shard(
        shard,
        [
            _good("ok1"),
            broken_image,
            missing,
            bad_json,
            _good("empty", actions=[""]),
            _good("wronglen", actions=["a", "b"]),
            _good("othertask", meta={"task": "other"}),
            _good("ok2"),
        ],
    )
    skipped = SkipCounter()
    with pytest.warns(UserWarning):
        back = list(iter_trajectories([str(shard)], 32, skipped, tasks=["t"], labelled=True))
    assert [t.key for t in back] == ["ok1", "ok2"]
    assert skipped.as_dict() == {
        "bad_image": 1,
        "missing_state": 1,
        "bad_json": 1,
        "bad_action": 1,
        "actions_length": 1,
        "task": 1,
    }
    # unlabelled reading: an empty action just means "unknown"
    with pytest.warns(UserWarning):
        back = list(iter_trajectories([str(shard)], 32, SkipCounter(), tasks=None, labelled=False))
    assert [t.actions for t in back if t.key == "empty"] == [[None]]


def test_decode_trajectory_raises_value_error() -> None:
    with pytest.raises(ValueError, match="missing_state"):
        decode_trajectory({"__key__": "k", "0.png": _encode(_image(0))}, 32)
    with pytest.raises(SampleError) as info:
        decode_trajectory({**_good("k"), "actions.json": b"[1]"}, 32, labelled=True)
    assert info.value.reason == "bad_action"


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (17, 50), 128),
        Image.new("LA", (32, 32), (10, 0)),
        Image.new("RGBA", (64, 48), (255, 0, 0, 0)),
        Image.new("P", (31, 33), 3),
        Image.new("1", (40, 40), 1),
        Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)),
        Image.new("I", (32, 32), 1000),
        Image.new("CMYK", (16, 16), (0, 255, 0, 0)),
    ],
    ids=lambda im: im.mode,
)
def test_odd_modes_and_sizes_come_out_rgb(image: Image.Image) -> None:
    fmt = {"I": "TIFF", "CMYK": "JPEG"}.get(image.mode, "PNG")
    out = decode_image(_encode(image, fmt), 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_mode_conversions_have_the_right_values() -> None:
    transparent = decode_image(_encode(Image.new("RGBA", (32, 32), (255, 0, 0, 0))), 32)
    assert torch.all(transparent == 1.0)  # composited on white
    deep = decode_image(_encode(Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))), 32)
    assert torch.all(deep == 1.0)  # 16-bit full scale → 8-bit full scale
    cmyk = decode_image(_encode(Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG"), 32)
    assert cmyk.shape == (3, 32, 32) and cmyk.min() > 0.9  # no ink = white
    gray = decode_image(_encode(Image.new("L", (32, 32), 51)), 32)
    torch.testing.assert_close(gray, torch.full((3, 32, 32), 0.2))
