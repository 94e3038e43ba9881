"""The README's benchmark commands, shrunk to a few steps on tiny data: they run every arm and write their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = [
    "--data.labelled_trajectories=8",
    "--data.unlabelled_trajectories=16",
    "--data.val_trajectories=4",
    "--data.test_trajectories=2",
    "--data.batch_size=4",
    "--trainer.limit_val_batches=1",
    "--model.init_args.rl_batch_size=2",
    "--model.init_args.fwm_group_size=2",
    "--model.init_args.idm_group_size=2",
    "--model.init_args.min_label_logprob=-100",
]


def _bench(script: str, tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "result.json"
    cmd = [sys.executable, f"benchmarks/{script}", "--seeds", "0", "--work", str(tmp / "work"), "--out", str(out)]
    cmd += ["--sft-steps", "2", "--iterations", "1", "--phase1-steps", "1", "--phase2-steps", "1", *args]
    proc = subprocess.run([*cmd, "--", *TINY_DATA], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_swirl_vs_sft_runs_both_arms_from_one_sft_checkpoint(tmp_path: Path) -> None:
    proc, result = _bench("swirl_vs_sft.py", tmp_path, "--jobs", "2")
    assert set(result["summary"]) == {"sft", "sft_only", "swirl"}
    (seed,) = result["seeds"]
    assert [row["after"] for row in seed["tables"]["swirl"]] == ["iteration_1"]
    assert {p["stage"] for p in seed["phases"]["swirl"]} == {"phase1", "phase2"}
    assert 0 <= seed["swirl"]["fwm_state_acc"] <= 1 and 0 <= seed["sft_only"]["idm_action_acc"] <= 1
    assert "relative to sft_only" in proc.stdout and "| swirl |" in proc.stdout

    # --reuse keeps the finished SFT and sft_only runs and trains only the arm that is missing.
    proc, again = _bench("ablations.py", tmp_path, "--jobs", "1", "--arms", "sft_only", "bootstrap", "--reuse")
    assert "sft: reusing" in proc.stdout and "sft_only: reusing" in proc.stdout
    (reused,) = again["seeds"]
    assert reused["sft"] == seed["sft"] and reused["sft_only"] == seed["sft_only"]
    assert reused["seconds"]["sft"] is None and reused["seconds"]["sft_only"] is None
    assert reused["seconds"]["bootstrap"] > 0
