"""The test report: per-task aggregation, multi-turn rollouts, and ``test`` writing test_metrics.json / .md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.trajectory import SpriteDataModule
from swirl_vl.eval.metrics import l1
from swirl_vl.eval.report import MetricTable, format_markdown, gather, write_report
from swirl_vl.eval.rollout import dealt_batches, rollout, rollout_trajectories
from swirl_vl.training.sft import FWMModule, IDMModule
from tests.sprite_oracles import OracleFWM, OracleIDM, sprite_batch, sprite_trajectories
from tests.test_cli import _run, _tensorboard_tags, _tiny_args, _version_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metric_table_sums_and_counts_per_task_and_skips_nan():
    table = MetricTable()
    table.add({"acc": torch.tensor([1.0, 0.0, 1.0]), "sens": torch.tensor([1.0, math.nan, 0.0])}, ["a", "b", "a"])
    table.add({"acc": torch.tensor([0.0])}, ["b"])  # batches of any size weigh by their examples
    means = table.means()
    assert list(means) == ["all", "a", "b"]
    assert means["all"] == {"acc": pytest.approx(2 / 4), "sens": pytest.approx(1 / 2)}
    assert means["a"] == {"acc": 1.0, "sens": 0.5}
    assert means["b"] == {"acc": 0.0}  # its only sensitivity value was NaN: no answer, no entry
    assert table.rows()[0] == {"task": "all", "pairs": 4, "acc": 0.5, "sens": 0.5}
    # Merging per-rank tables gives the table of all examples; outside DDP gather is the identity.
    left, right = MetricTable(), MetricTable()
    left.add({"acc": torch.tensor([1.0, 0.0, 1.0]), "sens": torch.tensor([1.0, math.nan, 0.0])}, ["a", "b", "a"])
    right.add({"acc": torch.tensor([0.0])}, ["b"])
    left.merge(MetricTable.from_state(right.state()))
    assert left.means() == means
    assert gather(table) is table
    with pytest.raises(ValueError, match="shape"):
        table.add({"acc": torch.tensor([1.0, 1.0])}, ["a"])


def test_markdown_has_a_column_per_task_and_turns_in_numeric_order(tmp_path: Path):
    table = MetricTable()
    for turn in (10, 2, 1):
        table.add({f"turn_{turn}/fwm_psnr": torch.tensor([float(turn)])}, ["move"])
    table.add({"fwm_l1": torch.tensor([0.5, 0.25])}, ["move", "paint"])
    md = format_markdown(table)
    lines = md.splitlines()
    assert lines[0] == "| metric | all | move | paint |"
    assert lines[2] == "| pairs | 2 | 1 | 1 |"
    assert [line.split(" | ")[0] for line in lines[3:]] == [
        "| fwm_l1",
        "| turn_1/fwm_psnr",
        "| turn_2/fwm_psnr",
        "| turn_10/fwm_psnr",
    ]
    assert lines[-1] == "| turn_10/fwm_psnr | 10.0000 | 10.0000 | – |"
    json_path, md_path = write_report(table, tmp_path, {"ckpt_path": "last.ckpt"})
    report = json.loads(json_path.read_text())
    assert report["ckpt_path"] == "last.ckpt" and [r["task"] for r in report["rows"]] == ["all", "move", "paint"]
    assert md_path.read_text() == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_metrics.json", "test_metrics.md"]  # no temp left


def test_rollout_feeds_the_models_own_predictions_back():
    trajs = sprite_trajectories(3, length=4, seed=0)
    fwm = OracleFWM()
    x0 = torch.stack([t.images[0] for t in trajs])
    predicted = rollout(fwm, x0, [t.actions for t in trajs])
    assert predicted.shape == (3, 3, 3, 32, 32)
    assert len(fwm.inputs) == 3
    for k in (1, 2):
        torch.testing.assert_close(fwm.inputs[k], predicted[:, k - 1])
    torch.testing.assert_close(predicted, torch.stack([t.images[1:] for t in trajs]))  # an oracle never drifts


def test_rollout_metrics_per_turn_with_the_task_of_each_step():
    trajs = sprite_trajectories(4, length=4, seed=1) + sprite_trajectories(2, length=3, seed=2)
    trajs[0].actions[1] = None  # an unknown action: this trajectory cannot be rolled out
    table = MetricTable()
    for metrics, tasks in rollout_trajectories(OracleFWM(), trajs, batch_size=2):
        table.add(metrics, tasks)
    means, counts = table.means(), table.counts["all"]
    assert counts["turn_1/fwm_state_acc"] == 5 and counts["turn_2/fwm_state_acc"] == 5
    assert counts["turn_3/fwm_state_acc"] == 3  # only the trajectories of 4 states have a third turn
    assert all(means["all"][f"turn_{k}/fwm_state_acc"] == 1.0 for k in (1, 2, 3))
    assert all(means["all"][f"turn_{k}/fwm_l1"] == 0.0 for k in (1, 2, 3))
    move_turns = sum(t.task_at(k) == "move" for t in trajs[1:] for k in range(len(t.actions)))
    assert sum(n for name, n in table.counts["move"].items() if name.endswith("/fwm_l1")) == move_turns


def test_processes_are_dealt_as_many_rollout_batches_of_as_many_turns_and_share_the_work():
    """Under FSDP2 every forward pass is a collective: each process must roll out as many batches, each of as many
    turns, even when it has no trajectory of its own left (it rolls out a repeat and drops it)."""
    trajs = sprite_trajectories(5, length=4, seed=1) + sprite_trajectories(1, length=3, seed=2)
    dealt = [list(dealt_batches(trajs, batch_size=2, rank=r, world=2)) for r in (0, 1)]
    turns = [[len(batch[0].actions) for batch, _ in d] for d in dealt]
    assert turns[0] == turns[1] == [2, 3, 3]  # batches of 4 states over two processes: (3) | (4, 4, 4, 4) | (4)
    own = [t for d in dealt for batch, n in d for t in batch[:n]]
    assert sorted(map(id, own)) == sorted(map(id, trajs))  # each trajectory once, on one process
    assert [[n for _, n in d] for d in dealt] == [[1, 2, 1], [0, 2, 0]]  # process 1 twice rolls out a repeat
    table = MetricTable()
    for rank in (0, 1):
        for metrics, tasks in rollout_trajectories(OracleFWM(), trajs, batch_size=2, rank=rank, world=2):
            table.add(metrics, tasks)
    assert table.counts["all"]["turn_1/fwm_state_acc"] == 6 and table.counts["all"]["turn_3/fwm_state_acc"] == 5


class _Identity(OracleFWM):
    """Predicts no change at all."""

    def sample(self, x, z, num_samples=1, greedy=False, **gen):
        rollout = super().sample(x, z)
        rollout.images = x.clone()
        return rollout


def test_rollout_of_a_model_that_predicts_no_change():
    trajs = sprite_trajectories(2, length=3, seed=3)
    (turn_1, _), (turn_2, _) = list(rollout_trajectories(_Identity(), trajs, batch_size=8))
    assert turn_1["turn_1/fwm_state_acc"].eq(0).all() and turn_2["turn_2/fwm_state_acc"].eq(0).all()
    first, second = (torch.stack([t.images[k] for t in trajs]) for k in (0, 2))
    torch.testing.assert_close(turn_2["turn_2/fwm_l1"], l1(first, second))  # turn 2 is still the first state


@pytest.fixture(scope="module")
def oracle_data(tmp_path_factory: pytest.TempPathFactory) -> SpriteDataModule:
    root = tmp_path_factory.mktemp("oracle_sprites")
    kwargs = {"labelled_trajectories": 2, "unlabelled_trajectories": 2, "val_trajectories": 2, "batch_size": 2}
    data = SpriteDataModule(str(root), test_trajectories=6, eval_batch_size=4, **kwargs)
    data.prepare_data()
    return data


def _test_alone(module, data: SpriteDataModule, tmp_path: Path) -> tuple[dict, dict]:
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path), name="alone"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    (logged,) = trainer.test(module, datamodule=data, verbose=False)
    return logged, json.loads((Path(trainer.log_dir) / "test_metrics.json").read_text())


def test_fwm_module_alone_reports_per_task_and_per_turn(oracle_data: SpriteDataModule, tmp_path: Path):
    logged, report = _test_alone(
        FWMModule(OracleFWM(), log_images=0, max_rollout_trajectories=4), oracle_data, tmp_path
    )
    overall = report["rows"][0]
    assert overall["task"] == "all" and overall["pairs"] == 6 * 5  # 6 test trajectories of 6 states
    assert overall["fwm_state_acc"] == overall["fwm_action_sensitivity"] == 1.0
    assert report["counts"]["all"]["turn_5/fwm_state_acc"] == 4  # capped at max_rollout_trajectories
    assert all(overall[f"turn_{k}/fwm_state_acc"] == 1.0 for k in range(1, 6))
    assert {r["task"] for r in report["rows"][1:]} <= {"move", "paint", "remove", "add"}
    assert logged["test/fwm_state_acc"] == 1.0 and logged["test/turn_5/fwm_l1"] == 0.0
    _, report = _test_alone(FWMModule(OracleFWM(), log_images=0, max_rollout_trajectories=0), oracle_data, tmp_path)
    assert not any(name.startswith("turn_") for name in report["rows"][0])
    with pytest.raises(ValueError, match="max_rollout_trajectories"):
        FWMModule(OracleFWM(), max_rollout_trajectories=-1)


def test_idm_module_alone_reports_sensitivity_and_text_metrics(oracle_data: SpriteDataModule, tmp_path: Path):
    logged, report = _test_alone(IDMModule(OracleIDM(), log_images=0), oracle_data, tmp_path)
    overall = report["rows"][0]
    assert overall["idm_action_acc"] == overall["idm_image_sensitivity"] == 1.0
    assert 0 < overall["idm_bleu"] <= 1 and 0 < overall["idm_rouge_l"] <= 1
    assert not any(name.startswith("turn_") for name in overall)  # an IDM has no rollouts
    assert logged["test/idm_action_acc"] == 1.0


def test_cli_test_writes_per_task_and_per_turn_report(tmp_path: Path, sprite_root: Path):  # noqa: F811
    proc = _run(["test", *_tiny_args(tmp_path, sprite_root)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = _version_dir(tmp_path)
    report = json.loads((run / "test_metrics.json").read_text())
    rows = {row["task"]: row for row in report["rows"]}
    assert set(rows) - {"all"} and set(rows) - {"all"} <= {"move", "paint", "remove", "add"}
    expected = {
        "fwm_l1",
        "fwm_psnr",
        "fwm_ssim",
        "fwm_state_acc",
        "fwm_action_sensitivity",
        "idm_exact",
        "idm_bleu",
        "idm_rouge_l",
        "idm_action_acc",
        "idm_image_sensitivity",
        "cycle_l1",
    }
    assert expected | {f"turn_{k}/fwm_state_acc" for k in range(1, 6)} <= set(rows["all"])
    assert rows["all"]["pairs"] == 2 * 5  # --data.test_trajectories 2, of 6 states
    assert report["counts"]["all"]["turn_5/fwm_psnr"] == 2
    md = (run / "test_metrics.md").read_text()
    assert md.startswith("| metric | all |") and "| turn_5/fwm_psnr |" in md
    scalars = _tensorboard_tags(run)["scalars"]
    assert "test/cycle_l1" in scalars and "test/turn_3/fwm_psnr" in scalars
    task = sorted(set(rows) - {"all"})[0]
    assert f"test/tasks/{task}/fwm_l1" in scalars


class _SeesOnlyTargets(OracleIDM):
    """An oracle IDM that records the pairs it is shown and refuses an unknown next state."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = 0

    def sample(self, x, y, num_samples=1, greedy=False, **gen):
        assert torch.isfinite(y).all(), "the IDM was shown a pair without a next state"
        self.shown += len(x)
        return super().sample(x, y, num_samples, greedy, **gen)

    def log_likelihood(self, x, y, z):
        assert torch.isfinite(y).all(), "the IDM scored a pair without a next state"
        return super().log_likelihood(x, y, z)


def test_pairs_without_a_next_state_get_the_target_free_metrics_and_nan_for_the_rest():
    from swirl_vl.eval.evaluate import evaluate_cycle, evaluate_fwm, evaluate_idm

    batch = sprite_batch(4, seed=5)
    batch["has_target"] = torch.tensor([True, False, True, False])
    batch["y"][~batch["has_target"]] = float("nan")  # as collate_pairs fills an unknown y
    batch["task"] = ["move", "clevr", "move", "clevr"]
    fwm, idm = OracleFWM(), _SeesOnlyTargets()
    fwm_metrics, y_hat = evaluate_fwm(fwm, batch)
    torch.testing.assert_close(fwm_metrics["fwm_change_l1"], l1(y_hat, batch["x"]))  # every pair: ŷ against x
    assert fwm_metrics["fwm_change_l1"][1] > 0  # the oracle acted the action out on the target-free pair too
    for name in ("fwm_l1", "fwm_psnr", "fwm_ssim"):
        assert fwm_metrics[name][[1, 3]].isnan().all() and fwm_metrics[name][[0, 2]].isfinite().all(), name
    assert fwm_metrics["fwm_l1"][[0, 2]].eq(0).all()  # an oracle's edit is the target
    idm_metrics, texts = evaluate_idm(idm, batch)
    assert idm.shown == 2 and texts[1] == texts[3] == "" and texts[0] == batch["action"][0]
    assert idm_metrics["idm_exact"].tolist()[::2] == [1.0, 1.0] and idm_metrics["idm_exact"][1::2].isnan().all()
    cycle = evaluate_cycle(fwm, batch, texts)["cycle_l1"]
    assert cycle[[1, 3]].isnan().all() and cycle[[0, 2]].eq(0).all()
    test_only = FWMModule(fwm, log_images=0).test_only_metrics(batch)
    test_only |= IDMModule(idm, log_images=0).test_only_metrics(batch)
    for values in test_only.values():
        assert values[[1, 3]].isnan().all()
    torch.testing.assert_close(test_only["true_change_l1"][[0, 2]], l1(batch["y"], batch["x"])[[0, 2]])
    table = MetricTable()
    table.add({**fwm_metrics, **idm_metrics, "cycle_l1": cycle, **test_only}, batch["task"])
    means = table.means()
    assert set(means["clevr"]) == {"fwm_change_l1"}  # a target-free task reports what needs no target
    assert table.counts["all"]["fwm_change_l1"] == 4 and table.counts["all"]["fwm_l1"] == 2
    # Every pair without a target: the IDM is never asked, and nothing it would have said is reported.
    blank = {**batch, "has_target": torch.zeros(4, dtype=torch.bool), "y": torch.full_like(batch["y"], float("nan"))}
    assert evaluate_idm(idm, blank) == ({}, [""] * 4) and idm.shown == 2
    assert set(evaluate_fwm(fwm, blank)[0]) == {"fwm_change_l1"}
