"""FSDP2 on several CPU processes (gloo): a resume in the middle of Phase I, then ``test`` and ``predict``."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _checkpoint_state, _run, _tiny_args, _version_dir


def test_fsdp2_resumes_mid_phase_then_tests_and_predicts_on_two_processes(tmp_path, sprite_root):
    """FSDP2 over 2 processes: a fit stopped in the middle of Phase I resumes there, holding every weight, KL
    reference and AdamW moment its checkpoint holds (which leaves the references out); ``test`` on 2 processes
    counts every test pair once and gives the metrics a 1-process ``test`` of the same checkpoint gives; ``predict`` on 2 processes writes each test
    pair once, with a rollout that only one process has."""
    fsdp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "fsdp2"]
    schedule = ["--schedule.sft_steps", "2", "--schedule.iterations", "1", "--schedule.phase1_steps", "3"]
    args = _tiny_args(tmp_path, sprite_root, *schedule, "--schedule.phase2_steps", "1")
    # Global steps: 2 per SFT step (two optimisers), then 1 per RL step: step 6 is Phase I after 2 of its 3 steps.
    stopped = _run(["fit", *args, *fsdp, "--trainer.max_steps", "6"], timeout=400, threads=1)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-5000:]
    ckpt = _version_dir(tmp_path) / "checkpoints" / "last.ckpt"
    saved = _checkpoint_state(ckpt)
    assert (saved["stage"], saved["step_in_phase"]) == ("phase1", 2)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    probe = ["--trainer.callbacks+=tests.ddp_probe.RestoredState", f"--trainer.callbacks.out_dir={tmp_path / 'probe'}"]
    resumed = _run(["fit", *args, *fsdp, "--ckpt_path", str(ckpt), *probe], timeout=400, threads=1)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-8000:]
    assert "[swirl] resuming in phase1 (iteration 0) at step 2" in out, out[-3000:]
    run = _version_dir(tmp_path)
    assert _checkpoint_state(run / "checkpoints" / "last.ckpt")["stage"] == "done"

    restored = torch.load(tmp_path / "probe" / "restored.pt", map_location="cpu", weights_only=False)
    weights = restored["weights"]
    for k, v in checkpoint["state_dict"].items():
        assert torch.equal(weights[k], v), k
    assert not any(k.startswith(("fwm_ref.", "idm_ref.")) for k in checkpoint["state_dict"])
    for which, file in checkpoint["swirl_reference_files"].items():  # the SFT model, from its file
        reference = torch.load(file, map_location="cpu", weights_only=True)
        assert reference and all(torch.equal(weights[f"{which}_ref.{k}"], v) for k, v in reference.items()), which
    sft = torch.load(checkpoint["swirl_reference_files"]["fwm"], map_location="cpu", weights_only=True)
    assert any(not torch.equal(weights[f"fwm.model.{k}"], v) for k, v in sft.items())  # Phase I has moved the FWM
    moments = 0
    for mine, theirs in zip(restored["optimizers"], checkpoint["optimizer_states"], strict=True):
        # The checkpoint numbers the parameters in the optimiser's order; the gathered state names them.
        names = {
            i: n for a, b in zip(theirs["param_groups"], mine["param_groups"]) for i, n in zip(a["params"], b["params"])
        }
        # A parameter that never had a gradient (LLaVA's unused vision post-norm) has no saved state: zero moments.
        unsaved = set(mine["state"]) - {names[i] for i in theirs["state"]}
        assert all(not mine["state"][n]["exp_avg"].any() for n in unsaved), unsaved
        for i, state in theirs["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(mine["state"][names[i]][key]), torch.as_tensor(value)), (i, key)
            moments += int(state["exp_avg"].abs().sum() > 0)
    assert moments > 0

    final = run / "checkpoints" / "last.ckpt"
    metrics = {}
    for name, devices in (("two", fsdp), ("one", ["--trainer.devices", "1"])):
        tested = _run(["test", *args, *devices, "--ckpt_path", str(final)], timeout=300, threads=1)
        assert tested.returncode == 0, name + tested.stdout[-3000:] + tested.stderr[-5000:]
        metrics[name] = json.loads((run / "test_metrics.json").read_text())
    counts = metrics["two"]["counts"]["all"]  # each rank saw half the pairs; the gathered report has them all
    assert counts["fwm_l1"] == counts["idm_bleu"] == counts["cycle_l1"] == 2 * 5
    assert counts["turn_1/fwm_l1"] == counts["turn_5/fwm_state_acc"] == 2
    assert sum(c["fwm_l1"] for task, c in metrics["two"]["counts"].items() if task != "all") == 10
    two, one = _leaves(metrics["two"]), _leaves(metrics["one"])
    assert two.keys() == one.keys() and len(one) > 20
    close = {k: pytest.approx(v, rel=1e-5, abs=1e-6) if isinstance(v, float) else v for k, v in one.items()}
    # The sensitivity metrics set each pair against the next pair in its batch (its action, its next state): other
    # batches, other counterfactuals, when the split is dealt to two processes.
    apart = {k: (two[k], one[k]) for k in one if two[k] != close[k] and not k.endswith("_sensitivity")}
    assert not apart, apart

    predictions = ["--ckpt_path", str(final), "--predictions.rollout_trajectories", "1"]
    predicted = _run(["predict", *args, *fsdp, *predictions], timeout=300, threads=1)
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-5000:]
    (folder,) = (tmp_path / "runs" / "sprites").glob("version_*/predictions")
    rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert sorted(row["index"] for row in rows) == list(range(len(rows))) and len(rows) == 10  # 2 trajectories × 5
    assert len((folder / "rollouts.jsonl").read_text().splitlines()) == 5


def _leaves(tree, path: str = "") -> dict:
    """``{"a/0/b": value}`` for every leaf of nested dicts and lists."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{path}/{i}").items()}
    return {path: tree}
