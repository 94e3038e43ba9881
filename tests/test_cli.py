"""The README's CLI paths on CPU with tiny models: fit (SFT → Phase I → Phase II), test, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from swirl_vl.cli import main

REPO = Path(__file__).resolve().parents[1]


def _tiny_args(tmp: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "sprites.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--trainer.val_check_interval",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.callbacks",
        json.dumps(
            [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 2},
                }
            ]
        ),
        "--model.init_args.fwm.init_args.model.init_args.path",
        str(tmp / "models" / "fwm"),
        "--model.init_args.idm.init_args.model.init_args.path",
        str(tmp / "models" / "idm"),
        "--model.init_args.fwm_group_size",
        "2",
        "--model.init_args.idm_group_size",
        "2",
        "--model.init_args.rl_batch_size",
        "2",
        "--model.init_args.min_label_logprob",
        "-100",
        "--model.init_args.log_rollouts_every_n_steps",
        "1",
        "--data.root",
        str(data_root),
        "--data.batch_size",
        "4",
        "--data.eval_batch_size",
        "8",
        "--data.labelled_trajectories",
        "8",
        "--data.unlabelled_trajectories",
        "16",
        "--data.val_trajectories",
        "4",
        "--data.test_trajectories",
        "2",
        "--schedule.eval_max_batches",
        "1",
        *extra,
    ]


def fit_tiny_schedule(tmp_path: Path, config: str, *extra: str, phase2_steps: int = 1) -> Path:
    """``configs/<config>`` through ``fit`` in this process (the CLI's ~8 s of imports paid once per test worker) on
    a tiny schedule: 2 SFT steps, one iteration of 2 Phase I and ``phase2_steps`` Phase II steps, then ``extra``
    arguments. Checks the stages ran in that order; returns the run folder."""
    from swirl_vl.cli import main

    args = _tiny_args(tmp_path, tmp_path / "data", "--schedule.sft_steps", "2", "--schedule.iterations", "1")
    args[1] = str(REPO / "configs" / config)
    args += ["--schedule.phase1_steps", "2", "--schedule.phase2_steps", str(phase2_steps), *extra]
    main(["fit", *args])
    run = next((tmp_path / "runs" / Path(config).stem).glob("version_*"))
    phases = json.loads((run / "swirl_phases.json").read_text())
    assert [p["stage"] for p in phases] == ["sft", "phase1", "phase2"]
    return run


def _run(args: list[str], timeout: float = 300, threads: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:  # DDP ranks on 2 cores: one thread each, or they spin waiting on each other
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        [sys.executable, "-m", "swirl_vl", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _version_dir(tmp: Path) -> Path:
    versions = sorted((tmp / "runs" / "sprites").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1]


def _tensorboard_tags(run_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


def _scalar_values(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_fit_sft_then_swirl_writes_events_images_checkpoint_and_table(tmp_path, sprite_root):
    args = _tiny_args(
        tmp_path,
        sprite_root,
        "--schedule.sft_steps",
        "4",
        "--schedule.iterations",
        "1",
        "--schedule.phase1_steps",
        "2",
        "--schedule.phase2_steps",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        "--model.init_args.sft_warmup_steps",
        "2",
        "--model.init_args.fwm_rl_lr",
        "3e-5",
        "--model.init_args.idm_rl_lr",
        "2e-5",
        "--model.init_args.rl_lr_schedule",
        "cosine",
        "--model.init_args.idm_generation",
        '{"temperature": 1.5}',
    )
    proc = _run(["fit", *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = _version_dir(tmp_path)
    assert yaml.safe_load((run / "hparams.yaml").read_text())["idm_generation"] == {"temperature": 1.5}
    assert "pre-optimization state" not in proc.stderr  # Lightning's manual-optimisation checkpoint warning
    # SFT (the config's wsd): warm-up to the configured 1e-3, held, down to 5% at the last SFT step; each phase:
    # cosine from its rate (fwm_rl_lr, idm_rl_lr) down to 5% at its last step.
    assert _scalar_values(run, "lr/fwm")[:6] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-5, 3e-5, 1.5e-6])
    assert _scalar_values(run, "lr/idm")[-3:] == pytest.approx([2e-5, 1.05e-5, 1e-6])
    # Fit ends at global step 13 (4 SFT steps × 2 optimisers + 2 + 3), between ModelCheckpoint's every-2-step saves;
    # last.ckpt still holds the end.
    final = _checkpoint_state(run / "checkpoints" / "last.ckpt")
    assert (final["stage"], final["global_step"]) == ("done", 13)
    tags = _tensorboard_tags(run)
    assert any(t.startswith("val/fwm") for t in tags["images"]), tags["images"]
    assert any(t.startswith("phase1/rollouts") for t in tags["images"]), tags["images"]
    for scalar in (
        "fwm/sft_loss",
        "idm/sft_loss",
        "phase1/reward_mean",
        "phase1/kl",
        "phase1/clip_frac",
        "phase1/frac_zero_std",
        "phase1/labels_kept",
        "phase2/reward_mean",
        "phase2/reward_std",
    ):
        assert scalar in tags["scalars"], (scalar, tags["scalars"])
    # Each scalar at the steps of the stage that makes it (Lightning would write the last SFT loss again at every
    # later log step), and the stage itself at every step: 4 SFT steps, 2 of Phase I, 3 of Phase II.
    assert len(_scalar_values(run, "fwm/sft_loss")) == 4
    assert len(_scalar_values(run, "phase1/reward_mean")) == 2
    assert _scalar_values(run, "stage") == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert "schedule/fwm_state_acc" in tags["scalars"]
    assert "phase2/sampled_actions" in tags["images"]
    assert "phase1 1/1" in proc.stdout and "phase2 1/1" in proc.stdout  # the progress bar names the stage
    table = json.loads((run / "swirl_metrics.json").read_text())
    assert [row["after"] for row in table] == ["sft", "iteration_1"]
    assert all(row["skipped"] == {} for row in table)
    assert {"fwm_state_acc", "idm_action_acc", "fwm_psnr", "fwm_ssim", "fwm_l1"} <= set(table[0])
    assert (run / "pretrained" / "sft" / "fwm" / "config.json").exists()
    assert (run / "pretrained" / "iteration_1_phase2" / "idm" / "config.json").exists()

    # `test` on the checkpoint reports the headline metrics.
    proc = _run(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "test/fwm_state_acc" in proc.stdout and "test/idm_action_acc" in proc.stdout
    # ... into the run it tests, beside fit's config, not in a new version_N.
    assert _version_dir(tmp_path) == run and (run / "test_config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["ckpt_path"] is None
    assert json.loads((run / "test_metrics.json").read_text())["skipped"] == {}
    assert "test/fwm_state_acc" in _tensorboard_tags(run)["scalars"]
    # ... at the training step the checkpoint was written at, beside the run's last training scalars (not step 0).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    last_train_step = max(e.step for e in events.Scalars("stage"))
    assert [e.step for e in events.Scalars("test/fwm_state_acc")] == [last_train_step + 1]


def _checkpoint_state(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "SwirlSchedule" in k]
    return {**state, "global_step": ckpt["global_step"]}


def test_sigkill_mid_phase_resumes_in_same_phase_and_step(tmp_path, sprite_root):
    args = _tiny_args(
        tmp_path,
        sprite_root,
        "--schedule.sft_steps",
        "2",
        "--schedule.iterations",
        "1",
        "--schedule.phase1_steps",
        "400",
        "--schedule.phase2_steps",
        "2",
        "--schedule.eval_at_boundaries",
        "false",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "swirl_vl", "fit", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list((tmp_path / "runs").glob("sprites/version_*/checkpoints/last.ckpt"))
            if found:
                try:
                    state = _checkpoint_state(found[0])
                except Exception:  # being written; the rename makes it appear whole, but be patient
                    state = None
                if state and state["stage"] == "phase1" and state["step_in_phase"] >= 4:
                    ckpt = found[0]
                    break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt is not None, "no mid-phase checkpoint appeared"
    saved = _checkpoint_state(ckpt)
    resumed = _run(["fit", *args, "--schedule.phase1_steps", str(saved["step_in_phase"] + 2), "--ckpt_path", str(ckpt)])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    out = resumed.stdout + resumed.stderr
    assert f"[swirl] resuming in phase1 (iteration 0) at step {saved['step_in_phase']}" in out, out[-3000:]
    final = _checkpoint_state(_version_dir(tmp_path) / "checkpoints" / "last.ckpt")
    assert final["stage"] == "done"
    assert final["global_step"] > saved["global_step"]


@pytest.mark.parametrize("config", ["sprites.yaml", "sprites_shared_lora.yaml"])
def test_lora_phases_train_adapters_on_a_frozen_sft_base(tmp_path, sprite_root, config):
    args = _tiny_args(tmp_path, sprite_root, "--schedule.sft_steps", "2", "--schedule.iterations", "1")
    args[1] = str(REPO / "configs" / config)
    args += ["--schedule.phase1_steps", "2", "--schedule.phase2_steps", "2", "--model.init_args.lora.r", "4"]
    args += ["--trainer.logger.init_args.name", "sprites"]
    if config == "sprites_shared_lora.yaml":
        args += ["--model.init_args.idm.init_args.model.init_args.path", str(tmp_path / "models" / "fwm")]
    main(["fit", *args])  # in this process: the CLI's start-up is paid once per test worker
    run = _version_dir(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert not any(k.startswith(("fwm_ref.", "idm_ref.")) for k in state), "LoRA needs no reference copy"
    for adapter in ("fwm", "idm"):
        lora_b = [v for k, v in state.items() if k.endswith(f"lora_B.{adapter}.weight")]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b), f"the {adapter} adapter did not train"
    # The merged FWM after Phase I differs from the SFT one, which the frozen base still equals.
    from safetensors.torch import load_file

    initial = load_file(tmp_path / "models" / "fwm" / "model.safetensors")
    sft = load_file(run / "pretrained" / "sft" / "fwm" / "model.safetensors")
    assert any(not torch.equal(initial[k], sft[k]) for k in sft), "SFT must train the base, adapters frozen"
    phase1 = load_file(run / "pretrained" / "iteration_1_phase1" / "fwm" / "model.safetensors")
    assert sft.keys() == phase1.keys()
    assert any(not torch.equal(sft[k], phase1[k]) for k in sft)
    base = {
        k.split("peft.base_model.model.")[-1].replace(".base_layer", ""): v
        for k, v in state.items()
        if k.startswith("fwm.model.lm.peft.")
    }
    assert base.keys() >= sft.keys() and all(torch.equal(base[k], sft[k]) for k in sft)
    main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])


def test_sft_fwm_steps_stops_the_fwm_while_the_idm_trains_on(tmp_path, sprite_root):
    from safetensors.torch import load_file

    args = _tiny_args(tmp_path, sprite_root, "--schedule.sft_steps", "2", "--schedule.iterations", "0")
    proc = _run(["fit", *args, "--model.init_args.sft_fwm_steps", "0", "--schedule.eval_at_boundaries", "false"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    sft = _version_dir(tmp_path) / "pretrained" / "sft"
    for name, trained in (("fwm", False), ("idm", True)):
        before = load_file(tmp_path / "models" / name / "model.safetensors")
        after = load_file(sft / name / "model.safetensors")
        assert any(not torch.equal(before[k], after[k]) for k in before) == trained, name


@pytest.mark.parametrize(
    "variant",
    [
        ["--model.init_args.lora.r", "4", "--model.init_args.fwm.init_args.model.init_args.guidance_scale", "2.0"],
        ["--model.init_args.fwm_objective", "swirl_vl.training.objectives.ForwardProcess"],
    ],
    ids=["grpo-guided-lora", "forward-process"],
)
def test_diffusion_phase1_variants_train_the_unet(tmp_path, sprite_root, variant):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    args = _tiny_args(tmp_path, sprite_root, "--schedule.sft_steps", "2", "--schedule.iterations", "1")
    args[1] = str(REPO / "configs" / "sprites_diffusion.yaml")
    args += ["--schedule.phase1_steps", "2", "--schedule.phase2_steps", "1", "--trainer.logger.init_args.name"]
    args += ["sprites", "--data.labelled_trajectories", "8", *variant]
    main(["fit", *args])  # in this process: the CLI's start-up is paid once per test worker
    run = _version_dir(tmp_path)
    sft = load_file(run / "pretrained" / "sft" / "fwm" / "unet" / "diffusion_pytorch_model.safetensors")
    phase1_dir = run / "pretrained" / "iteration_1_phase1" / "fwm" / "unet"
    phase1 = load_file(phase1_dir / "diffusion_pytorch_model.safetensors")
    assert sft.keys() == phase1.keys() and any(not torch.equal(sft[k], phase1[k]) for k in sft)
    UNet2DConditionModel.from_pretrained(phase1_dir)  # a plain diffusers UNet (LoRA merged)
    assert _scalar_values(run, "phase1/kl") and _scalar_values(run, "phase1/reward_mean")


def _cli_error(args: list[str]) -> str:
    """The message the CLI exits with, run in this process (these errors come before any model loads)."""
    from swirl_vl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return str(exit_info.value.code)


def test_yaml_syntax_error_names_the_file_the_line_and_the_fix(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n   devices: 1\n")
    message = _cli_error(["fit", "--config", str(config)])
    assert f"--config {config} is not valid YAML at line 3" in message, message
    assert "   devices: 1" in message and "Fix: correct that line" in message, message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "corrupt"])
def test_unreadable_checkpoint_is_named_with_the_fix_before_any_model_loads(tmp_path, damage):
    import zipfile

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, ckpt)
    data = bytearray(ckpt.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a checkpoint\n" * 100)
    else:  # bytes of the tensor's record changed: torch.load would return the changed weights without a word
        with zipfile.ZipFile(ckpt) as archive:
            record = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + 100
        data[start : start + 8] = b"\xff" * 8
    ckpt.write_bytes(bytes(data))
    message = _cli_error(["test", *_tiny_args(tmp_path, tmp_path / "data"), "--ckpt_path", str(ckpt)])
    expected = {"truncated": "is cut short", "garbage": "is not a checkpoint", "corrupt": "is damaged: record"}
    assert f"--ckpt_path {ckpt} {expected[damage]}" in message, message
    assert "Fix: pass a checkpoint that fit wrote whole" in message and "weights_only" not in message, message
    assert not (tmp_path / "models").exists(), "a model was built before the checkpoint was checked"
