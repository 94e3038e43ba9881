"""``predict`` through the real CLI, and what a short and a resumed fit leave behind, from one tiny fit and its resume.

The fit (2 SFT steps, then Phase I for 3 and Phase II for 1) keeps a checkpoint every 2 global steps; the resume
starts from the one in the middle of Phase I. ``predict`` then runs on the resumed run's ``last.ckpt`` (a subprocess,
as a user runs it) and on its ``save_pretrained`` folders (in this process, to spare a second start-up).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import _checkpoint_state, _run, _tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = {"sft": 2, "phase1": 3, "phase2": 1}
TEST_TRAJECTORIES, TEST_PAIRS_EACH = 2, 5  # _tiny_args: 2 test trajectories of the sprite DataModule's 6 states


def _args(tmp: Path, data_root: Path) -> list[str]:
    callbacks = [
        # every_n_train_steps beyond the run: the callback saves nothing before fit ends (a short run)
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1000},
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp / "steps"), "save_top_k": -1, "every_n_train_steps": 2},
        },
    ]
    return _tiny_args(
        tmp,
        data_root,
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--trainer.limit_val_batches",
        "0",
        "--schedule.eval_at_boundaries",
        "false",
        "--schedule.sft_steps",
        str(SCHEDULE["sft"]),
        "--schedule.iterations",
        "1",
        "--schedule.phase1_steps",
        str(SCHEDULE["phase1"]),
        "--schedule.phase2_steps",
        str(SCHEDULE["phase2"]),
    )


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("predict")
    args = _args(tmp, tmp / "data")
    proc = _run(["fit", *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    first = tmp / "runs" / "sprites" / "version_0"
    # Global steps: 2 per SFT step (two optimisers), then 1 per RL step: step 6 is Phase I after 2 of its 3 steps.
    middle = tmp / "steps" / "epoch=0-step=6.ckpt"
    # What an export killed midway leaves: its temporary folder, named after a process that is gone.
    stale = first / "pretrained" / "sft" / f".fwm.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    resumed = _run(["fit", *args, "--ckpt_path", str(middle)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    return {
        "tmp": tmp,
        "args": args,
        "first": first,
        "middle": middle,
        "stale": stale,
        "second": tmp / "runs" / "sprites" / "version_1",
        "resume_log": resumed.stdout + resumed.stderr,
    }


def test_short_and_resumed_fits_end_with_one_last_checkpoint(runs):
    for run in (runs["first"], runs["second"]):
        assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt"], run
        assert _checkpoint_state(run / "checkpoints" / "last.ckpt")["stage"] == "done"


def test_resumed_run_holds_every_export_its_phase_stats_and_no_stale_folder(runs):
    assert _checkpoint_state(runs["middle"])["stage"] == "phase1"
    assert "[swirl] resuming in phase1 (iteration 0) at step 2" in runs["resume_log"]
    first, second = runs["first"] / "pretrained", runs["second"] / "pretrained"
    exports = {"sft": ("fwm", "idm"), "iteration_1_phase1": ("fwm",), "iteration_1_phase2": ("idm",)}
    for tag, names in exports.items():
        assert sorted(p.name for p in (second / tag).iterdir()) == sorted(names), tag
        for name in names:
            assert (second / tag / name / "config.json").is_file(), (tag, name)
    # Exported before the resume: the same files, linked rather than copied.
    assert (second / "sft" / "fwm" / "model.safetensors").samefile(first / "sft" / "fwm" / "model.safetensors")
    assert not runs["stale"].exists()
    phases = json.loads((runs["second"] / "swirl_phases.json").read_text())
    assert [(p["stage"], p["steps"]) for p in phases] == list(SCHEDULE.items())
    assert all(p["seconds_per_step"] > 0 for p in phases)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (32, 32), (path, image.mode, image.size)
        return np.asarray(image)


def _uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [0, 1] → ``(N, H, W, 3)`` uint8, as a PNG holds it."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def predicted(runs) -> Path:
    """``predict`` on the resumed run's last.ckpt, into its default folder, with one rollout."""
    ckpt = runs["second"] / "checkpoints" / "last.ckpt"
    proc = _run(["predict", *runs["args"], "--ckpt_path", str(ckpt), "--predictions.rollout_trajectories", "1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out,) = (runs["tmp"] / "runs" / "sprites").glob("version_*/predictions")
    return out


@pytest.fixture(scope="module")
def from_folders(runs) -> tuple[Path, object]:
    """``predict`` on the resumed run's save_pretrained folders, no checkpoint, no rollouts, no sheet; in this process
    (the subprocesses above cover the CLI's own start), so that its FWM serves the checks below."""
    from swirl_vl.cli import main

    pretrained = runs["second"] / "pretrained"
    out = runs["tmp"] / "from_folders"
    args = [
        "--model.init_args.fwm.init_args.model.init_args.path",
        str(pretrained / "iteration_1_phase1" / "fwm"),
        "--model.init_args.idm.init_args.model.init_args.path",
        str(pretrained / "iteration_1_phase2" / "idm"),
        "--predictions.output_dir",
        str(out),
        "--predictions.rollout_trajectories",
        "0",
        "--predictions.sheet_rows",
        "0",
    ]
    return out, main(["predict", *runs["args"], *args])


def test_predict_writes_the_greedy_next_state_and_action_of_every_pair(runs, predicted, from_folders):
    from datamodules.trajectory import TrajectoryDataModule
    from swirl_vl.eval.rollout import rollout

    rows = [json.loads(line) for line in (predicted / "index.jsonl").read_text().splitlines()]
    data = TrajectoryDataModule(root=str(runs["tmp"] / "data"))
    pairs = data.pairs("test")
    assert len(rows) == len(pairs) == TEST_TRAJECTORIES * TEST_PAIRS_EACH
    assert [r["key"] for r in rows] == [p["key"] for p in pairs]
    assert [r["action"] for r in rows] == [p["action"] for p in pairs]
    assert all(r["idm_action"] and {"fwm_psnr", "idm_exact", "fwm_state_acc"} <= r.keys() for r in rows)
    written = np.stack([_png(predicted / r["y_hat"]) for r in rows])
    # The FWM the checkpoint holds is the one exported after Phase I (Phase II trains the IDM alone), here loaded from
    # that folder; predict batches the pairs 8 at a time (--data.eval_batch_size), and so does this.
    fwm = from_folders[1].model.fwm.model.eval()
    x = torch.stack([p["x"] for p in pairs])
    actions = [p["action"] for p in pairs]
    with torch.no_grad():
        greedy = torch.cat([fwm.sample(x[i : i + 8], actions[i : i + 8], greedy=True).images for i in (0, 8)])
    np.testing.assert_array_equal(written, _uint8(greedy))

    turns = [json.loads(line) for line in (predicted / "rollouts.jsonl").read_text().splitlines()]
    (trajectory,) = data.trajectories("test")[:1]
    assert [(t["key"], t["turn"], t["action"]) for t in turns] == [
        (trajectory.key, k + 1, a) for k, a in enumerate(trajectory.actions)
    ]
    expected = rollout(fwm, trajectory.images[:1], [trajectory.actions])[0]
    np.testing.assert_array_equal(np.stack([_png(predicted / t["image"]) for t in turns]), _uint8(expected))

    sheet = (predicted / "sheet.html").read_text()
    assert all(r["key"] in sheet for r in rows)
    # x, ŷ and y per pair; then the rollout's 6 true states and 5 predicted ones
    assert sheet.count("data:image/png;base64,") == 3 * len(rows) + 6 + 5


def test_predict_from_save_pretrained_folders_without_a_checkpoint(predicted, from_folders):
    out = from_folders[0]
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    from_ckpt = [json.loads(line) for line in (predicted / "index.jsonl").read_text().splitlines()]
    # The same models: the same images, actions and metrics (up to float error: the CLI's process runs other threads).
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in rows] == [
        {k: v for k, v in r.items() if not isinstance(v, float)} for r in from_ckpt
    ]
    for row, other in zip(rows, from_ckpt):
        floats = [k for k, v in row.items() if isinstance(v, float)]
        assert [row[k] for k in floats] == pytest.approx([other[k] for k in floats], rel=1e-4, abs=1e-5)
    for row in rows:
        np.testing.assert_array_equal(_png(out / row["y_hat"]), _png(predicted / row["y_hat"]))
    assert not (out / "rollouts.jsonl").exists() and not (out / "sheet.html").exists()


def test_predict_writer_rejects_negative_settings():
    from swirl_vl.predict import PredictionWriter

    with pytest.raises(ValueError, match="--predictions.rollout_trajectories"):
        PredictionWriter(rollout_trajectories=-1)
    with pytest.raises(ValueError, match="--predictions.sheet_rows"):
        PredictionWriter(sheet_rows=-1)
