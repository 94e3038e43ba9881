"""What a run shows a person: captioned grids, each stage's own scalars, skip counts, the stage on the progress bar,
and `test` logging into the run it tests. Functions only; the CLI's tiny fit (test_cli.py) checks the events."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from PIL import ImageFont
from tqdm import tqdm

from datamodules.shards import SKIP_REASONS
from datamodules.trajectory import SPLITS, TrajectoryDataModule, merge_rank_skips
from swirl_vl.cli import checkpoint_run
from swirl_vl.eval.report import skipped_line, skipped_scalars
from swirl_vl.training.images import action_grid, column_headers, fit_text, grouped_lines, transition_grid
from swirl_vl.training.progress import StageProgressBar, stage_progress, use_stage_progress_bar
from swirl_vl.training.schedule import SwirlSchedule, format_table
from swirl_vl.training.swirl import stage_metrics


def _images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def test_fit_text_cuts_long_text_to_its_width_with_an_ellipsis() -> None:
    font = ImageFont.load_default()
    assert fit_text("move the red square left", 500) == "move the red square left"
    cut = fit_text("paint the blue square yellow " * 10, 120)
    assert cut.endswith("…") and font.getlength(cut) <= 120 and cut.startswith("paint the")
    assert fit_text("two\nlines", 500) == "two lines"
    assert fit_text("é", 100) == "?"  # the default font has no glyph for it: a box would say less


def test_column_headers_name_x_the_samples_and_y() -> None:
    assert column_headers(1) == ["x", "ŷ", "y"]
    assert column_headers(3) == ["x", "ŷ_1", "ŷ_2", "ŷ_3", "y"]


def test_transition_grid_draws_headers_captions_and_sample_captions() -> None:
    x, ys, y = _images(2, 3, 32, 32), _images(2, 3, 3, 32, 32), _images(2, 3, 32, 32)
    plain = transition_grid(x, ys, y)
    rewards = [[f"reward -{i}.{j}" for j in range(3)] for i in range(2)]
    captioned = transition_grid(x, ys, y, ["move the red circle left " * 20, "paint"], rewards)
    assert captioned.shape[0] == 3 and 0 <= captioned.min() and captioned.max() <= 1
    assert captioned.shape[2] == plain.shape[2] == 2 + 5 * (128 + 2)  # 32-px images upscaled to 128
    line = (captioned.shape[1] - plain.shape[1]) // 2  # a caption line under each of the 2 rows of samples
    assert line > 0
    dark = captioned.min(0).values < 0.5  # (H, W): where text or image is drawn
    assert dark[2 : 2 + line, :128].any(), "a header names each column"
    assert dark[2 + line : 2 + 2 * line, :].any(), "the row's action is drawn above it"
    first_reward = dark[2 + 2 * line + 128 : 2 + 3 * line + 128, 130:258]
    assert first_reward.any(), "each sample's reward is drawn under it"
    assert not dark[2 + 2 * line + 128 : 2 + 3 * line + 128, :128].any(), "none under x"


def test_action_grid_lists_each_pairs_actions() -> None:
    x, y = _images(2, 3, 32, 32), _images(2, 3, 32, 32)
    groups = grouped_lines(["left", "right", "paint it " * 30, "add"], [-1.0, -0.5, -3.0, -2.0], 2)
    assert groups == [["-0.500: right", "-1.000: left"], ["-2.000: add", f"-3.000: {'paint it ' * 30}"]]
    grid = action_grid(x, y, groups)
    assert grid.shape[1] > 2 * 128 and grid.shape[2] == 2 + 2 * 130 + 3 * 128 + 2
    text = grid[:, :, 2 * 130 + 2 :]
    assert (text < 0.5).any()


def test_stage_metrics_keep_the_stages_own_values() -> None:
    shown = {"fwm/sft_loss": 1.0, "idm/sft_loss": 2.0, "phase1/reward_mean": -3.0, "phase2/reward_mean": -4.0}
    assert stage_metrics(shown, "sft") == {"fwm/sft_loss": 1.0, "idm/sft_loss": 2.0}
    assert stage_metrics(shown, "phase1") == {"phase1/reward_mean": -3.0}
    assert stage_metrics(shown, "phase2") == {"phase2/reward_mean": -4.0}


def test_stage_progress_reads_stage_iteration_and_steps() -> None:
    schedule = SwirlSchedule(sft_steps=30, iterations=2, phase1_steps=350, phase2_steps=50)
    assert stage_progress(schedule) == ("sft", 0, 30)
    schedule.stage, schedule.iteration, schedule.step_in_phase = "phase1", 0, 120
    assert stage_progress(schedule) == ("phase1 1/2", 120, 350)
    schedule.stage, schedule.iteration, schedule.step_in_phase = "phase2", 1, 7
    assert stage_progress(schedule) == ("phase2 2/2", 7, 50)


def test_the_stage_bar_restarts_per_stage_not_per_epoch_and_rates_a_resumed_stage_from_its_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    progress, trainer = StageProgressBar(), SimpleNamespace(lightning_module=None)
    monkeypatch.setattr(progress, "get_metrics", lambda *_: {})
    progress.train_progress_bar = tqdm(desc="Training", file=io.StringIO())  # as Lightning makes it
    bar = progress.train_progress_bar
    schedule = SwirlSchedule(sft_steps=300, iterations=2, phase1_steps=350, phase2_steps=50)
    monkeypatch.setattr(progress, "_schedule", lambda _: schedule)
    progress.on_train_epoch_start(trainer)
    started = bar.start_t
    schedule.step_in_phase = 64  # a Lightning epoch ends here; the next one starts inside the same stage
    progress.on_train_epoch_start(trainer)
    assert (bar.desc, bar.n, bar.total, bar.start_t, bar.initial) == ("sft: ", 64, 300, started, 0)
    # A fit resumed at step 120 of Phase I: the count starts there, and so does the rate.
    schedule.stage, schedule.step_in_phase = "phase1", 120
    progress._show_stage(trainer, schedule)
    assert (bar.desc, bar.n, bar.total, bar.initial) == ("phase1 1/2: ", 120, 350, 120)
    schedule.step_in_phase = 130
    progress._show_stage(trainer, schedule)
    elapsed = bar.format_dict["elapsed"]
    rate = bar.format_meter(**(bar.format_dict | {"elapsed": 2.0}))  # 10 steps in 2 s
    assert elapsed >= 0 and "5.00it/s" in rate, rate
    # Under DDP every rank but 0 holds a disabled bar, which tqdm makes without a description.
    progress.train_progress_bar = tqdm(disable=True)
    progress.on_train_epoch_start(trainer)


def test_the_default_progress_bar_becomes_the_stage_bar() -> None:
    trainer = Trainer(callbacks=[SwirlSchedule()], logger=False, enable_checkpointing=False)
    use_stage_progress_bar(trainer)
    assert isinstance(trainer.progress_bar_callback, StageProgressBar)
    quiet = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    use_stage_progress_bar(quiet)
    assert quiet.progress_bar_callback is None


def _skips(rank: int) -> torch.Tensor:
    counts = torch.zeros(len(SPLITS), len(SKIP_REASONS), dtype=torch.int64)
    counts[SPLITS.index("unlabelled"), SKIP_REASONS.index("bad_shard")] = 1 + rank
    counts[SPLITS.index("test"), SKIP_REASONS.index("bad_image")] = 4  # every rank decodes the test split whole
    return counts


def test_skip_counts_add_up_over_ranks_for_streams_only() -> None:
    merged = merge_rank_skips(torch.stack([_skips(0), _skips(1)]))
    assert merged[SPLITS.index("unlabelled"), SKIP_REASONS.index("bad_shard")] == 3
    assert merged[SPLITS.index("test"), SKIP_REASONS.index("bad_image")] == 4


def test_datamodule_gathers_its_skip_counts_where_the_trainer_is_distributed(tmp_path: Path) -> None:
    dm = TrajectoryDataModule(str(tmp_path))
    with pytest.warns(UserWarning, match="skipped"):
        dm._skipped["unlabelled"].record("bad_shard", "a.tar")
        dm._skipped["test"].record("bad_image", "b")
    assert dm.skipped_on_all_devices() == {"unlabelled": {"bad_shard": 1}, "test": {"bad_image": 1}}
    strategy = SimpleNamespace(root_device=torch.device("cpu"), all_gather=lambda t: torch.stack([t, t]))
    dm.trainer = SimpleNamespace(world_size=2, strategy=strategy)
    assert dm.skipped_on_all_devices() == {"unlabelled": {"bad_shard": 2}, "test": {"bad_image": 1}}


def test_skip_counts_as_scalars_and_a_log_line() -> None:
    skipped = {"labelled": {"bad_image": 2, "bad_json": 1}, "test": {"bad_image": 1}}
    assert skipped_scalars(skipped) == {
        "data/skipped/labelled/bad_image": 2.0,
        "data/skipped/labelled/bad_json": 1.0,
        "data/skipped/test/bad_image": 1.0,
    }
    assert skipped_line(skipped) == "skipped samples: labelled 3 (bad_image 2, bad_json 1); test 1 (bad_image 1)"


def test_boundary_table_leaves_out_the_skip_counts() -> None:
    rows = [{"after": "sft", "global_step": 8, "fwm_l1": 0.25, "skipped": {"test": {"bad_image": 1}}}]
    assert format_table(rows).splitlines()[0] == "| after | step | fwm_l1 |"


def _test_config(ckpt: Path, version: int | None = None) -> Namespace:
    logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir="runs", name="sprites", version=version),
    )
    return Namespace(ckpt_path=str(ckpt), trainer=Namespace(logger=logger))


def test_test_logs_into_the_run_whose_checkpoint_it_tests(tmp_path: Path) -> None:
    ckpt = tmp_path / "runs" / "mine" / "version_3" / "checkpoints" / "last.ckpt"
    assert checkpoint_run(_test_config(ckpt)) == {"save_dir": str(tmp_path / "runs"), "name": "mine", "version": 3}
    assert checkpoint_run(_test_config(ckpt, version=5)) is None  # a version the user chose stays
    assert checkpoint_run(_test_config(tmp_path / "elsewhere" / "model.ckpt")) is None
