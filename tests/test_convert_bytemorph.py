"""ByteMorph converter on small files in both layouts (parquet as published, side-by-side as the official code reads
it), and the two ByteMorph configs against what it writes."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from datamodules.convert import convert_bytemorph, main
from datamodules.shards import SkipCounter, iter_trajectories
from datamodules.trajectory import TrajectoryDataModule

REPO = Path(__file__).resolve().parents[1]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how Hugging Face stores an Image column


def _png(value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(traj, t: int) -> np.ndarray:
    return (traj.images[t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _read(out: Path) -> list:
    skipped = SkipCounter()
    trajs = list(iter_trajectories([str(p) for p in sorted(out.glob("*.tar"))], None, skipped))
    assert skipped.as_dict() == {}
    return trajs


def _bench(folder: Path) -> Path:
    """Two parquet files: image structs with a bad row of each kind (file 0), plain binary columns (file 1)."""
    folder.mkdir(parents=True)
    rows = [
        ("camera_zoom", _png(10), _png(20), "Zoom in on the dog."),
        ("human_motion", _png(30), _png(40), "The man raises his arm."),
        ("human_motion", _png(50), b"\x89PNG\r\n\x1a\nbroken", "The woman sits down."),
        ("interaction", _png(60), _png(70), "   "),
        ("interaction", None, _png(80), "The cat jumps."),
        ("interaction", _png(90), _png(100), "The girl hands over the cup."),
    ]
    columns = {
        "edit_type": [r[0] for r in rows],
        "image_id": [f"id{i}" for i in range(len(rows))],
        "src_img": pa.array([None if r[1] is None else {"bytes": r[1], "path": None} for r in rows], IMAGE),
        "tgt_img": pa.array([{"bytes": r[2], "path": None} for r in rows], IMAGE),
        "edit_prompt": [r[3] for r in rows],
        "src_img_caption": [f"caption {i}" for i in range(len(rows))],
    }
    pq.write_table(pa.table(columns), folder / "test-00000-of-00002.parquet")
    plain = {
        "edit_type": ["object_motion", "camera_motion"],
        "src_img": pa.array([_png(110), _png(130)], pa.binary()),
        "tgt_img": pa.array([_png(120), _png(140)], pa.binary()),
        "edit_prompt": ["The ball rolls left.", "The camera pans right."],
    }
    pq.write_table(pa.table(plain), folder / "test-00001-of-00002.parquet")
    return folder


def test_parquet_rows_become_labelled_pairs_and_bad_rows_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, out = _bench(tmp_path / "BM-Bench" / "data"), tmp_path / "out"
    main(["bytemorph", "--src", str(src), "--out", str(out)])
    captured = capsys.readouterr()
    assert captured.out.strip() == (
        "written 5 pairs in 1 shards; skipped 3 (bad_image 1, empty_instruction 1, no_input 1)"
    )
    name = "test-00000-of-00002.parquet"
    for row, reason in ((2, "bad_image"), (3, "empty_instruction"), (4, "no_input")):
        assert f"skipped row {row} of {name}: {reason}" in captured.err
    trajs = _read(out)
    assert [t.meta["task"] for t in trajs] == [
        "camera_zoom",
        "human_motion",
        "interaction",
        "object_motion",
        "camera_motion",
    ]
    assert trajs[0].actions == ["Zoom in on the dog."]
    assert trajs[0].meta | {"task": "", "source": ""} == {
        "task": "",
        "source": "",
        "layout": "parquet",
        "file": name,
        "row": 0,
        "image_id": "id0",
        "src_img_caption": "caption 0",
    }
    assert trajs[3].meta["row"] == 0 and trajs[3].meta["file"] == "test-00001-of-00002.parquet"
    for traj, (src_value, tgt_value) in zip(trajs, [(10, 20), (30, 40), (90, 100), (110, 120), (130, 140)]):
        assert (_pixels(traj, 0)[0, 0] == (src_value, 255 - src_value, 7)).all()
        assert (_pixels(traj, 1)[0, 0] == (tgt_value, 255 - tgt_value, 7)).all()

    data = TrajectoryDataModule(root=str(out), labelled="*.tar", unlabelled=None, val=None, test=None, image_size=8)
    pairs = data.pairs("labelled")  # a labelled split: every pair has its edit prompt and edit type
    assert [p["action"] for p in pairs][:2] == ["Zoom in on the dog.", "The man raises his arm."]
    assert Counter(p["task"] for p in pairs)["human_motion"] == 1

    report = convert_bytemorph(src, out, tasks=["interaction", "camera_zoom"], image_size=4)
    assert report.written == 2 and report.skipped == Counter({"task": 4, "empty_instruction": 1, "no_input": 1})
    assert _read(out)[0].images.shape == (2, 3, 4, 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["bytemorph", "--src", str(src), "--out", str(out), "--tasks", "dance"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown task(s) ['dance']" in err and "'object_motion'" in err


def test_side_by_side_folders_as_the_official_code_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ByteMorph-Bench-Test"
    (src / "0_camera_zoom").mkdir(parents=True)
    (src / "3_human_motion").mkdir()

    def sample(rel: str, left: int, right: int, info: dict | None, fmt: str = "PNG") -> None:
        image = Image.new("RGB", (12, 6), (left, 0, 0))
        image.paste((right, 0, 255), (6, 0, 12, 6))
        image.save(src / rel, format=fmt, quality=100)
        if info is not None:
            (src / rel).with_suffix(".json").write_text(json.dumps(info))

    sample("0_camera_zoom/1001.png", 10, 200, {"caption": "a dog on grass", "edit": "Zoom in on the dog."})
    sample("3_human_motion/2002.png", 30, 180, {"edit": "He waves.", "edit_type": "human motion"})
    sample("3_human_motion/2003.png", 50, 160, None)
    sample("3_human_motion/2004.png", 70, 140, {"caption": "no instruction"})
    sample("loose.png", 90, 120, {"edit": "Turn around."})
    (src / "3_human_motion" / "2005.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (src / "3_human_motion" / "2005.json").write_text(json.dumps({"edit": "Sit."}))

    main(["bytemorph", "--src", str(src), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert captured.out.strip() == (
        "written 2 pairs in 1 shards; skipped 4 (bad_image 1, bad_task 1, empty_instruction 1, missing_json 1)"
    )
    assert "skipped 3_human_motion/2003.png: missing_json: no 2003.json beside it" in captured.err
    assert "skipped loose.png: bad_task" in captured.err
    trajs = _read(tmp_path / "out")
    assert [(t.meta["task"], t.actions[0]) for t in trajs] == [
        ("0_camera_zoom", "Zoom in on the dog."),  # the folder names the edit type
        ("human motion", "He waves."),  # the JSON's edit_type wins over the folder
    ]
    assert trajs[0].meta["caption"] == "a dog on grass" and trajs[0].meta["image"] == "0_camera_zoom/1001.png"
    assert trajs[0].images.shape == (2, 3, 6, 6)
    assert (_pixels(trajs[0], 0) == (10, 0, 0)).all() and (_pixels(trajs[0], 1) == (200, 0, 255)).all()

    for argv, message in [
        (["--tasks", "x"], "error: unknown task(s) ['x']; edit types in"),
        (["--src", str(src / "3_human_motion" / "2003.png")], "error: --src"),  # side-by-side needs a folder
        (["--layout", "parquet"], "error: nothing to write from"),
    ]:
        with pytest.raises(SystemExit) as exit_info:  # an error, and no --out made
            main(["bytemorph", "--src", str(src), "--out", str(tmp_path / "none"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
        assert not (tmp_path / "none").exists()


def test_tiny_config_reads_the_converted_shards(tmp_path: Path) -> None:
    root = tmp_path / "bytemorph_sample"
    convert_bytemorph(_bench(tmp_path / "bench"), root, image_size=32)
    config = yaml.safe_load((REPO / "configs" / "bytemorph_tiny.yaml").read_text())
    data = TrajectoryDataModule(**{**config["data"]["init_args"], "root": str(root)})
    assert data.missing_shards("fit") == [] and data.missing_shards("test") == []
    tasks = {p["task"] for p in data.pairs("test")}
    assert tasks == {"camera_zoom", "human_motion", "interaction", "object_motion", "camera_motion"}
    assert {p["action"] for p in data.pairs("unlabelled")} == {""}


def test_real_config_fails_fast_naming_what_to_download_and_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swirl_vl.cli import main as swirl  # imported here: seconds of model libraries, which the other tests skip

    monkeypatch.chdir(tmp_path)  # the config's relative paths exist nowhere here
    with pytest.raises(SystemExit) as exit_info:
        swirl(["fit", "--config", str(REPO / "configs" / "bytemorph.yaml")])
    message = str(exit_info.value.code)
    assert "missing inputs, nothing was run" in message
    assert "timbrooks/instruct-pix2pix" in message and "Qwen/Qwen2.5-VL-3B-Instruct" in message
    for split in ("labelled/*.tar", "unlabelled/video-train-*.tar", "test/*.tar"):
        assert f"data/bytemorph/{split}" in message, split
    assert "`python -m datamodules.convert bytemorph --src BM-Bench/data --out data/bytemorph/test`" in message
    assert sorted(tmp_path.iterdir()) == []
