"""``StageProgressBar``: fit's bar counts the steps of the SWIRL stage it is in (``phase1 1/2: … 120/350``), not
Lightning's epochs, which the schedule cuts through (``Epoch 0/-2`` with ``max_epochs: -1``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from swirl_vl.training.schedule import DONE, SwirlSchedule
from swirl_vl.training.swirl import SwirlModule, stage_metrics


def stage_progress(schedule: SwirlSchedule) -> tuple[str, int, int]:
    """``(description, steps done, steps)`` of the schedule's current stage, e.g. ``("phase1 1/2", 120, 350)``."""
    if schedule.stage == DONE:
        return "done", 0, 0
    steps = {"sft": schedule.sft_steps, "phase1": schedule.phase1_steps, "phase2": schedule.phase2_steps}
    name = (
        schedule.stage
        if schedule.stage == "sft"
        else f"{schedule.stage} {schedule.iteration + 1}/{schedule.iterations}"
    )
    return name, schedule.step_in_phase, steps[schedule.stage]


class StageProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, in fit of a ``SwirlModule``: the stage, and its steps done out of its length; only the
    current stage's values beside it. Other modules get Lightning's bar as it is."""

    def _schedule(self, trainer: Trainer) -> SwirlSchedule | None:
        if not isinstance(trainer.lightning_module, SwirlModule):
            return None
        return next((c for c in trainer.callbacks if isinstance(c, SwirlSchedule)), None)

    def _show_stage(self, trainer: Trainer, schedule: SwirlSchedule) -> None:
        """Point the bar at the schedule's stage and step. A new stage (or a new bar) restarts its count, rate and
        time left; Lightning's epochs, which run through a stage, do not."""
        bar = self.train_progress_bar
        if bar.disable:  # every rank but 0 holds a disabled bar, which has no description to compare
            return
        description, done, total = stage_progress(schedule)
        new_stage = bar.desc.rstrip(": ") != description
        if new_stage:
            bar.set_description(description, refresh=False)
            bar.reset(total=total)
            # A stage entered part-way (a resumed fit): its rate counts the steps made from here, not the ones before.
            bar.initial = min(done, total)
        bar.n = min(done, total)
        if new_stage or done % self.refresh_rate == 0 or done == total:
            bar.set_postfix(self.get_metrics(trainer, trainer.lightning_module))  # and refresh

    @override
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        schedule = self._schedule(trainer)
        if schedule is None:
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self._show_stage(trainer, schedule)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        schedule = self._schedule(trainer)
        if schedule is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_stage(trainer, schedule)

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._schedule(trainer) is None or trainer.state.fn != TrainerFn.FITTING:
            return metrics
        # Lightning shows every value it was ever given; the stage's own are the ones still current.
        kept = {k: v for k, v in metrics.items() if "/" not in k}  # Lightning's own (v_num)
        return kept | stage_metrics(metrics, pl_module.stage)


def use_stage_progress_bar(trainer: Trainer) -> None:
    """Put a ``StageProgressBar`` in place of Lightning's default bar (tqdm or rich); a bar the user chose stays."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (TQDMProgressBar, RichProgressBar):
            bar: Callback = StageProgressBar(
                refresh_rate=getattr(callback, "refresh_rate", 1), leave=getattr(callback, "_leave", False)
            )
            trainer.callbacks[i] = bar
            return
