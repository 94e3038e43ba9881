"""Aurora-Bench converter, on the real 28-pair sample."""

import json
from collections import Counter
from pathlib import Path

import pytest

from datamodules.convert import convert_aurora, main
from datamodules.shards import SkipCounter, iter_trajectories

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "aurora-bench-sample"
pytestmark = pytest.mark.skipif(not (SAMPLE / "test.json").exists(), reason=f"Aurora-Bench sample not at {SAMPLE}")
TASKS = {"magicbrush": 4, "ag": 6, "something": 6, "whatsup": 6, "kubric": 6}


def _read(out: Path, image_size: int = 32) -> list:
    skipped = SkipCounter()
    trajs = list(iter_trajectories([str(p) for p in sorted(out.glob("*.tar"))], image_size, skipped))
    assert skipped.as_dict() == {}
    return trajs


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


def test_task_filter_and_resize(tmp_path: Path) -> None:
    report = convert_aurora(SAMPLE, SAMPLE / "test.json", tmp_path, tasks=["kubric", "ag"], image_size=48)
    assert report.written == 12 and report.skipped == Counter({"task": 16})
    trajs = _read(tmp_path, image_size=48)
    assert {t.meta["task"] for t in trajs} == {"kubric", "ag"}


def test_unknown_task_lists_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"unknown task.*'paint'.*'ag', 'kubric', 'magicbrush', 'something'"):
        convert_aurora(SAMPLE, SAMPLE / "test.json", tmp_path, tasks=["paint"])
    with pytest.raises(SystemExit) as exit_info:
        main(["aurora", "--root", str(SAMPLE), "--json", "test.json", "--out", str(tmp_path), "--tasks", "paint"])
    assert exit_info.value.code == 2 and "whatsup" in capsys.readouterr().err


def test_bad_entries_are_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    entries = json.loads((SAMPLE / "test.json").read_text())[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    good = entries[0]
    entries += [
        {**good, "output": "data/nowhere/missing.png"},
        {**good, "output": None},
        {**good, "instruction": "  "},
        {**good, "instruction": 7},
        {**good, "output": str(broken)},
    ]
    spec = tmp_path / "test.json"
    spec.write_text(json.dumps(entries))
    main(["aurora", "--root", str(SAMPLE), "--json", str(spec), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "written 3 pairs in 1 shards; skipped 5" in captured.out
    assert "missing_file 1" in captured.out and "empty_instruction 2" in captured.out
    assert "no_output 1" in captured.out and "bad_image 1" in captured.out
    assert "entry 3: missing_file" in captured.err and "missing.png" in captured.err
    assert len(_read(tmp_path / "out")) == 3
