"""``SwirlSchedule``: owns ``(stage, iteration, step_in_phase)`` and switches phases at their boundaries.

The schedule is SFT for ``sft_steps`` batches, then ``iterations`` rounds of Phase I (FWM trains,
``phase1_steps``) and Phase II (IDM trains, ``phase2_steps``). Its state lives in checkpoints, so a
run killed mid-phase resumes in the same phase at the same step, and resuming into a longer schedule
continues it. At the end of SFT and of each iteration it evaluates both models on the test split; the
table is printed at the end of fit and written to ``<log_dir>/swirl_metrics.json``, each row with the samples the
DataModule skipped so far (``skipped``: by split and reason, over every device).

A resumed run logs to a new folder (Lightning's next ``version_N``); the schedule makes it complete: its
``pretrained/`` also holds the folders exported before the resume (hard links, no copy of the weights), and
``swirl_phases.json`` counts a phase's steps and time on both sides of the resume. Folders an export killed midway
left behind (``.<name>.tmp-<pid>``) are removed at the next start.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from swirl_vl.eval.report import data_skipped, skipped_line, skipped_scalars
from swirl_vl.training.fsdp import full_weights
from swirl_vl.training.swirl import TRAINS, SwirlModule

DONE = "done"


class SwirlSchedule(Callback):
    """The SWIRL schedule: SFT, then rounds of Phase I (the FWM trains) and Phase II (the IDM trains).

    Evaluates both models on the test split after SFT and after each round."""

    def __init__(
        self,
        sft_steps: int = 1800,
        iterations: int = 2,
        phase1_steps: int = 350,
        phase2_steps: int = 50,
        eval_at_boundaries: bool = True,
        eval_max_batches: int | None = None,
        export_pretrained: bool = True,
    ) -> None:
        """
        Args:
            sft_steps: supervised warm-start batches (both models train on each).
            iterations: SWIRL rounds, each Phase I then Phase II (0: SFT only).
            phase1_steps: GRPO steps of Phase I (FWM trains, IDM frozen) per iteration.
            phase2_steps: GRPO steps of Phase II (IDM trains, FWM frozen) per iteration.
            eval_at_boundaries: evaluate on the test split after SFT and after each iteration.
            eval_max_batches: cap on test batches per boundary evaluation (None: the whole split).
            export_pretrained: write ``save_pretrained`` folders of the models at each phase end.
        """
        if problems := self.problems(sft_steps, iterations, phase1_steps, phase2_steps, eval_max_batches):
            raise ValueError("; ".join(problems))
        self.sft_steps, self.iterations = sft_steps, iterations
        self.phase1_steps, self.phase2_steps = phase1_steps, phase2_steps
        self.eval_at_boundaries, self.eval_max_batches = eval_at_boundaries, eval_max_batches
        self.export_pretrained = export_pretrained
        self.stage, self.iteration, self.step_in_phase = "sft", 0, 0
        self.history: list[dict[str, Any]] = []
        self.phase_stats: list[dict[str, Any]] = []
        self._resumed = False
        self._started = False  # the stage entered in this fit
        self._phase_started: float | None = None
        self._phase_steps_timed = 0
        self._phase_seconds_before = 0.0  # timed in this phase before the current process (resumed runs)
        self.pretrained_dir: Path | None = None  # where this run exports; from the checkpoint: the previous run's
        self._steps_without_labels = 0  # Phase I steps of the current phase that kept no pseudo-label

    @staticmethod
    def problems(
        sft_steps: int, iterations: int, phase1_steps: int, phase2_steps: int, eval_max_batches: int | None = None
    ) -> list[str]:
        """What no schedule can run with, each naming its flag (the CLI asks before any model loads)."""
        found = [
            f"--schedule.{name} must be ≥ 0; got {value}"
            for name, value in (
                ("sft_steps", sft_steps),
                ("iterations", iterations),
                ("phase1_steps", phase1_steps),
                ("phase2_steps", phase2_steps),
            )
            if value < 0
        ]
        if eval_max_batches is not None and eval_max_batches < 1:
            found.append(
                "--schedule.eval_max_batches must be ≥ 1 (null: the whole test split; no evaluations: "
                f"--schedule.eval_at_boundaries false); got {eval_max_batches}"
            )
        return found

    def _steps(self, stage: str) -> int:
        return {"sft": self.sft_steps, "phase1": self.phase1_steps, "phase2": self.phase2_steps}[stage]

    def _next(self, stage: str, iteration: int) -> tuple[str, int]:
        if stage == "sft":
            return ("phase1", 0) if self.iterations > 0 else (DONE, 0)
        if stage == "phase1":
            return "phase2", iteration
        return ("phase1", iteration + 1) if iteration + 1 < self.iterations else (DONE, iteration + 1)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, SwirlModule):
            return  # other LightningModules (e.g. the VQ tokenizer) train without phases
        self._started = False
        # A strategy that loads a checkpoint after its setup (FSDP2's ModelParallelStrategy) restores this callback's
        # state after this hook: the stage to enter is known at train start.
        if trainer.strategy.restore_checkpoint_after_setup:
            return
        self._start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(pl_module, SwirlModule) and not self._started:
            self._start(trainer, pl_module)

    def _start(self, trainer: Trainer, pl_module: SwirlModule) -> None:
        self._started = True
        if self.stage == DONE and self.iteration < self.iterations:  # resumed into a longer schedule
            self.stage, self.step_in_phase = "phase1", 0
        if self._resumed:
            rank_zero_info(
                f"[swirl] resuming in {self.stage} (iteration {self.iteration}) at step {self.step_in_phase}"
            )
        self._adopt_pretrained(trainer)
        self._enter(pl_module, refresh_reference=not self._resumed, starting=self.step_in_phase == 0)
        self._skip_empty_phases(trainer, pl_module)

    def _enter(self, module: SwirlModule, refresh_reference: bool, starting: bool) -> None:
        steps = 0 if self.stage == DONE else self._steps(self.stage)
        if starting and steps > 0:
            where = "" if self.stage == "sft" else f", iteration {self.iteration + 1}/{self.iterations}"
            rank_zero_info(f"[swirl] {self.stage}{where}, {steps} step{'s' if steps != 1 else ''}")
        if self.stage != DONE:
            module.enter_stage(self.stage, self.iteration, refresh_reference, self._steps(self.stage), starting)
            if refresh_reference is False and self.stage != "sft":
                which = "fwm" if self.stage == "phase1" else "idm"
                if getattr(module, f"{which}_ref") is None:
                    module.refresh_reference(which)
        module.step_in_phase = self.step_in_phase

    def _skip_empty_phases(self, trainer: Trainer, module: SwirlModule) -> None:
        while self.stage != DONE and self.step_in_phase >= self._steps(self.stage):
            self._finish_phase(trainer, module)
        if self.stage == DONE:
            trainer.should_stop = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(pl_module, SwirlModule) or self.stage == DONE:
            return
        if self.stage == "phase1" and trainer.callback_metrics.get("phase1/labels_kept", 1.0) == 0:
            self._steps_without_labels += 1
            if self._steps_without_labels == 1:
                rank_zero_warn(
                    f"[swirl] phase1 step {self.step_in_phase + 1} kept no pseudo-label, so it did not train the FWM: "
                    "every greedy IDM label of the batch has a mean token log-prob below "
                    f"--model.init_args.min_label_logprob ({pl_module.hparams.min_label_logprob}); lower it, or give "
                    "the IDM more SFT (--schedule.sft_steps)"
                )
        self.step_in_phase += 1
        self._phase_steps_timed += 1
        pl_module.step_in_phase = self.step_in_phase
        self._skip_empty_phases(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> int:
        if isinstance(pl_module, SwirlModule) and self.stage == DONE:
            trainer.should_stop = True
            return -1  # Lightning: skip the rest of the epoch
        if self._phase_started is None:
            self._phase_started = time.perf_counter()
        return 0

    def _finish_phase(self, trainer: Trainer, module: SwirlModule) -> None:
        finished, iteration = self.stage, self.iteration
        module.leave_stage()
        if self._steps_without_labels:
            rank_zero_warn(
                f"[swirl] phase1, iteration {iteration + 1}: {self._steps_without_labels} of {self._steps(finished)} "
                "steps kept no pseudo-label and did not train the FWM"
            )
            self._steps_without_labels = 0
        if self._phase_steps_timed:
            seconds = self._phase_seconds()
            self.phase_stats.append(
                {
                    "stage": finished,
                    "iteration": iteration,
                    "steps": self._phase_steps_timed,
                    "seconds_per_step": seconds / self._phase_steps_timed,
                    # ru_maxrss is in KiB on Linux: the process's peak so far, not this phase's alone.
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
            if module.device.type == "cuda":  # this phase's own peak on the GPU (the counter restarts per phase)
                self.phase_stats[-1]["peak_cuda_mib"] = torch.cuda.max_memory_allocated(module.device) / 2**20
                torch.cuda.reset_peak_memory_stats(module.device)
        self._phase_started, self._phase_steps_timed, self._phase_seconds_before = None, 0, 0.0
        if self.export_pretrained and self._steps(finished) > 0:
            self._export(trainer, module, finished, iteration)
        self.stage, self.iteration = self._next(finished, iteration)
        self.step_in_phase = 0
        at_boundary = finished == "sft" or (finished == "phase2") or (finished == "phase1" and self.phase2_steps == 0)
        if self.eval_at_boundaries and at_boundary and self._steps(finished) > 0:
            label = "sft" if finished == "sft" else f"iteration_{iteration + 1}"
            self._evaluate(trainer, module, label)
        refresh = module.hparams.reference == "iteration" or (finished == "sft")
        self._enter(module, refresh_reference=refresh, starting=True)

    def _evaluate(self, trainer: Trainer, module: SwirlModule, label: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "test_dataloader"):
            return
        if hasattr(datamodule, "setup"):
            datamodule.setup("test")
        metrics = module.evaluate_loader(datamodule.test_dataloader(), self.eval_max_batches)
        skipped = data_skipped(trainer)
        self.history.append({"after": label, "global_step": trainer.global_step, **metrics, "skipped": skipped})
        log_scalars(trainer, {f"schedule/{name}": value for name, value in metrics.items()} | skipped_scalars(skipped))
        rank_zero_info(f"[swirl] test after {label}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    @staticmethod
    def _report_skipped(trainer: Trainer) -> None:
        """The samples skipped so far, over every device: to the loggers, and a line in the log when there are any."""
        skipped = data_skipped(trainer)  # a collective under DDP: every rank must ask
        log_scalars(trainer, skipped_scalars(skipped))
        if skipped:
            rank_zero_info(f"[swirl] {skipped_line(skipped)} (the first few of each reason were warned about)")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report_skipped(trainer)

    def _phase_seconds(self) -> float:
        """Seconds timed in the current phase so far, in this process and (resumed) the ones before it."""
        running = 0.0 if self._phase_started is None else time.perf_counter() - self._phase_started
        return self._phase_seconds_before + running

    def _adopt_pretrained(self, trainer: Trainer) -> None:
        """Export to this run's ``pretrained/``; when resumed from a run that logged elsewhere, first link the folders
        that run exported into it. Either way, remove what exports killed midway left in both."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        previous, self.pretrained_dir = self.pretrained_dir, None if log_dir is None else Path(log_dir) / "pretrained"
        if trainer.global_rank != 0:
            return
        for folder in {previous, self.pretrained_dir} - {None}:
            remove_stale_exports(folder)
        if previous is None or self.pretrained_dir is None or not previous.is_dir():
            return
        if previous.resolve() == self.pretrained_dir.resolve():
            return
        for source in sorted(previous.glob("*/*")):
            target = self.pretrained_dir / source.relative_to(previous)
            if source.is_dir() and not source.name.startswith(".") and not target.exists():
                link_tree(source, target)
        rank_zero_info(
            f"[swirl] pretrained folders exported before the resume ({previous}) linked into {self.pretrained_dir}"
        )

    def _export(self, trainer: Trainer, module: SwirlModule, stage: str, iteration: int) -> None:
        if self.pretrained_dir is None:
            return
        models = TRAINS[stage]
        tag = "sft" if stage == "sft" else f"iteration_{iteration + 1}_{stage}"
        for name in models:
            backend = getattr(module, name).model
            with full_weights(backend):  # under FSDP2 every process takes part in gathering the weights
                if trainer.global_rank != 0:
                    continue
                final = self.pretrained_dir / tag / name
                tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                backend.save_pretrained(tmp)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report_skipped(trainer)
        if not isinstance(pl_module, SwirlModule):
            return
        if self.stage == DONE:
            self._save_last_checkpoints(trainer)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.global_rank != 0:
            return
        if self.history:
            print(format_table(self.history))
        if log_dir is None:
            return
        written = []
        for name, rows in (("swirl_metrics.json", self.history), ("swirl_phases.json", self.phase_stats)):
            if rows:
                out = Path(log_dir) / name
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(rows, indent=2))
                tmp.replace(out)
                written.append(str(out))
        if written:
            print(f"[swirl] evaluations after each stage, step times and peak memory per phase: {', '.join(written)}")

    @staticmethod
    def _save_last_checkpoints(trainer: Trainer) -> None:
        """Write each ``ModelCheckpoint``'s ``last.ckpt`` now: fit stops mid-epoch when the schedule ends, between
        the callback's own saves, which would leave ``last.ckpt`` up to ``every_n_train_steps`` behind the end."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None:
                default = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                last = callback.last_model_path or str(default)
                # A collective under DDP: every rank calls, rank 0 writes. The whole state, optimisers and schedule too.
                trainer.save_checkpoint(last, weights_only=False)
                # The callback's own end-of-fit save (after this hook, when it saved nothing in this run) writes to its
                # last_model_path; any other existing file it would not overwrite but write beside, as last-v1.ckpt.
                callback.last_model_path = last

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "iteration": self.iteration,
            "step_in_phase": self.step_in_phase,
            "history": self.history,
            "phase_stats": self.phase_stats,
            "phase_steps_timed": self._phase_steps_timed,
            "phase_seconds": self._phase_seconds(),
            "pretrained_dir": None if self.pretrained_dir is None else str(self.pretrained_dir),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = state_dict["stage"]
        self.iteration = state_dict["iteration"]
        self.step_in_phase = state_dict["step_in_phase"]
        self.history = list(state_dict["history"])
        self.phase_stats = list(state_dict.get("phase_stats", []))
        self._phase_steps_timed = state_dict.get("phase_steps_timed", 0)
        self._phase_seconds_before = state_dict.get("phase_seconds", 0.0)
        pretrained = state_dict.get("pretrained_dir")
        self.pretrained_dir = None if pretrained is None else Path(pretrained)
        self._resumed = True


STALE_EXPORT = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")


def log_scalars(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` to the loggers now (rank 0), at the step of Lightning's own training scalars in fit.

    Not ``LightningModule.log`` from a callback: that reaches the loggers only if this step is a log step, and
    ``SwirlModule`` forgets each step's values at the next one.
    """
    if trainer.global_rank != 0 or not metrics:
        return
    fitting = trainer.state.fn == TrainerFn.FITTING
    step = trainer.fit_loop.epoch_loop._batches_that_stepped if fitting else trainer.global_step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def remove_stale_exports(pretrained: Path) -> None:
    """Remove the ``<tag>/.<name>.tmp-<pid>`` folders under ``pretrained`` whose exporting process is gone."""
    for tmp in pretrained.glob("*/.*.tmp-*"):
        match = STALE_EXPORT.fullmatch(tmp.name)
        if match is not None and tmp.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of the folder ``source`` made of hard links (a plain copy across file systems), built
    under a temporary name and renamed into place. Exports replace whole folders, never files in place, so the
    linked files never change under either name."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    tmp.rename(target)


def format_table(history: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per evaluation point, one column per metric."""
    numbers = {k for row in history for k, v in row.items() if isinstance(v, (int, float))}
    metrics = sorted(numbers - {"global_step"})
    header = "| after | step | " + " | ".join(metrics) + " |"
    sep = "|---|---|" + "---|" * len(metrics)
    rows = [
        f"| {r['after']} | {r['global_step']} | " + " | ".join(f"{r.get(m, float('nan')):.4f}" for m in metrics) + " |"
        for r in history
    ]
    return "\n".join([header, sep, *rows])
