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

    # reward_signal.py reads the same SFT folders and data; the data folder is read as written, never regenerated.
    manifest = tmp_path / "work" / "seed0" / "data" / "sprites-manifest.json"
    before = manifest.read_text()
    sft = tmp_path / "work" / "seed0" / "runs" / "sft" / "version_0" / "pretrained" / "sft"
    out = tmp_path / "signal.json"
    cmd = [sys.executable, "benchmarks/reward_signal.py", "--fwm", str(sft / "fwm"), "--idm", str(sft / "idm")]
    cmd += ["--data", str(manifest.parent), "--pairs", "4", "--group-size", "3", "--batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert manifest.read_text() == before
    signal = json.loads(out.read_text())
    for phase in ("phase1", "phase2"):
        assert signal[phase]["groups"] == 4 and 0 <= signal[phase]["mixed_groups"] <= 4
        for key in ("groups_with_a_right_sample", "greedy_acc", "best_of_group_acc"):
            assert 0 <= signal[phase][key] <= 1

    # rl_variants.py runs each variant from the same SFT run over RL seeds, side by side, on the same data.
    out = tmp_path / "variants.json"
    shrink = ["--schedule.iterations=1", "--schedule.phase1_steps=1", "--schedule.phase2_steps=1", *TINY_DATA]
    cmd = [sys.executable, "benchmarks/rl_variants.py", "--sft", str(sft.parents[1]), "--data", str(manifest.parent)]
    cmd += ["--rl-seeds", "0", "--work", str(tmp_path / "variants"), "--out", str(out)]
    cmd += ["--variant", "g2", *shrink, "--variant", "g3", *shrink, "--model.init_args.fwm_group_size=3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert manifest.read_text() == before
    variants = json.loads(out.read_text())
    assert [(r["variant"], r["rl_seed"], len(r["table"])) for r in variants["runs"]] == [("g2", 0, 1), ("g3", 0, 1)]
    assert variants["summary"]["g2"]["phase1_step_ratio"] == 1.0 and variants["summary"]["g3"]["phase1_step_s"] > 0
    start = json.loads((sft.parents[1] / "swirl_metrics.json").read_text())[-1]["fwm_state_acc"]
    assert all(v["sft_fwm_state_acc"] == start for v in variants["summary"].values())
    assert "| g3 |" in proc.stdout

    # guidance.py scores a diffusion FWM's greedy samples on the same data, per guidance setting.
    from swirl_vl.models.tiny_diffusion import build_tiny_instruct_pix2pix

    fwm = build_tiny_instruct_pix2pix(tmp_path / "diffusion")
    out = tmp_path / "guidance.json"
    cmd = [sys.executable, "benchmarks/guidance.py", "--fwm", str(fwm), "--data", str(manifest.parent), "--pairs", "3"]
    cmd += ["--steps", "2", "--scales", "1,1", "2,1.5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["guidance_scale"], r["image_guidance_scale"]) for r in rows] == [(1.0, 1.0), (2.0, 1.5)]
    assert all(0 <= r["fwm_state_acc"] <= 1 for r in rows) and "| 2 | 2.0 | 1.5 |" in proc.stdout


def test_group_auc_counts_ordered_pairs_and_half_ties() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from reward_signal import group_auc

    assert group_auc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert group_auc([0.2, 0.2, 0.7], [True, False, False]) == 0.25  # one tie (½), one loss (0)
    assert group_auc([0.3, 0.4], [True, True]) is None


def test_step_time_measures_both_phases_and_trl_when_installed(tmp_path: Path) -> None:
    """``step_time.py`` for one repeat of one Phase II step (and TRL's side and the ratio when TRL, the ``bench``
    extra, is installed), with micro-batches so that their path runs too. Phase I runs the same child on its phase."""
    try:
        import trl  # noqa: F401

        with_trl: list[str] = []
    except ImportError:
        with_trl = ["--no-trl"]
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, "benchmarks/step_time.py", "--repeats", "1", "--warmup", "0", "--steps", "1"]
    cmd += ["--pairs", "2", "--group-size", "2", "--max-new-tokens", "3", "--work", str(tmp_path), "--out", str(out)]
    cmd += ["--swirl-options", '{"rl_micro_batch_size": 1}', "--phases", "phase2", *with_trl]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    swirl = result["phase2"]["swirl"]
    assert swirl["cpu_s"]["median"] > 0 and swirl["peak_rss_mib"]["median"] > 100
    assert 0.5 < swirl["planned_peak_mib"]["median"] / swirl["peak_rss_mib"]["median"] < 1.5  # the memory plan
    if not with_trl:
        assert result["phase2"]["trl"]["cpu_s"]["median"] > 0 and result["phase2"]["ratio_cpu_s"]["median"] > 0
    assert "| phase2 | swirl |" in proc.stdout


def test_vq_cache_times_sft_with_the_cache_off_and_on_and_phase1_rewards(tmp_path: Path) -> None:
    from swirl_vl.models.idm import VLMIDM
    from swirl_vl.models.token_fwm import TokenFWM

    TokenFWM(str(tmp_path / "models" / "fwm"), build_tiny=True)
    VLMIDM(str(tmp_path / "models" / "idm"), build_tiny="llava")
    out = tmp_path / "vq_cache.json"
    cmd = [sys.executable, "benchmarks/vq_cache.py", "--pool", "8", "--batch-size", "4", "--steps", "1"]
    cmd += ["--repeats", "1", "--rl-batch-size", "2", "--group-size", "2", "--models", str(tmp_path / "models")]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sft"]["cache_hits"] > 0 and result["sft"]["cpu_s_per_step_cache_off"]["median"] > 0
    assert result["phase1"]["rollouts"] == 4 and 1 <= result["phase1"]["distinct_rollouts"] <= 4
    assert "on/off" in proc.stdout and "distinct rollouts" in proc.stdout


def test_phase_times_runs_both_versions_side_by_side(tmp_path: Path) -> None:
    from swirl_vl.models.idm import VLMIDM
    from swirl_vl.models.token_fwm import TokenFWM

    TokenFWM(str(tmp_path / "sft" / "fwm"), build_tiny=True)
    VLMIDM(str(tmp_path / "sft" / "idm"), build_tiny="llava")
    out = tmp_path / "phase_times.json"
    cmd = [sys.executable, "benchmarks/phase_times.py", "--before", "HEAD", "--sft", str(tmp_path / "sft")]
    cmd += ["--data", str(tmp_path / "data"), "--repeats", "1", "--phase1-steps", "1", "--phase2-steps", "1"]
    cmd += ["--out", str(out), "--", *TINY_DATA, "--data.unlabelled_batch_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["runs"]["before"]) == len(result["runs"]["after"]) == 1
    for side in ("before", "after"):
        (run,) = result["runs"][side]
        assert set(run["seconds_per_step"]) == {"phase1", "phase2"} and run["cpu_s"] > 0
    assert result["ratios"]["phase1"]["median"] > 0 and "after / before" in proc.stdout
