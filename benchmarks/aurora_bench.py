"""The whole Aurora-Bench through ``test`` with the tiny models: all 8 tasks, the 3 without targets included.

    python benchmarks/aurora_bench.py --root path/to/AURORA [--image-size 32] [--sft-steps 80] [--out runs/aurora_bench]

``--root`` is a checkout of the benchmark (github.com/McGill-NLP/AURORA: ``test.json`` and the ``data/`` images it
names). The script converts ``test.json`` (``python -m datamodules.convert aurora``), fits ``configs/aurorabench_tiny.yaml``
on the converted pairs (every split the same shards, as that config does: a smoke run, not an experiment; training
and validation skip the target-free pairs), then runs ``test`` on its last checkpoint with a tiny random VLM judge,
so that the ``judge_*`` columns exist (its answers are mostly unreadable, which ``judge_unparsed`` counts). Prints
the per-task table and writes ``benchmarks/results/aurora_bench_whole.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _run(args: list[str], env: dict[str, str]) -> float:
    """Run a command, stream nothing, fail loudly with its tail; returns its wall time."""
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the benchmark's checkout: test.json and data/")
    parser.add_argument("--out", default="runs/aurora_bench", help="folder for the shards, models and run")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) of each command")
    a = parser.parse_args(argv)
    out = Path(a.out).absolute()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    data, models, runs = out / "data", out / "models", out / "runs"
    report_path = out / "conversion.json"
    seconds = {}
    seconds["convert"] = _run(
        [sys.executable, "-m", "datamodules.convert", "aurora", "--root", a.root, "--json", "test.json"]
        + ["--out", str(data), "--image-size", str(a.image_size), "--report", str(report_path)],
        env,
    )
    conversion = json.loads(report_path.read_text())
    size = str(a.image_size)
    common = [
        "--config", "configs/aurorabench_tiny.yaml",
        "--data.root", str(data),
        "--data.image_size", size,
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.logger.init_args.version", "0",
        "--model.init_args.fwm.init_args.model.init_args.path", str(models / "fwm"),
        "--model.init_args.fwm.init_args.model.init_args.image_size", size,
        "--model.init_args.idm.init_args.model.init_args.path", str(models / "idm"),
        "--model.init_args.idm.init_args.model.init_args.image_size", size,
        "--schedule.sft_steps", str(a.sft_steps),
    ]  # fmt: skip
    seconds["fit"] = _run([sys.executable, "-m", "swirl_vl", "fit", *common], env)

    from swirl_vl.models.tiny_vlm import build_tiny_llava

    judge_path = models / "judge"
    if not (judge_path / "config.json").exists():
        build_tiny_llava(judge_path, seed=0, image_size=a.image_size)
    judge = {"class_path": "swirl_vl.eval.judge.VLMJudge", "init_args": {"path": str(judge_path)}}
    run = runs / "aurorabench_tiny" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    seconds["test"] = _run(
        [sys.executable, "-m", "swirl_vl", "test", *common, "--model.init_args.fwm.init_args.judge", json.dumps(judge)]
        + ["--ckpt_path", str(ckpt)],
        env,
    )
    metrics = json.loads((run / "test_metrics.json").read_text())
    table = (run / "test_metrics.md").read_text()
    result = {
        "root": str(Path(a.root).absolute()),
        "image_size": a.image_size,
        "sft_steps": a.sft_steps,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "conversion": {k: conversion[k] for k in ("inputs", "written", "pairs", "target_free", "skipped")},
        "skipped_inputs": [d for d in conversion["details"] if d["reason"] != "task"],
        "rows": metrics["rows"],
        "counts": metrics["counts"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "aurora_bench_whole.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "aurora_bench_whole.md").write_text(table)
    c = result["conversion"]
    print(
        f"converted {c['inputs']} entries: {c['pairs']} pairs ({c['target_free']} without a target), "
        f"skipped {sum(c['skipped'].values())} {c['skipped']}; seconds {result['seconds']}"
    )
    print(table)


if __name__ == "__main__":
    main()
