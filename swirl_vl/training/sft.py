"""Supervised warm start: ``FWMModule`` and ``IDMModule``, each a LightningModule usable alone.

``SwirlModule`` composes the two and reuses their ``sft_loss``, ``make_optimizer``, ``evaluate`` and test metrics.
``test`` adds costly metrics to the cheap per-batch ones (action / image sensitivity, multi-turn rollouts),
aggregates everything per task and writes ``test_metrics.json`` / ``.md`` under the run's log directory.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from swirl_vl.eval.evaluate import evaluate_fwm, evaluate_idm, on_target_rows, target_rows
from swirl_vl.eval.judge import Judge
from swirl_vl.eval.metrics import l1
from swirl_vl.eval.report import ALL, MetricTable, data_skipped, gather, write_report
from swirl_vl.eval.rollout import rollout_trajectories
from swirl_vl.eval.sensitivity import fwm_action_sensitivity, idm_image_sensitivity
from swirl_vl.models.base import ForwardWorldModel, InverseDynamicsModel
from swirl_vl.training.images import log_texts, log_transitions


def labelled_pairs(batch: dict) -> dict:
    """The labelled pair batch, whether the DataModule gave one loader or a ``{split: batch}`` dict."""
    return batch["labelled"] if "labelled" in batch else batch


def finish_test_report(module: LightningModule, table: MetricTable) -> None:
    """End of ``test``: merge the ranks' tables, log ``test/<metric>`` (overall) and ``test/tasks/<task>/<metric>``,
    and write ``test_metrics.json`` / ``test_metrics.md`` to the log directory (rank 0). Every rank must call it."""
    table = gather(table)
    means = table.means()
    for name, value in means.get(ALL, {}).items():
        # Identical on every rank after the gather; sync_dist only keeps Lightning's epoch-end reduction uniform.
        module.log(f"test/{name}", value, batch_size=1, sync_dist=True)
    per_task = {f"test/tasks/{t}/{n}": v for t, m in means.items() if t != ALL for n, v in m.items()}
    if per_task and module.global_rank == 0:
        # Straight to the loggers: a console results table with a row per task and metric would bury the rest.
        for logger in module.loggers:
            logger.log_metrics(per_task, step=module.trainer.fit_loop.epoch_loop._batches_that_stepped)
    trainer = module.trainer
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    skipped = data_skipped(trainer)  # a collective too
    if module.global_rank == 0 and log_dir is not None and means:
        # Not the global step: `test` does not restore it from the checkpoint; the checkpoint names the weights.
        extra = {"ckpt_path": trainer.ckpt_path, "skipped": skipped}
        json_path, _ = write_report(table, log_dir, extra)
        rank_zero_info(f"[swirl] test metrics per task written to {json_path} and {json_path.with_suffix('.md')}")


def log_means(module: LightningModule, stage: str, metrics: dict[str, Tensor]) -> None:
    """Log each per-example metric's mean over its answered examples (NaN: no answer) as ``<stage>/<name>``."""
    for name, values in metrics.items():
        answered = values[~values.isnan()]
        if answered.numel():
            module.log(f"{stage}/{name}", answered.mean(), batch_size=answered.numel(), sync_dist=True)


def _adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class _WorldModelModule(LightningModule):
    """What FWM and IDM modules share: optimiser, SFT step, evaluation and its logging."""

    prefix: str

    def __init__(self, optimizer: OptimizerCallable, log_images: int) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.log_images = log_images

    def sft_loss(self, batch: dict) -> Tensor:
        raise NotImplementedError

    def evaluate(self, batch: dict) -> tuple[dict[str, Tensor], object]:
        """Per-example metrics ``{name: (B,)}`` and the model's greedy outputs."""
        raise NotImplementedError

    def test_only_metrics(self, batch: dict) -> dict[str, Tensor]:
        """Per-example metrics ``{name: (B,)}`` too costly for every validation; ``test`` adds them."""
        raise NotImplementedError

    def make_optimizer(self, params: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
        """The optimiser over ``params`` (default: the model's trainable parameters)."""
        return self.optimizer(params if params is not None else [p for p in self.model.parameters() if p.requires_grad])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer()

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pairs = labelled_pairs(batch)
        loss = self.sft_loss(pairs)
        self.log(f"{self.prefix}/sft_loss", loss, prog_bar=True, batch_size=len(pairs["action"]))
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        metrics, outputs = self.evaluate(batch)
        if stage == "test":  # aggregated per task and logged in on_test_epoch_end
            self.test_table.add({**metrics, **self.test_only_metrics(batch)}, batch["task"])
        else:
            log_means(self, stage, metrics)
        if batch_idx == 0 and self.log_images:
            self.log_outputs(batch, outputs, f"{stage}/{self.prefix}", self.global_step)

    @override
    def on_test_epoch_start(self) -> None:
        self.test_table = MetricTable()

    @override
    def on_test_epoch_end(self) -> None:
        finish_test_report(self, self.test_table)

    def log_outputs(self, batch: dict, outputs: object, tag: str, step: int) -> None:
        raise NotImplementedError


class FWMModule(_WorldModelModule):
    """Trains the forward world model ``P_θ(y | x, z)`` on labelled pairs."""

    prefix = "fwm"

    def __init__(
        self,
        model: ForwardWorldModel,
        optimizer: OptimizerCallable = _adamw,
        log_images: int = 8,
        max_rollout_trajectories: int | None = 64,
        judge: Judge | None = None,
    ) -> None:
        """
        Args:
            model: the FWM backend (``TokenFWM`` or ``DiffusionFWM``), injected by ``class_path``.
            optimizer: optimiser factory for the FWM's trainable parameters.
            log_images: rows of ``x | ŷ | y`` written to TensorBoard per evaluation (0: none).
            max_rollout_trajectories: test trajectories (the first ones, over all devices) that ``test`` rolls out
                multi-turn for the ``turn_k/…`` metrics (None: all; 0: no rollouts).
            judge: VLM-as-judge (e.g. ``swirl_vl.eval.judge.VLMJudge``) that ``test`` asks about each greedy edit:
                ``judge_score`` = min(``judge_success``, ``judge_over_edit``), 0–10; None: no judge.
        """
        if max_rollout_trajectories is not None and max_rollout_trajectories < 0:
            raise ValueError(
                "max_rollout_trajectories (--model.init_args.fwm.init_args.max_rollout_trajectories under SwirlModule) "
                f"must be ≥ 0 or null; got {max_rollout_trajectories}"
            )
        super().__init__(optimizer, log_images)
        self.save_hyperparameters(ignore=["model", "optimizer", "judge"])
        self.model = model
        self.max_rollout_trajectories = max_rollout_trajectories
        self.judge = judge  # not an nn.Module: its weights stay out of checkpoints

    @override
    def sft_loss(self, batch: dict) -> Tensor:
        return self.model.sft_loss(batch["x"], batch["action"], batch["y"])

    @override
    def evaluate(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        return evaluate_fwm(self.model, batch)

    @override
    def test_only_metrics(self, batch: dict) -> dict[str, Tensor]:
        def with_targets(pairs: dict) -> dict[str, Tensor]:
            return {
                "fwm_action_sensitivity": fwm_action_sensitivity(self.model, pairs["x"], pairs["action"], pairs["y"]),
                "true_change_l1": l1(pairs["y"].float(), pairs["x"].float()),  # beside fwm_change_l1: ŷ against x
            }

        metrics = on_target_rows(batch, with_targets)
        if self.judge is not None:
            # Greedy sampling is deterministic: this is the edit evaluate() scored, sampled again.
            y_hat = self.model.sample(batch["x"], batch["action"], num_samples=1, greedy=True).images
            judged = self.judge(batch["x"], list(batch["action"]), y_hat).metrics()
            metrics |= {name: values.to(y_hat.device) for name, values in judged.items()}
        return metrics

    def add_rollouts(self, table: MetricTable, trainer: Trainer) -> None:
        """Multi-turn rollouts of this rank's share of the first ``max_rollout_trajectories`` test trajectories,
        added to ``table`` as ``turn_k/…``; a no-op for DataModules without whole trajectories."""
        datamodule = trainer.datamodule
        if self.max_rollout_trajectories == 0 or not hasattr(datamodule, "trajectories"):
            return
        trajectories = datamodule.trajectories("test")[: self.max_rollout_trajectories]
        batch_size = getattr(datamodule, "eval_batch_size", 16)
        share = (trainer.global_rank, trainer.world_size)
        for metrics, tasks in rollout_trajectories(self.model, trajectories, batch_size, self.device, *share):
            table.add(metrics, tasks)

    @override
    def on_test_epoch_end(self) -> None:
        self.add_rollouts(self.test_table, self.trainer)
        super().on_test_epoch_end()

    @override
    def log_outputs(self, batch: dict, outputs: Tensor, tag: str, step: int) -> None:
        k = self.log_images
        y = batch["y"][:k].nan_to_num(0.5)  # an unknown next state shows as a grey tile
        log_transitions(self.logger, tag, batch["x"][:k], outputs[:k, None], y, list(batch["action"][:k]), step)


class IDMModule(_WorldModelModule):
    """Trains the inverse dynamics model ``Q_φ(z | x, y)`` on labelled pairs."""

    prefix = "idm"

    def __init__(self, model: InverseDynamicsModel, optimizer: OptimizerCallable = _adamw, log_images: int = 8) -> None:
        """
        Args:
            model: the IDM backend (``VLMIDM``), injected by ``class_path``.
            optimizer: optimiser factory for the IDM's trainable parameters.
            log_images: sampled actions written to TensorBoard as text per evaluation (0: none).
        """
        super().__init__(optimizer, log_images)
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model

    @override
    def sft_loss(self, batch: dict) -> Tensor:
        return self.model.sft_loss(batch["x"], batch["y"], batch["action"])

    @override
    def evaluate(self, batch: dict) -> tuple[dict[str, Tensor], list[str]]:
        return evaluate_idm(self.model, batch)

    @override
    def test_only_metrics(self, batch: dict) -> dict[str, Tensor]:
        def sensitivity(pairs: dict) -> dict[str, Tensor]:
            return {"idm_image_sensitivity": idm_image_sensitivity(self.model, pairs["x"], pairs["y"], pairs["action"])}

        return on_target_rows(batch, sensitivity)

    @override
    def log_outputs(self, batch: dict, outputs: list[str], tag: str, step: int) -> None:
        seen = target_rows(batch).tolist()
        lines = [
            f"predicted: `{p}` — true: `{t}`" if has else f"(no next state to read) — true: `{t}`"
            for p, t, has in zip(outputs, batch["action"], seen)
        ][: self.log_images]
        log_texts(self.logger, tag, lines, step)
