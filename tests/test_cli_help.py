"""What a first run shows: ``--help`` that points at the SWIRL arguments, settings refused before any model loads,
a line per stage and no library noise."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from swirl_vl.cli import main
from swirl_vl.training.schedule import SwirlSchedule
from tests.test_cli import REPO, _run, _tiny_args


def _exit(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[str, str]:
    """The CLI's exit message and what it printed, run in this process (parsing only: nothing here loads a model)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    printed = capsys.readouterr().out if capsys is not None else ""
    return str(exit_info.value.code), printed


def test_help_names_the_program_and_where_the_swirl_arguments_are(capsys):
    code, printed = _exit(["--help"], capsys)
    assert code == "0"
    assert printed.startswith("usage: swirl_vl "), printed[:200]
    text = " ".join(printed.split())  # the description is wrapped to the terminal
    assert "SWIRL (self-improving world modelling with latent actions)" in text
    assert "swirl_vl fit --model.help swirl_vl.training.SwirlModule" in text


def test_fit_help_heads_every_group_in_words_and_has_no_optimizer_flags(capsys):
    code, printed = _exit(["fit", "--help"], capsys)
    assert code == "0"
    assert printed.startswith("usage: swirl_vl [options] fit "), printed[:200]
    headers = [line for line in printed.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert not [h for h in headers if "<class" in h], headers
    assert "The SWIRL schedule: SFT, then rounds of Phase I (the FWM trains) and Phase II (the IDM trains):" in headers
    assert any("--model.help swirl_vl.training.SwirlModule" in h for h in headers), headers
    assert "--optimizer" not in printed and "--lr_scheduler" not in printed


def test_schedule_defaults_are_the_sprite_configs():
    schedule = yaml.safe_load((REPO / "configs" / "sprites.yaml").read_text())["schedule"]
    defaults = {name: p.default for name, p in inspect.signature(SwirlSchedule).parameters.items()}
    assert {name: defaults[name] for name in schedule} == schedule


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["--model.init_args.fwm_group_size", "1"], "--model.init_args.fwm_group_size must be ≥ 2"),
        (["--model.init_args.rl_batch_size", "0"], "--model.init_args.rl_batch_size must be ≥ 1"),
        (["--model.init_args.sft_warmup_steps", "-1"], "--model.init_args.sft_warmup_steps must be ≥ 0"),
        (["--schedule.phase1_steps", "-3"], "--schedule.phase1_steps must be ≥ 0; got -3"),
        (["--schedule.eval_max_batches", "0"], "--schedule.eval_max_batches must be ≥ 1"),
        (["--data.batch_size", "0"], "--data.init_args.batch_size must be ≥ 1; got 0"),
        (
            ["--data.pairs_per_epoch", "3", "--data.unlabelled_batch_size", "2"],
            "--data.init_args.pairs_per_epoch must be ≥ --data.init_args.batch_size (4)",
        ),
        (["--data.unlabelled_batch_size", "0"], "--data.init_args.unlabelled_batch_size must be ≥ 1; got 0"),
    ],
    ids=[
        "group-size-1",
        "rl-batch-0",
        "negative-warmup",
        "negative-phase",
        "eval-batches-0",
        "batch-0",
        "epoch",
        "unlabelled-batch-0",
    ],
)
def test_a_setting_no_run_can_use_is_named_in_one_line_before_any_model_loads(tmp_path, setting, message):
    code, _ = _exit(["fit", *_tiny_args(tmp_path, tmp_path / "data"), *setting])
    assert code.startswith(f"swirl_vl fit: {message}") and "\n" not in code, code
    assert not (tmp_path / "models").exists(), "a model was built before the settings were checked"


@pytest.mark.parametrize(
    ("given", "flag"),
    [
        (["--optimizer", "AdamW"], "--optimizer"),
        (["--lr_scheduler.class_path", "StepLR"], "--lr_scheduler"),
        (["--config", "OPTIMIZER_YAML"], "optimizer (in --config"),
    ],
    ids=["optimizer", "lr_scheduler", "in-a-config"],
)
def test_lightnings_optimizer_and_lr_scheduler_are_refused_naming_the_modules_own(tmp_path, given, flag):
    config = tmp_path / "optimizer.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args:\n    lr: 0.1\n")
    given = [str(config) if arg == "OPTIMIZER_YAML" else arg for arg in given]
    code, _ = _exit(["fit", *_tiny_args(tmp_path, tmp_path / "data"), *given])
    assert code.startswith(f"swirl_vl: {flag}") and "is not taken" in code and "\n" not in code, code
    assert "--model.init_args.fwm.init_args.optimizer" in code and "--model.init_args.rl_lr_schedule" in code
    assert not (tmp_path / "models").exists()


def test_fit_prints_each_stage_warns_when_phase1_keeps_no_label_and_mutes_library_noise(tmp_path: Path):
    args = _tiny_args(
        tmp_path,
        tmp_path / "data",
        *("--schedule.sft_steps", "1", "--schedule.iterations", "1"),
        *("--schedule.phase1_steps", "2", "--schedule.phase2_steps", "1"),
        *("--schedule.eval_at_boundaries", "false", "--schedule.export_pretrained", "false"),
        # A mean token log-prob is never above 0: every label is filtered out.
        *("--model.init_args.min_label_logprob", "1"),
    )
    proc = _run(["fit", *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout + proc.stderr
    stages = [line for line in out.splitlines() if re.fullmatch(r"\[swirl\] (sft|phase\d).*, \d+ steps?", line)]
    assert stages == [
        "[swirl] sft, 1 step",
        "[swirl] phase1, iteration 1/1, 2 steps",
        "[swirl] phase2, iteration 1/1, 1 step",
    ]
    assert "[swirl] phase1 step 1 kept no pseudo-label" in out and "--model.init_args.min_label_logprob (1.0)" in out
    assert "[swirl] phase1, iteration 1: 2 of 2 steps kept no pseudo-label" in out
    assert out.count("kept no pseudo-label") == 2, out[-3000:]
    for noise in ("litlogger", "in eval mode at the start", "has `__len__` defined", "LeafSpec", "`weights_only`"):
        assert noise not in out, noise


def test_configs_come_with_the_package_and_fit_without_one_runs_the_embedded_default(tmp_path, monkeypatch, capsys):
    """From a folder without ``configs/`` (as after a plain ``pip install``): ``configs/NAME.yaml`` is read from the
    package, and a run subcommand without ``--config`` gets ``configs/sprites.yaml``. In this process, from that
    folder (a subprocess per case took ~15 s, nearly all of it imports)."""
    monkeypatch.chdir(tmp_path)
    code, named = _exit(["fit", "--config", "configs/sprites_liquid.yaml", "--print_config"], capsys)
    assert code == "0" and "swirl_vl.models.liquid.LiquidFWM" in named
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    default = capsys.readouterr()
    assert str(exit_info.value.code) == "0"
    assert "embedded default" in default.err and "swirl_vl.models.token_fwm.TokenFWM" in default.out
    assert not any(tmp_path.iterdir()), "printing a config writes nothing"


def test_a_token_fwm_folder_or_vq_path_that_is_not_there_is_one_line_each_before_anything_loads(tmp_path):
    fwm = "--model.init_args.fwm.init_args.model.init_args."
    missing = [fwm + "path", str(tmp_path / "nothing"), fwm + "build_tiny", "false", fwm + "vq_path", "org/sprite-vq"]
    code, _ = _exit(["fit", *_tiny_args(tmp_path, tmp_path / "data"), *missing])
    lines = code.splitlines()
    assert "Traceback" not in code and len(lines) <= 6, code
    assert sum(f"token-model checkpoint not found at '{tmp_path / 'nothing'}'" in line for line in lines) == 1, code
    # A Hub id is never looked up (nothing is downloaded at run time): it is named as not being a local folder.
    assert sum("image tokenizer not found at vq_path 'org/sprite-vq'" in line for line in lines) == 1, code
    assert not (tmp_path / "models").exists() and not (tmp_path / "data").exists(), "nothing may load or be written"
