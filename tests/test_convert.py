"""Aurora-Bench converter: on the real 28-pair sample, and on tiny hand-made layouts for what must never go wrong."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.convert import aurora, convert_aurora, main
from datamodules.shards import SkipCounter, iter_trajectories

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "aurora-bench-sample"
needs_sample = pytest.mark.skipif(not (SAMPLE / "test.json").exists(), reason=f"Aurora-Bench sample not at {SAMPLE}")
TASKS = {"magicbrush": 4, "ag": 6, "something": 6, "whatsup": 6, "kubric": 6}


def _read(out: Path, image_size: int = 32) -> list:
    skipped = SkipCounter()
    trajs = list(iter_trajectories([str(p) for p in sorted(out.glob("*.tar"))], image_size, skipped))
    assert skipped.as_dict() == {}
    return trajs


def _layout(root: Path, pairs: int) -> list[dict]:
    """``root/img/{i}-in.png``, ``root/img/{i}-out.png`` (8×8) and their entries, tasks "a"/"b" in turn."""
    (root / "img").mkdir(parents=True)
    entries = []
    for i in range(pairs):
        for side, value in (("in", i), ("out", 255 - i)):
            Image.new("RGB", (8, 8), (value, 0, 0)).save(root / "img" / f"{i}-{side}.png")
        entries.append({"input": f"img/{i}-in.png", "output": f"img/{i}-out.png", "instruction": f"do {i}"})
        entries[-1]["task"] = "ab"[i % 2]
    (root / "test.json").write_text(json.dumps(entries))
    return entries


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@needs_sample
def test_converts_the_whole_sample(tmp_path: Path) -> None:
    report = convert_aurora(SAMPLE, SAMPLE / "test.json", tmp_path, shard_size=10)
    assert report.written == 28 and report.skipped.total() == 0
    assert [p.name for p in report.shards] == ["aurora-000000.tar", "aurora-000001.tar", "aurora-000002.tar"]
    trajs = _read(tmp_path)
    assert len(trajs) == 28
    assert Counter(t.meta["task"] for t in trajs) == TASKS
    entries = json.loads((SAMPLE / "test.json").read_text())
    for traj, entry in zip(trajs, entries):
        assert traj.images.shape == (2, 3, 32, 32)
        assert traj.actions == [entry["instruction"].strip()]
        assert traj.meta["source"] == "aurora-bench" and traj.meta["input"] == entry["input"]


@needs_sample
def test_task_filter_and_resize(tmp_path: Path) -> None:
    report = convert_aurora(SAMPLE, SAMPLE / "test.json", tmp_path, tasks=["kubric", "ag"], image_size=48)
    assert report.written == 12 and report.skipped == Counter({"task": 16})
    trajs = _read(tmp_path, image_size=48)
    assert {t.meta["task"] for t in trajs} == {"kubric", "ag"}


@needs_sample
def test_unknown_task_lists_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"unknown task.*'paint'.*'ag', 'kubric', 'magicbrush', 'something'"):
        convert_aurora(SAMPLE, SAMPLE / "test.json", tmp_path, tasks=["paint"])
    with pytest.raises(SystemExit) as exit_info:
        main(["aurora", "--root", str(SAMPLE), "--json", "test.json", "--out", str(tmp_path), "--tasks", "paint"])
    assert exit_info.value.code == 2 and "whatsup" in capsys.readouterr().err


def test_bad_entries_are_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    good = _layout(root, 3)[0]
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    nan = io.BytesIO()
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(nan, format="TIFF")
    (root / "img" / "nan.tif").write_bytes(nan.getvalue())
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    bad = [
        {**good, "output": "img/missing.png"},
        {**good, "input": None},
        {**good, "instruction": "  "},
        {**good, "instruction": 7},
        {**good, "output": "img/broken.png"},
        {**good, "output": "img/nan.tif"},
        {**good, "output": str(outside)},
        {**good, "output": "img/../../secret.png"},
        {k: v for k, v in good.items() if k != "task"},
        {**good, "task": None},
        {**good, "task": 7},
    ]
    entries = json.loads((root / "test.json").read_text()) + bad
    (root / "test.json").write_text(json.dumps(entries))
    main(["aurora", "--root", str(root), "--json", "test.json", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert captured.out.strip() == (
        "written 3 pairs in 1 shards; skipped 11 "
        "(bad_image 2, bad_task 3, empty_instruction 2, missing_file 1, no_input 1, outside_root 2)"
    )
    assert "entry 3: missing_file" in captured.err and "missing.png" in captured.err
    assert "entry 9: outside_root" in captured.err and "entry 10: outside_root" in captured.err
    assert "entry 8: bad_image" in captured.err and "NaN" in captured.err
    trajs = _read(tmp_path / "out")
    assert [t.meta["task"] for t in trajs] == ["a", "b", "a"]


@pytest.mark.parametrize(
    "case", ["root typo", "empty list", "all entries bad", "image size 0"], ids=lambda c: c.replace(" ", "_")
)
def test_writing_nothing_is_an_error_and_keeps_the_old_shards(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    entries = _layout(root, 4)
    convert_aurora(root, root / "test.json", out, shard_size=2)
    (out / "notes.txt").write_text("kept")
    before = _snapshot(out)
    argv = {"root": str(root), "json": str(root / "test.json"), "out": str(out), "image-size": "8"}
    if case == "root typo":
        argv["root"] = str(tmp_path / "rot")
    elif case == "empty list":
        (root / "test.json").write_text("[]")
    elif case == "all entries bad":
        (root / "test.json").write_text(json.dumps([{**e, "input": "img/gone.png"} for e in entries]))
    else:
        argv["image-size"] = "0"
    with pytest.raises(SystemExit) as exit_info:
        main(["aurora", *(x for k, v in argv.items() for x in (f"--{k}", v))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]  # no staging folder left behind


def test_old_shards_are_replaced_only_once_the_new_set_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    _layout(root, 6)
    convert_aurora(root, root / "test.json", out, shard_size=2)
    (out / "notes.txt").write_text("kept")
    before = _snapshot(out)
    load, calls = aurora._load_image, []

    def crash_at_the_fifth_image(path: Path, image_size: int | None) -> object:
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return load(path, image_size)

    monkeypatch.setattr(aurora, "_load_image", crash_at_the_fifth_image)
    with pytest.raises(KeyboardInterrupt):  # the first resized shard is complete when it strikes
        convert_aurora(root, root / "test.json", out, shard_size=1, image_size=4)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]
    monkeypatch.undo()
    report = convert_aurora(root, root / "test.json", out, tasks=["a"], shard_size=2, image_size=4)
    assert [p.name for p in report.shards] == ["aurora-000000.tar", "aurora-000001.tar"]
    assert sorted(_snapshot(out)) == ["aurora-000000.tar", "aurora-000001.tar", "notes.txt"]  # stale third shard gone
    assert (out / "notes.txt").read_text() == "kept" and len(_read(out, image_size=4)) == 3


def test_invalid_json_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    _layout(root, 1)
    (root / "test.json").write_text('[{"input": ')
    with pytest.raises(SystemExit) as exit_info:
        main(["aurora", "--root", str(root), "--json", "test.json", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(root / "test.json") in err and "not valid JSON" in err
    assert not (tmp_path / "out").exists()


def test_entries_without_a_target_become_open_pairs_for_the_test_split_only(tmp_path: Path) -> None:
    # As the whole benchmark gives its clevr/emu/epic entries: no "output" key, sometimes "id" or "type".
    root = tmp_path / "root"
    entries = _layout(root, 2)
    entries += [
        {
            "id": "005422",
            "instruction": "the tiny yellow cylinder turns brown",
            "input": "img/0-in.png",
            "task": "clevr",
        },
        {"instruction": "Make it into Conceptual Art.", "input": "img/1-in.png", "type": "style", "task": "emu"},
    ]
    (root / "test.json").write_text(json.dumps(entries))
    report = convert_aurora(root, root / "test.json", tmp_path / "out")
    assert (report.written, report.pairs, report.target_free) == (4, 4, 2)
    assert report.summary().startswith("written 4 pairs (2 without a target, for test only) in 1 shards")
    shards = [str(p) for p in report.shards]
    skipped = SkipCounter()
    test = list(iter_trajectories(shards, None, skipped, labelled=True, open_steps=True))
    assert skipped.as_dict() == {}
    closed, clevr, emu = test[0], test[2], test[3]
    assert not closed.open_ended and closed.images.shape[0] == 2 and len(closed.actions) == 1
    assert clevr.open_ended and clevr.images.shape[0] == 1 and clevr.actions == ["the tiny yellow cylinder turns brown"]
    assert (clevr.meta["task"], clevr.meta["id"], emu.meta["type"]) == ("clevr", "005422", "style")
    assert torch.equal(clevr.images[0], test[0].images[0])  # its source is the image named by "input"
    # Any other split (training, validation) skips them, counted.
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match="no_target"):
        assert len(list(iter_trajectories(shards, None, skipped, labelled=True))) == 2
    assert skipped.as_dict() == {"no_target": 2}
