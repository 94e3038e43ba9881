"""Phase I and Phase II step time of two versions of swirl_vl, side by side, on trained models.

    python benchmarks/phase_times.py --before HEAD~1 --sft RUN/pretrained/sft --data RUN/../data --repeats 3

``--before`` is a git revision, checked out into a temporary worktree; the other side is this working tree. Each
run is ``python -m swirl_vl fit --config configs/sprites.yaml`` of that tree (its own config) from copies of the
same SFT folders, ``--schedule.sft_steps 0`` and one iteration of ``--phase1-steps`` + ``--phase2-steps``, with
``--threads`` threads (default one). The sides alternate within each repeat (before, after; then after, before) so
that a noisy machine slows both. Per run: seconds per step of each phase (``swirl_phases.json``), the process's CPU
time, its peak RSS and the test table after the iteration. Prints each pair's ratio (after / before) and the
medians; writes JSON.

Trained models matter: a trained FWM draws the same next state several times within a group, which an untrained
one (``step_time.py``'s tiny models) rarely does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(
    tree: Path, sft: Path, data: Path, work: Path, phase1: int, phase2: int, extra: list[str], threads: int
) -> dict:
    """One fit from copies of the SFT folders; its phases' step times, CPU time, peak RSS and last test row."""
    if work.exists():
        shutil.rmtree(work)
    for name in ("fwm", "idm"):
        shutil.copytree(sft / name, work / "models" / name)
    args = [
        sys.executable, "-m", "swirl_vl", "fit", "--config", "configs/sprites.yaml", "--seed_everything", "0",
        "--trainer.enable_progress_bar", "false", "--data.root", str(data),
        "--trainer.logger.init_args.save_dir", str(work / "runs"),
        "--model.init_args.fwm.init_args.model.init_args.path", str(work / "models" / "fwm"),
        "--model.init_args.idm.init_args.model.init_args.path", str(work / "models" / "idm"),
        "--schedule.sft_steps", "0", "--schedule.iterations", "1",
        "--schedule.phase1_steps", str(phase1), "--schedule.phase2_steps", str(phase2), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with (work / "log").open("w") as log:
        proc = subprocess.run(args, cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"fit in {tree} failed (exit {proc.returncode}); log: {work / 'log'}")
    version = sorted((work / "runs" / "sprites").glob("version_*"))[-1]
    phases = json.loads((version / "swirl_phases.json").read_text())
    table = json.loads((version / "swirl_metrics.json").read_text())[-1]
    return {
        "seconds_per_step": {p["stage"]: p["seconds_per_step"] for p in phases},
        "peak_rss_mib": max(p["peak_rss_mib"] for p in phases),
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "wall_s": wall,
        "fwm_state_acc": table["fwm_state_acc"],
        "idm_action_acc": table["idm_action_acc"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision of the 'before' side")
    p.add_argument("--sft", type=Path, required=True, help="folder holding the SFT models fwm/ and idm/")
    p.add_argument("--data", type=Path, required=True, help="the sprite shards those models were trained on")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phase1-steps", type=int, default=40)
    p.add_argument("--phase2-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "phase_times.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further CLI overrides for every run, after --")
    a = p.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), a.before], cwd=REPO, check=True)
        try:
            for r in range(a.repeats):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for side in order:
                    tree = old if side == "before" else REPO
                    out = run(
                        tree,
                        a.sft.resolve(),
                        a.data.resolve(),
                        Path(tmp) / f"{side}{r}",
                        a.phase1_steps,
                        a.phase2_steps,
                        extra,
                        a.threads,
                    )
                    runs[side].append(out)
                    print(f"repeat {r} {side}: {json.dumps(out)}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    ratios = {}
    for stage in ("phase1", "phase2"):
        pairs = [
            b["seconds_per_step"][stage] / a_["seconds_per_step"][stage] for a_, b in zip(runs["before"], runs["after"])
        ]
        ratios[stage] = {"median": statistics.median(pairs), "all": pairs}
    cpu = [b["cpu_s"] / a_["cpu_s"] for a_, b in zip(runs["before"], runs["after"])]
    ratios["process_cpu"] = {"median": statistics.median(cpu), "all": cpu}
    for name, r in ratios.items():
        print(f"{name}: after / before = {r['median']:.2f} (pairs: {', '.join(f'{x:.2f}' for x in r['all'])})")
    for side, rs in runs.items():
        rss = [r["peak_rss_mib"] for r in rs]
        print(f"{side}: peak RSS {min(rss):.0f}–{max(rss):.0f} MiB, fwm_state_acc {[r['fwm_state_acc'] for r in rs]}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = a.out.with_suffix(".tmp")
    settings = {k: str(v) for k, v in vars(a).items()}
    tmp_out.write_text(json.dumps({"settings": settings, "runs": runs, "ratios": ratios}, indent=2))
    tmp_out.replace(a.out)
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
