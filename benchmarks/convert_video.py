"""The video converter on a generated folder of small clips, with 1 and 2 workers: pairs written, pairs dropped by
the SSIM filter, decoded frames per second and peak memory.

    python benchmarks/convert_video.py [--clips 60] [--frames 48] [--size 64] [--workers 1 2]

Clips are sprite-world trajectories rendered at ``--size`` px and encoded as H.264 mp4 (libx264's defaults, lossy);
every fifth clip holds its first state for half its frames, so that the filter has still stretches to drop. Each
worker count runs in a fresh process (``--child``) that times ``convert_video`` alone (not Python's start-up) while
a thread samples memory every 20 ms from /proc: the peak RSS of the main process and of the largest worker (forked
workers share the parent's pages, torch's included, and RSS counts them in each), and the peak PSS summed over the
process tree (shared pages split between their users: what the conversion really holds).
Writes ``benchmarks/results/convert_video.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_clips(folder: Path, clips: int, frames: int, size: int) -> None:
    import av

    from datamodules import sprites

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        states, _ = sprites.random_trajectory(random.Random(i), frames)
        if i % 5 == 0:
            states = [states[0]] * (frames // 2) + states[: frames - frames // 2]
        with av.open(str(folder / f"clip{i:03d}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for state in states:
                image = sprites.render(state, cell=size // 4)
                container.mux(stream.encode(av.VideoFrame.from_image(image)))
            container.mux(stream.encode())


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it has gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0, 0
    return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


class _MemorySampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.main_rss = self.worker_rss = self.total_pss = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.done.wait(0.02):
            main_rss, main_pss = _memory_kib(me)
            workers = [_memory_kib(pid) for pid in _descendants(me)]
            self.main_rss = max(self.main_rss, main_rss)
            self.worker_rss = max([self.worker_rss] + [rss for rss, _ in workers])
            self.total_pss = max(self.total_pss, main_pss + sum(pss for _, pss in workers))


def child(src: str, out: str, workers: int) -> dict:
    from datamodules.convert import convert_video

    before = _memory_kib(os.getpid())[0] / 1024
    sampler = _MemorySampler()
    sampler.start()
    start = time.perf_counter()
    report = convert_video(src, out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    return {
        "workers": workers,
        "seconds": round(seconds, 3),
        "clips": report.inputs,
        "frames_decoded": report.frames_decoded,
        "frames_per_s": round(report.frames_decoded / seconds, 1),
        "pairs_written": report.pairs,
        "pairs_dropped_ssim": report.dropped.get("ssim", 0),
        "skipped": dict(report.skipped),
        "shards": len(report.shards),
        "rss_after_imports_mib": round(before, 1),
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mib": round(sampler.worker_rss / 1024, 1) if workers > 1 else None,
        "peak_pss_all_processes_mib": round(sampler.total_pss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--frames", type=int, default=48, help="frames per clip")
    parser.add_argument("--size", type=int, default=64, help="frame side in px (a multiple of 4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_video.json"))
    parser.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips"
        start = time.perf_counter()
        make_clips(clips, args.clips, args.frames, args.size)
        print(f"{args.clips} clips of {args.frames} frames at {args.size} px in {time.perf_counter() - start:.1f} s")
        runs = []
        for workers in args.workers:
            cmd = [sys.executable, __file__, "--child", str(clips), str(Path(tmp) / f"out{workers}"), str(workers)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]))
        same = len({(Path(tmp) / f"out{w}" / "video-train-000000.tar").read_bytes() for w in args.workers}) == 1
    result = {
        "setup": {"clips": args.clips, "frames_per_clip": args.frames, "size": args.size, "codec": "libx264 yuv420p"},
        "settings": "convert_video defaults: --length 2, --stride 1, --ssim-threshold 0.95, no resize",
        "same_shards_for_every_worker_count": same,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
