"""Video converter: SSIM against closed forms, and clips the tests encode themselves (sprite renders, a static
clip, a truncated and an empty file, a frame folder) converted, filtered, split by clip and loaded back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from datamodules import sprites
from datamodules.convert import convert_video, main
from datamodules.convert.ssim import K1, K2, gaussian_window, ssim
from datamodules.convert.video import find_clips, split_of
from datamodules.shards import SkipCounter, iter_trajectories
from datamodules.trajectory import TrajectoryDataModule

THRESHOLD = 0.95


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _sprite_clip(seed: int, frames: int = 16) -> list[Image.Image]:
    states, _ = sprites.random_trajectory(random.Random(seed), frames)
    return [sprites.render(s) for s in states]


def _noise_clip(seed: int, frames: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(frames)]


def _encode(path: Path, frames: list[Image.Image], rate: int = 8) -> Path:
    """An H.264 mp4, lossless up to YUV rounding (qp 0, 4:4:4), so that decoded SSIM ≈ rendered SSIM."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt, stream.options = "yuv444p", {"qp": "0"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    return path


def _expected(frames: list[Image.Image]) -> tuple[int, int]:
    """(pairs kept, pairs dropped) by the filter on the rendered frames, guarded against codec-rounding flips."""
    scores = [ssim(_gray(a), _gray(b)) for a, b in zip(frames, frames[1:])]
    assert min(abs(s - THRESHOLD) for s in scores) > 0.005, "pick another seed: a pair sits on the threshold"
    kept = sum(s < THRESHOLD for s in scores)
    return kept, len(scores) - kept


def _trajectories(paths: list[Path]) -> list:
    skipped = SkipCounter()
    trajs = list(iter_trajectories([str(p) for p in paths], None, skipped))
    assert skipped.as_dict() == {}
    return trajs


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_ssim_matches_closed_forms() -> None:
    c1, c2 = K1**2, K2**2
    a, b = np.full((16, 16), 0.2), np.full((16, 16), 0.7)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Constant images: no variance, so SSIM is the luminance term alone.
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1), abs=1e-12)
    # A 0/1 checkerboard against its inverse: at every window the weighted mean is m = (1 ± w²)/2 with
    # w = Σ g_i (-1)^i, both variances are m(1 - m) and the covariance is -m(1 - m).
    x = np.indices((20, 20)).sum(0) % 2.0
    w = (gaussian_window() * (-1.0) ** np.arange(11)).sum()
    m = (1 + w**2) / 2
    v = m * (1 - m)
    expected = ((2 * m * (1 - m) + c1) * (-2 * v + c2)) / ((m**2 + (1 - m) ** 2 + c1) * (2 * v + c2))
    assert ssim(x, 1 - x) == pytest.approx(expected, abs=1e-12)
    noise = np.random.default_rng(0).normal(size=(32, 32))
    scores = [ssim(x[:16, :16], np.clip(x[:16, :16] + s * noise[:16, :16], 0, 1)) for s in (0.01, 0.1, 0.5)]
    assert scores == sorted(scores, reverse=True) and ssim(a, b) == ssim(b, a)


def test_clips_become_filtered_pairs_and_bad_files_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    moving = _sprite_clip(seed=1)
    _encode(src / "moving.mp4", moving)
    _encode(src / "static.mp4", [moving[0]] * 16)  # nothing happens: all 15 pairs must go
    full = _encode(tmp_path / "full.mp4", moving).read_bytes()
    (src / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (src / "empty.webm").write_bytes(b"")
    _encode(src / "still.avi", moving[:1])
    folder = src / "walk"
    folder.mkdir()
    walk = _sprite_clip(seed=4, frames=12)
    for i, image in enumerate(walk, start=1):  # natural order: motion_2 comes before motion_10
        image.save(folder / f"motion_{i}.png")
    (src / "notes.txt").write_text("not a clip")
    kept_moving, dropped_moving = _expected(moving)
    kept_walk, dropped_walk = _expected(walk)
    assert dropped_moving > 0 and kept_walk > 0  # the sprite world has near-identical steps at 32 px (paint, remove)

    main(["video", "--src", str(src), "--out", str(out), "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    kept, dropped = kept_moving + kept_walk, dropped_moving + dropped_walk + 15
    assert captured.out.strip() == (
        f"written {kept} pairs in 1 shards; dropped {dropped} pairs (ssim {dropped}); "
        "skipped 3 (bad_video 1, empty_file 1, too_short 1)"
    )
    assert "skipped truncated.mp4: bad_video:" in captured.err and "skipped empty.webm: empty_file" in captured.err
    assert "skipped still.avi: too_short: 1 sampled frames" in captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["inputs"] == 6 and report["pairs"] == kept and report["frames_decoded"] == 16 * 2 + 12 + 1

    trajs = _trajectories(sorted(out.glob("*.tar")))
    assert sorted(p.name for p in out.iterdir()) == ["video-train-000000.tar"]
    assert len(trajs) == kept and all(t.actions == [None] and t.meta["task"] == "video" for t in trajs)
    assert all(max(t.meta["ssim"]) < THRESHOLD for t in trajs)
    by_clip = {name: [t for t in trajs if t.meta["clip"] == name] for name in ("moving.mp4", "walk")}
    assert [len(v) for v in by_clip.values()] == [kept_moving, kept_walk]
    for traj in by_clip["walk"]:  # frame i of the folder is motion_{i + 1}.png, pixel for pixel (PNG kept as is)
        first = walk[traj.meta["frames"][0]]
        assert np.array_equal((traj.images[0].permute(1, 2, 0).numpy() * 255).round(), np.asarray(first))
    times = [t.meta["times"] for t in by_clip["moving.mp4"]]
    assert all(b - a == pytest.approx(1 / 8) for a, b in times)

    data = TrajectoryDataModule(
        root=str(out), labelled=None, unlabelled="video-*.tar", val=None, test=None, eval_batch_size=4
    )
    assert data.missing_shards("fit") == []
    pairs = data.pairs("unlabelled")
    assert len(pairs) == kept and {p["action"] for p in pairs} == {""} and pairs[0]["x"].shape == (3, 32, 32)


def test_length_stride_fps_cap_and_cut(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _encode(src / "noise.mp4", _noise_clip(0, 16), rate=8)

    def frames(**settings: object) -> list[list[int]]:
        report = convert_video(src, tmp_path / "out", ssim_threshold=1.01, **settings)
        return [t.meta["frames"] for t in _trajectories(report.shards)]

    # Windows start at the previous window's last frame: every sampled transition appears once.
    assert frames(length=3) == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8], [8, 9, 10], [10, 11, 12], [12, 13, 14]]
    assert frames(length=4, stride=2) == [[0, 2, 4, 6], [6, 8, 10, 12]]
    assert frames(fps=2.0) == [[0, 4], [4, 8], [8, 12]]  # 8 fps source
    assert frames(length=2, max_per_clip=2) == [[0, 1], [1, 2]]
    with pytest.raises(ValueError, match="--fps and --stride exclude each other"):
        convert_video(src, tmp_path / "out", fps=2.0, stride=2)

    # A near-identical pair cuts the clip: the window in progress is abandoned and counted, a new one starts after it.
    a, b, c, d = _noise_clip(1, 4)
    (src / "noise.mp4").unlink()
    _encode(src / "cut.mp4", [a, b, b, c, d])
    report = convert_video(src, tmp_path / "out", length=3)
    assert [t.meta["frames"] for t in _trajectories(report.shards)] == [[2, 3, 4]]
    assert report.dropped == {"ssim": 1, "incomplete": 1} and report.pairs == 2


def test_split_by_clip_is_stable_and_the_same_with_workers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "more").mkdir(parents=True)
    names = [f"clip{i}.mp4" for i in range(4)] + ["more/clip0.mp4", "more/clip1.mp4"]
    splits = {name: split_of(name, 0.5) for name in names}
    assert set(splits.values()) == {"train", "val"}  # with these names both splits get clips
    for i, name in enumerate(names):
        _encode(src / name, _noise_clip(10 + i, 4))
    assert [c.name for c in find_clips(src, 0.5)] == sorted(names)

    one = convert_video(src, tmp_path / "one", val_fraction=0.5, shard_size=4, workers=1)
    two = convert_video(src, tmp_path / "two", val_fraction=0.5, shard_size=4, workers=2)
    assert _snapshot(tmp_path / "one") == _snapshot(tmp_path / "two")  # same bytes, whatever the worker count
    assert one.pairs == two.pairs == 3 * len(names)
    for split in ("train", "val"):
        trajs = _trajectories(sorted((tmp_path / "one").glob(f"video-{split}-*.tar")))
        clips = {t.meta["clip"] for t in trajs}
        assert clips == {n for n, s in splits.items() if s == split}  # no clip in both, none lost
        assert all(t.meta["split"] == split for t in trajs)


def test_nothing_to_write_is_an_error_and_keeps_the_old_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _encode(src / "moving.mp4", _noise_clip(2, 4))
    convert_video(src, out)
    (out / "notes.txt").write_text("kept")
    before = _snapshot(out)
    (src / "moving.mp4").unlink()
    _encode(src / "static.mp4", _noise_clip(3, 1) * 6)
    for argv, message in [
        ([], "nothing to write from"),
        (["--length", "1"], "--length must be >= 2"),
        (["--workers", "0"], "--workers must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["video", "--src", str(src), "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
        assert _snapshot(out) == before
        if not argv:
            assert "dropped 5 pairs (ssim 5)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging folder left behind
    frames = src / "frames"
    frames.mkdir()
    _noise_clip(4, 1)[0].save(frames / "0.png")
    with pytest.raises(ValueError, match="frame folders have none"):
        convert_video(src, out, fps=1.0)
