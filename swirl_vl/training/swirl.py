"""``SwirlModule``: SFT warm start, then alternating GRPO phases, each rewarded by the other, frozen model.

Phase I (``phase1_fwm_step``): the frozen IDM labels an unlabelled pair greedily; the FWM samples ``G``
next states; reward = mean-token ``log Q_φ(z | x, ŷ)``. Phase II (``phase2_idm_step``): the IDM samples
``G`` actions; reward = ``log P_θ(y | x, z)`` from the frozen FWM. Which stage runs is set by the
``SwirlSchedule`` callback through ``enter_stage``.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from swirl_vl.eval.evaluate import evaluate_cycle, target_rows
from swirl_vl.eval.report import MetricTable
from swirl_vl.models.base import Rollout, check_sampling_settings
from swirl_vl.models.generation import is_sharded
from swirl_vl.rl.grpo import group_advantages
from swirl_vl.training.fsdp import copy_shards, reshard, shard_backend
from swirl_vl.training.images import grouped_lines, log_action_groups, log_transitions
from swirl_vl.training.lora import LoraReference, LoraSpec, adapter_parameters, add_lora
from swirl_vl.training.lr import LRSchedule, lr_factor
from swirl_vl.training.memory import MemoryPlan, memory_plan, runtime_bytes
from swirl_vl.training.objectives import GRPO, PolicyObjective
from swirl_vl.training.precision import DTYPES, Parked, master_state, park, scoring, unpark
from swirl_vl.training.sft import FWMModule, IDMModule, finish_test_report, labelled_pairs, log_means

STAGES = ("sft", "phase1", "phase2")
TRAINS = {"sft": ("fwm", "idm"), "phase1": ("fwm",), "phase2": ("idm",)}
"""The models that train in each stage."""


def forget_logged_values(trainer: Any, stage_ended: bool) -> None:
    """Drop the values logged in earlier training steps, so a log step writes only what its own step logged.

    Lightning keeps every value logged in an epoch and writes them all again at each log step until the epoch ends:
    with stages that log different scalars, ``fwm/sft_loss`` would go on being written, flat, through both phases.
    ``stage_ended``: the previous step was a stage's last; if it was no log step its values are written first (at its
    step), or a stage shorter than ``log_every_n_steps`` would show none.
    """
    results = getattr(trainer, "_results", None)  # Lightning's collection of what the running loop logged
    if results is None:
        return
    stepped = trainer.fit_loop.epoch_loop._batches_that_stepped  # the x of Lightning's training scalars
    every = trainer.log_every_n_steps
    if stage_ended and every and stepped % every:  # Lightning logged the previous step if stepped % every == 0
        values = results.metrics(on_step=True)["log"]  # tensors: every logger takes them
        for logger in trainer.loggers:
            logger.log_metrics(values, step=stepped - 1)
    results.reset(metrics=False)  # tensors only: a torchmetrics Metric keeps its own state


def stage_metrics(metrics: dict[str, Any], stage: str) -> dict[str, Any]:
    """The progress-bar values ``stage`` logs: its models' losses in SFT, the phase's own scalars in a phase."""
    prefixes = tuple(f"{name}/" for name in TRAINS[stage]) if stage == "sft" else (f"{stage}/",)
    return {name: value for name, value in metrics.items() if name.startswith(prefixes)}


def sampler_gap(logprobs: Tensor | None, rollout: Rollout) -> Tensor | None:
    """Mean ``|log π − log π_sampler|`` over the rollout's positions: the update's log-probs against those the sampler
    recorded. Float error only (≲ 1e-5) when scoring matches sampling; a temperature or truncation mismatch shows."""
    if logprobs is None or not rollout.mask.any():
        return None
    m = rollout.mask
    return (logprobs - rollout.old_logprobs.to(logprobs)).abs()[m].mean()


def zero_loss(model: nn.Module) -> Tensor:
    """A loss of 0 over every trainable parameter of ``model``: a backward pass that changes nothing, for a step with
    nothing to learn from (under DDP every rank must take part in the same gradient reductions)."""
    return sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)


def scored_once(score: Any, keys: list[Any], *columns: Tensor | list) -> Tensor:
    """``score(*columns)`` ``(N,)``, the rows that share a key scored once (rows of ``columns``, tensors or lists,
    picked): a group's identical rollouts, the same next state drawn twice, get one reward pass between them."""
    slots: dict[Any, int] = {}
    kept: list[int] = []  # the first row of each key
    inverse: list[int] = []  # each row's key, as a position in kept
    for row, key in enumerate(keys):
        if key not in slots:
            slots[key] = len(kept)
            kept.append(row)
        inverse.append(slots[key])
    if len(kept) == len(keys):
        return score(*columns)
    picked = [c[kept] if isinstance(c, Tensor) else [c[i] for i in kept] for c in columns]
    return score(*picked)[torch.tensor(inverse)]


def rollout_keys(images: Tensor, group_size: int) -> list[tuple[int, int]]:
    """Per rollout row (groups of ``group_size`` share a prompt), a key equal for equal rollouts of one group: its
    group and which distinct image it drew (compared exactly)."""
    drawn = torch.unique(images.flatten(1), dim=0, return_inverse=True)[1].tolist()
    return [(i // group_size, image) for i, image in enumerate(drawn)]


def mean_token_logprob(logp: Tensor, mask: Tensor) -> Tensor:
    """``(N, L)`` per-token log-probs → ``(N,)`` mean over the masked-in tokens."""
    m = mask.to(logp.dtype)
    return (logp * m).sum(1) / m.sum(1).clamp(min=1)


class SwirlModule(LightningModule):
    """Holds the FWM and IDM modules, one optimiser each (manual optimisation), and the GRPO phases."""

    def __init__(
        self,
        fwm: FWMModule,
        idm: IDMModule,
        fwm_group_size: int = 8,
        idm_group_size: int = 8,
        fwm_beta: float = 0.04,
        idm_beta: float = 0.1,
        clip_eps: float = 0.2,
        min_label_logprob: float = -2.0,
        reward_floor: float = -10.0,
        rl_batch_size: int | None = None,
        fwm_generation: dict[str, Any] | None = None,
        idm_generation: dict[str, Any] | None = None,
        reference: Literal["sft", "iteration"] = "sft",
        grad_clip: float = 1.0,
        log_rollouts_every_n_steps: int = 50,
        sft_lr_schedule: LRSchedule = "cosine",
        sft_warmup_steps: int = 50,
        sft_decay_fraction: float = 0.2,
        fwm_rl_lr: float | None = None,
        idm_rl_lr: float | None = None,
        phase1: Literal["grpo", "bootstrap"] = "grpo",
        lora: LoraSpec | None = None,
        shared_base: bool = False,
        scale_advantages: bool = True,
        sft_fwm_steps: int | None = None,
        rl_lr_schedule: LRSchedule = "constant",
        rl_warmup_steps: int = 0,
        fresh_rl_optimizer: bool = True,
        fwm_objective: PolicyObjective | None = None,
        rl_micro_batch_size: int | None = None,
        updates_per_rollout: int = 1,
        max_nonfinite_steps: int = 10,
        frozen_dtype: Literal["bfloat16", "float16"] | None = None,
    ) -> None:
        """
        Args:
            fwm: the forward world model's module (``FWMModule``).
            idm: the inverse dynamics model's module (``IDMModule``).
            fwm_group_size: Phase I samples ``G`` per pair (paper: 8).
            idm_group_size: Phase II sampled actions ``G`` per pair (paper: 16).
            fwm_beta: weight of the KL to the reference FWM (paper code: 0.04): k3 per token for a token FWM, the
                closed-form Gaussian KL per DDIM step for a diffusion FWM.
            idm_beta: weight of the k3 KL to the reference IDM (paper code: 0.1).
            clip_eps: PPO ratio clip ε.
            min_label_logprob: Phase I keeps a pair only when the frozen IDM's greedy label has mean token
                log-prob ≥ this (paper: -2.0).
            reward_floor: rewards of both phases are clamped below at this value (paper code: -10).
            rl_batch_size: pairs per GRPO step, per device (default: the unlabelled loader's batch size);
                each step makes ``rl_batch_size × G`` rollouts.
            fwm_generation: sampling keyword arguments for FWM rollouts (token FWM: ``temperature``,
                ``top_p``; diffusion FWM: ``eta``, ``num_inference_steps``); backend defaults when empty.
            idm_generation: sampling keyword arguments for IDM rollouts (paper: temperature 0.7, top-k 50).
            reference: KL reference policy: the SFT model (``sft``) or the policy at the start of each
                iteration (``iteration``).
            grad_clip: gradient-norm clip for every optimiser step (0: off).
            log_rollouts_every_n_steps: how often (in steps of a phase) rollout grids / texts go to TensorBoard.
            sft_lr_schedule: SFT learning rate over the stage: ``constant``; ``cosine`` decay to 5% of each
                optimiser's configured rate at the last SFT step; or ``wsd``: the full rate until the last
                ``sft_decay_fraction`` of the steps, then that cosine decay over them. Each model's schedule spans
                its own SFT steps (the FWM's ``sft_fwm_steps``).
            sft_warmup_steps: linear warm-up of the SFT learning rate, in steps.
            sft_decay_fraction: the share of each model's SFT steps that ``wsd`` decays over.
            fwm_rl_lr: learning rate of the FWM in Phase I (None: its optimiser's configured rate).
                RL updates want a far smaller step than SFT: at the SFT rate Phase I drifts off the reference.
            idm_rl_lr: learning rate of the IDM in Phase II (None: its optimiser's configured rate).
            phase1: ``grpo`` (SWIRL) or ``bootstrap``: the paper's baseline that instead fine-tunes the FWM on the
                IDM's filtered pseudo-labels of the unlabelled pairs, with the real next state as target.
            lora: train SWIRL's phases through LoRA adapters (PEFT) instead of full fine-tuning. The adapters start
                at zero and stay frozen during SFT, so they begin where SFT ended and the base (the SFT model, with
                the adapter disabled) is the KL reference without a second copy. None: full fine-tuning, reference
                a frozen copy.
            shared_base: one language model for both (the paper's one base, two LoRA adapters): a ``TokenFWM`` with
                a ``TokenIDM`` (the IDM runs on the FWM's model, tokenizer and VQ), or a ``JanusFWM`` with a
                ``VLMIDM`` (Janus-Pro's generation and understanding paths of one model). Needs ``lora``; SFT trains
                the shared base on both losses.
            scale_advantages: divide group-relative advantages by the group's reward std (GRPO). False: plain
                ``r - mean`` (Dr. GRPO), so groups whose members are all right, with rewards that differ only by the
                judge's noise, no longer get full-size advantages (``benchmarks/reward_signal.py`` shows how many).
            sft_fwm_steps: the FWM trains on the first N SFT steps only (its learning-rate schedule spans those), the
                IDM on all ``--schedule.sft_steps``: Phase I's judge needs more passes over the labelled set than the
                world model it judges. None: both train on every SFT step.
            rl_lr_schedule: learning rate over each RL phase: ``constant``, or ``cosine`` decay to 5% of the phase's
                rate (``fwm_rl_lr`` / ``idm_rl_lr``) at its last step (the paper's code decays within GRPO).
            rl_warmup_steps: linear warm-up at the start of each RL phase, in steps.
            fresh_rl_optimizer: clear the training model's optimiser state (AdamW moments and step count) at the start
                of each RL phase, as the paper's code starts GRPO with a new optimiser: moments left by SFT or by the
                previous phase would otherwise steer the first updates. A run resumed mid-phase keeps its state.
            fwm_objective: Phase I's objective, by ``class_path``: ``swirl_vl.training.objectives.GRPO`` (None: GRPO with
                ``clip_eps`` and ``scale_advantages``) or ``swirl_vl.training.objectives.ForwardProcess`` (DiffusionNFT,
                diffusion FWMs). Phase II always uses GRPO.
            rl_micro_batch_size: pairs per sampling pass and per forward/backward of an RL step (each holds
                ``rl_micro_batch_size × G`` rollouts); their gradients add up to the whole step's, so peak memory is
                bounded whatever ``rl_batch_size``. None: the whole step at once.
            updates_per_rollout: optimiser steps on each batch of rollouts (GRPO's μ, TRL's ``num_iterations``); the
                first one's log-probs are the old log-probs of the others. 1: on-policy, the ratio is 1 at every update.
            max_nonfinite_steps: a step whose loss or gradient is not finite is skipped and counted
                (``<stage>/nonfinite_steps``); this many in a row stop fit with an error.
            frozen_dtype: in an RL phase, keep the model that does not train on the device in this dtype only, for
                scoring (rewards, its pseudo-labels, validation) under autocast, and park its float32 weights and
                optimiser state in CPU memory until its own phase, when they come back exactly
                (``swirl_vl.training.precision``). A 7B frozen model then takes 2 bytes per parameter on the GPU
                instead of 4 + 8 (AdamW), and the rewards are bfloat16 scores. Evaluations at stage boundaries,
                exports and checkpoints see float32. None: the frozen model stays as it trained.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["fwm", "idm", "fwm_objective"])
        for name, g in (("fwm_group_size", fwm_group_size), ("idm_group_size", idm_group_size)):
            if g < 2:
                raise ValueError(f"--model.init_args.{name} must be ≥ 2 for group-relative advantages; got {g}")
        self.automatic_optimization = False
        for name, value in (
            ("rl_micro_batch_size", rl_micro_batch_size or 1),
            ("updates_per_rollout", updates_per_rollout),
            ("max_nonfinite_steps", max_nonfinite_steps),
        ):
            if value < 1:
                raise ValueError(f"--model.init_args.{name} must be ≥ 1; got {value}")
        if not 0 < sft_decay_fraction <= 1:
            raise ValueError(f"--model.init_args.sft_decay_fraction must be in (0, 1]; got {sft_decay_fraction}")
        if sft_fwm_steps is not None and (sft_fwm_steps < 0 or shared_base):
            raise ValueError(
                f"--model.init_args.sft_fwm_steps must be ≥ 0 and cannot be used with shared_base; got {sft_fwm_steps}"
            )
        if frozen_dtype is not None and shared_base:
            raise ValueError(
                "--model.init_args.frozen_dtype cannot be used with --model.init_args.shared_base: the frozen model "
                "runs on the training model's own base weights"
            )
        if lora is not None and reference == "iteration":
            raise ValueError(
                "--model.init_args.reference iteration needs full fine-tuning: with --model.init_args.lora the reference is "
                "the base model (the SFT model); use --model.init_args.reference sft"
            )
        check_sampling_settings(fwm.model, fwm_generation, "--model.init_args.fwm_generation")
        check_sampling_settings(idm.model, idm_generation, "--model.init_args.idm_generation")
        if shared_base:
            sharing = getattr(type(idm.model), "sharing", None)  # the IDM backend says which world models it can share
            problem = "" if sharing is not None else f"{type(idm.model).__name__} cannot run on another model's weights"
            if sharing is not None and lora is not None:
                settings = {n: getattr(idm.model, n) for n in ("instruction", "prompt") if hasattr(idm.model, n)}
                try:
                    idm.model = sharing(fwm.model, idm.model.max_new_tokens, **settings)
                except TypeError as exn:
                    problem = str(exn)
            if lora is None or problem:
                raise ValueError(
                    "--model.init_args.shared_base needs --model.init_args.lora and an IDM that runs on the world "
                    f"model's own model (TokenIDM with a TokenFWM, VLMIDM with a JanusFWM); got lora={lora}, "
                    f"{type(fwm.model).__name__} and {type(idm.model).__name__}" + (f": {problem}" if problem else "")
                )
        # What each backend itself leaves trainable (not its VQ, say), before LoRA freezes the bases.
        self._trainable: dict[str, list[nn.Parameter]] = {
            name: [p for p in m.model.parameters() if p.requires_grad] for name, m in (("fwm", fwm), ("idm", idm))
        }
        if lora is not None:
            add_lora(fwm.model, lora, "fwm")
            add_lora(idm.model, lora, "idm", share_with=fwm.model if shared_base else None)
        self.fwm = fwm
        self.idm = idm
        self.idm_objective: PolicyObjective = GRPO(clip_eps, scale_advantages)
        self.fwm_objective: PolicyObjective = fwm_objective or self.idm_objective
        self.fwm_objective.check(fwm.model)
        if updates_per_rollout > 1 and not isinstance(self.fwm_objective, GRPO):
            raise ValueError(
                f"--model.init_args.updates_per_rollout {updates_per_rollout} needs GRPO in Phase I; "
                f"{type(self.fwm_objective).__name__} makes one update per rollout batch"
            )
        self.fwm_ref: nn.Module | None = None
        self.idm_ref: nn.Module | None = None
        self.stage: str = "sft"
        self.iteration: int = 0
        self.step_in_phase: int = 0
        self.stage_steps: int = 0
        self._base_lrs: list[list[float]] = []
        self.memory_plan: MemoryPlan | None = None
        self._nonfinite_in_row = 0
        self._checkpoint_batches: int | None = None  # the training step of a loaded checkpoint (for test's scalars)
        self._step_chunks = 1
        self._last_step_stage: str | None = None  # the stage of the previous training step in this process
        self._idle_pair: tuple[Tensor, Tensor] | None = None  # a pair of the step: FSDP2's stand-in
        self._parked: dict[str, Parked] = {}  # with frozen_dtype: the frozen model's float32 data and optimiser state

    # ---------------------------------------------------------------- stage control (driven by SwirlSchedule)

    def enter_stage(
        self, stage: str, iteration: int, refresh_reference: bool, num_steps: int = 0, starting: bool = False
    ) -> None:
        """Freeze the model that does not train in ``stage`` (eval mode, no grads) and unfreeze the other.

        ``num_steps``: the stage's length, which its learning-rate schedule spans. ``starting``: the stage begins now
        (not a resume into its middle): with ``fresh_rl_optimizer`` an RL phase then starts from empty optimiser state.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage_steps = num_steps
        self.stage, self.iteration = stage, iteration
        trains = TRAINS[stage]
        self._unpark([name for name in self._parked if name in trains])  # its float32 weights come back to train
        on = {id(p) for p in self.stage_parameters(stage)}
        for name in ("fwm", "idm"):
            module = getattr(self, name)
            module.train(name in trains)
            for p in module.model.parameters():
                p.requires_grad_(id(p) in on)
                if id(p) not in on:
                    p.grad = None  # a frozen model keeps no stale gradient (nor its memory)
        if refresh_reference and stage != "sft":
            self.refresh_reference(trains[0])
        if starting and stage != "sft" and self.hparams.fresh_rl_optimizer:
            self.reset_optimizer_state(trains[0])
        frozen = {"phase1": "idm", "phase2": "fwm"}.get(stage)
        if self.hparams.frozen_dtype is not None and frozen is not None and frozen not in self._parked:
            # Its optimiser state is dropped with fresh_rl_optimizer: its own phase would clear it on starting.
            dtype, keep = DTYPES[self.hparams.frozen_dtype], not self.hparams.fresh_rl_optimizer
            self._parked[frozen] = park(getattr(self, frozen).model, dtype, self._optimizer(frozen), keep_state=keep)

    def leave_stage(self) -> None:
        """The stage has ended: a parked model gets its float32 weights back (for the boundary's evaluation and
        exports; the next ``enter_stage`` parks the next phase's frozen model)."""
        self._unpark(list(self._parked))

    def _unpark(self, names: list[str]) -> None:
        for name in names:
            unpark(self._parked.pop(name), self._optimizer(name))

    def _optimizer(self, which: str) -> torch.optim.Optimizer | None:
        """``which``'s optimiser, or None before the Trainer has made them."""
        if self._trainer is None or not self.trainer.optimizers:
            return None
        return self.trainer.optimizers[("fwm", "idm").index(which)]

    def scoring(self, which: str) -> Any:
        """The context ``which`` runs in without training: autocast to ``frozen_dtype`` while it is parked."""
        return scoring(self._parked.get(which), self.device)

    def reset_optimizer_state(self, which: Literal["fwm", "idm"]) -> None:
        """Forget ``which``'s optimiser state (moments, step counts); the next step starts it afresh."""
        opt = self._optimizer(which)
        if opt is not None:  # without an optimiser yet it will start empty anyway
            opt.state.clear()

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """What trains in ``stage``: with LoRA, the base in SFT and the policy's own adapter in its phase."""
        lora = self.hparams.lora is not None
        adapters = {id(p) for name in ("fwm", "idm") if lora for p in adapter_parameters(getattr(self, name).model)}
        params: dict[int, nn.Parameter] = {}  # by identity: a shared base appears under both models
        for name in TRAINS[stage]:
            if lora and stage != "sft":
                chosen = adapter_parameters(getattr(self, name).model)
            else:
                chosen = [p for p in self._trainable[name] if id(p) not in adapters]
            params.update((id(p), p) for p in chosen)
        return list(params.values())

    def trained_parameters(self, which: Literal["fwm", "idm"]) -> list[nn.Parameter]:
        """What ``which`` trains in some stage: its own trainable parameters, and its LoRA adapter if any."""
        params = list(self._trainable[which])
        if self.hparams.lora is not None:
            params += adapter_parameters(getattr(self, which).model)
        return params

    def refresh_reference(self, which: Literal["fwm", "idm"]) -> None:
        """Set the frozen KL reference: the policy with its adapter disabled (LoRA), else a copy of it now."""
        policy = getattr(self, which).model
        if self.hparams.lora is not None:
            # Not an nn.Module: no weights of its own, nothing in the checkpoint.
            self.__dict__[f"{which}_ref"] = LoraReference(policy)
            return
        ref = getattr(self, f"{which}_ref")
        if ref is not None and is_sharded(
            policy
        ):  # FSDP2: no deepcopy; the copy made before sharding takes its weights
            copy_shards(policy, ref)
            return
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        setattr(self, f"{which}_ref", ref)

    @override
    def configure_model(self) -> None:
        """Under ``FSDP2Strategy`` (its device mesh set): shard both models, and their KL references, copied first
        (``swirl_vl.training.fsdp``). Otherwise nothing: DDP and one device take the models as they are."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(self.fwm.model):
            return
        h = self.hparams
        for name, value in (("shared_base", h.shared_base), ("frozen_dtype", h.frozen_dtype)):
            if value:
                raise ValueError(
                    f"--model.init_args.{name} is not supported under FSDP2Strategy (which shards the frozen model "
                    "already); leave it unset, or use DDP"
                )
        for which in ("fwm", "idm"):
            reason = getattr(getattr(self, which).model, "fsdp2_unsupported", None)
            if reason:
                raise ValueError(
                    f"{type(getattr(self, which).model).__name__} cannot run under FSDP2Strategy: {reason}"
                )
        for which in ("fwm", "idm"):
            policy = getattr(self, which).model
            if h.lora is None:  # a deepcopy of a sharded model is not possible: copied now, given weights later
                setattr(self, f"{which}_ref", copy.deepcopy(policy).eval().requires_grad_(False))
            trainable = {id(p) for p in self._trainable[which]}
            names = {name for name, p in policy.named_parameters() if id(p) in trainable}
            sharded = shard_backend(policy, mesh["data_parallel"])
            # Sharding replaces the parameters (by sharded ones of the same names).
            self._trainable[which] = [p for name, p in policy.named_parameters() if name in names]
            if h.lora is None:
                shard_backend(getattr(self, f"{which}_ref"), mesh["data_parallel"], select=sharded)

    @override
    def on_fit_start(self) -> None:
        rl_pairs = self.hparams.rl_batch_size or getattr(self.trainer.datamodule, "batch_size", None)
        self.memory_plan = memory_plan(self, runtime_bytes(self.device), rl_pairs)
        rank_zero_info(f"[swirl] memory plan per device, at the configured sizes:\n{self.memory_plan.table()}")

    def _reference_dir(self) -> Path | None:
        """Where SFT references are written once (the checkpoint folder), or None: keep them in each checkpoint."""
        callback = self._trainer.checkpoint_callback if self._trainer is not None else None
        dirpath = getattr(callback, "dirpath", None)
        return None if dirpath is None else Path(dirpath)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._parked:  # a parked model is saved as it trains, in float32, not as its scoring copy
            names: dict[nn.Parameter, list[str]] = defaultdict(list)
            for name, p in self.named_parameters(remove_duplicate=False):
                names[p].append(name)
            for parked in self._parked.values():
                checkpoint["state_dict"].update(master_state(parked, names))
        # A reference that is the SFT model never changes after SFT: written once beside the checkpoints (the first
        # save that holds it), and left out of every checkpoint, which would otherwise carry a second full model.
        folder = self._reference_dir()
        if self.stage == "sft":  # under FSDP2 the copies exist from the start, but become references after SFT only
            for k in [k for k in checkpoint["state_dict"] if k.startswith(("fwm_ref.", "idm_ref."))]:
                del checkpoint["state_dict"][k]
        if self.hparams.reference != "sft" or self.hparams.lora is not None or folder is None:
            return
        state, files = checkpoint["state_dict"], {}
        for which in ("fwm", "idm"):
            prefix = f"{which}_ref."
            keys = [k for k in state if k.startswith(prefix)]
            if not keys:
                continue
            path = folder / f"reference_{which}.pt"
            if self.global_rank == 0 and not path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                torch.save({k[len(prefix) :]: state[k] for k in keys}, tmp)  # keeps tied weights tied
                tmp.replace(path)
            for k in keys:
                del state[k]
            files[which] = str(path.resolve())
        if files:
            checkpoint["swirl_reference_files"] = files

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        self._checkpoint_batches = epoch_loop.get("_batches_that_stepped")
        if "state_dict" in checkpoint:  # FSDP2Strategy has loaded the weights already, before this hook
            self.complete_state_dict(checkpoint)

    def complete_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Put the KL references, which checkpoints leave out, back into ``checkpoint["state_dict"]``, making room for
        them first (references are created mid-run): the SFT model from the file it was written to once, beside the
        checkpoints. A reference copy that exists from the start (FSDP2) but is not a reference yet (an SFT-stage
        checkpoint) takes its policy's weights, as the phase switch will give it."""
        state = checkpoint["state_dict"]
        for which, file in checkpoint.get("swirl_reference_files", {}).items():
            if not Path(file).is_file():
                raise FileNotFoundError(
                    f"this checkpoint's {which} KL reference (the SFT model) is kept in '{file}', which is missing: "
                    "resume from the run folder the checkpoint was written in, with its checkpoints/ folder whole"
                )
            saved = torch.load(file, map_location="cpu", weights_only=True)
            state.update({f"{which}_ref.{k}": v for k, v in saved.items()})
        for which in ("fwm", "idm"):
            ref, prefix = getattr(self, f"{which}_ref"), f"{which}_ref."
            if ref is None and any(k.startswith(prefix) for k in state):
                self.refresh_reference(which)
            elif isinstance(ref, nn.Module) and not any(k.startswith(prefix) for k in state):
                policy = f"{which}.model."
                state.update({prefix + k[len(policy) :]: v for k, v in list(state.items()) if k.startswith(policy)})

    # ---------------------------------------------------------------- optimisation

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # Every parameter either model trains in any stage, whatever is frozen right now (LoRA freezes the bases
        # until SFT, which trains them). A shared base is the FWM optimiser's alone: the IDM's would step the same
        # weights a second time.
        fwm = self.trained_parameters("fwm")
        taken = {id(p) for p in fwm}
        optimizers = [
            self.fwm.make_optimizer(fwm),
            self.idm.make_optimizer([p for p in self.trained_parameters("idm") if id(p) not in taken]),
        ]
        # The configured rates; a resumed optimiser state carries the last scheduled rate instead.
        self._base_lrs = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
        return optimizers

    def current_lr(self, which: Literal["fwm", "idm"], base: float) -> float:
        """The learning rate of ``which`` at the current step of the current stage, given its configured rate."""
        h = self.hparams
        if self.stage == "sft":
            total = self.stage_steps if which == "idm" else self._sft_fwm_total()
            return base * lr_factor(
                self.step_in_phase, total, h.sft_warmup_steps, h.sft_lr_schedule, decay_fraction=h.sft_decay_fraction
            )
        rl_lr = h[f"{which}_rl_lr"]
        factor = lr_factor(self.step_in_phase, self.stage_steps, h.rl_warmup_steps, h.rl_lr_schedule)
        return (base if rl_lr is None else rl_lr) * factor

    def _sft_fwm_total(self) -> int:
        limit = self.hparams.sft_fwm_steps
        return self.stage_steps if limit is None else min(limit, self.stage_steps)

    def _apply_lrs(self, optimizers: list[Any]) -> None:
        for which, opt, bases in zip(("fwm", "idm"), optimizers, self._base_lrs):
            for group, base in zip(getattr(opt, "optimizer", opt).param_groups, bases):
                group["lr"] = self.current_lr(which, base)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> None:
        forget_logged_values(self.trainer, stage_ended=self._last_step_stage not in (None, self.stage))
        self._last_step_stage = self.stage
        fwm_opt, idm_opt = self.optimizers()
        self._apply_lrs([fwm_opt, idm_opt])
        for which, opt in (("fwm", fwm_opt), ("idm", idm_opt)):
            if which in TRAINS[self.stage]:
                self.log(f"lr/{which}", getattr(opt, "optimizer", opt).param_groups[0]["lr"], batch_size=1)
        if self.stage == "sft":
            self.sft_step(labelled_pairs(batch), fwm_opt, idm_opt)
        elif self.stage == "phase1":
            step = self.bootstrap_fwm_step if self.hparams.phase1 == "bootstrap" else self.phase1_fwm_step
            step(self._rl_pairs(batch), fwm_opt)
        else:
            self.phase2_idm_step(self._rl_pairs(batch), idm_opt)
        self.log("stage", float(STAGES.index(self.stage)), batch_size=1)
        self.log("iteration", float(self.iteration), batch_size=1)
        reshard(self)  # FSDP2 keeps a model's outer weights gathered after a forward without backward

    def _rl_pairs(self, batch: dict) -> dict:
        """The step's state-only pairs: the first ``rl_batch_size``, less any whose images are not finite (counted).

        Sets ``_step_chunks``, the micro-batches the step makes whatever is dropped: under DDP every rank must make as
        many backward passes, so the count follows the batch as it came, and empty micro-batches take part as zeros.
        """
        pairs = batch["unlabelled"] if "unlabelled" in batch else batch
        n = self.hparams.rl_batch_size
        pairs = {k: v[:n] for k, v in pairs.items()} if n is not None else dict(pairs)
        self._step_chunks = len(self._micro_batches(pairs))
        self._idle_pair = (pairs["x"][:1], pairs["y"][:1]) if len(pairs["x"]) else None
        finite = torch.isfinite(pairs["x"]).flatten(1).all(1) & torch.isfinite(pairs["y"]).flatten(1).all(1)
        self.log(f"{self.stage}/nonfinite_pairs", float((~finite).sum()), batch_size=1, reduce_fx="sum")
        if finite.all():
            return pairs
        keep = finite.nonzero().squeeze(1).tolist()
        return {k: v[keep] if isinstance(v, Tensor) else [v[i] for i in keep] for k, v in pairs.items()}

    def _micro_batches(self, pairs: dict) -> list[dict]:
        """``pairs`` in consecutive pieces of ``rl_micro_batch_size`` pairs (one piece without it)."""
        n = len(pairs["x"])
        size = max(self.hparams.rl_micro_batch_size or n, 1)
        return [{k: v[i : i + size] for k, v in pairs.items()} for i in range(0, n, size)]

    def _optimizer_steps(self, opts: list[Any]) -> None:
        """Clip and step each optimiser after the backward passes, unless a gradient is not finite: then the step is
        skipped (gradients cleared, ``nonfinite_steps`` counted) and, after ``max_nonfinite_steps`` in a row, fit stops
        with an error rather than train on. Under DDP every rank sees the same reduced gradients, so all skip alike."""
        grads = [p.grad for opt in opts for group in opt.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        self.log(f"{self.stage}/nonfinite_steps", float(not finite), batch_size=1, reduce_fx="sum")
        if not finite:
            for opt in opts:
                opt.zero_grad()
            self._nonfinite_in_row += 1
            limit = self.hparams.max_nonfinite_steps
            if self._nonfinite_in_row >= limit:
                raise RuntimeError(
                    f"{self._nonfinite_in_row} steps in a row in {self.stage} had a non-finite loss or gradient (the last at "
                    f"global step {self.global_step}); stopped rather than train on. Look for NaN or infinite values in "
                    "the data, or lower the learning rate (--model.init_args.max_nonfinite_steps sets the limit)."
                )
            return
        self._nonfinite_in_row = 0
        for opt in opts:
            if self.hparams.grad_clip:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt.step()

    def _step(self, opt: Any, loss: Tensor) -> None:
        opt.zero_grad()
        self.manual_backward(loss)
        self._optimizer_steps([opt])

    def sft_step(self, pairs: dict, fwm_opt: Any, idm_opt: Any) -> None:
        """Supervised warm start on one labelled batch: one backward, an optimiser step per model that trains."""
        b = len(pairs["action"])
        losses = {"idm": self.idm.sft_loss(pairs)}
        if self.step_in_phase < self._sft_fwm_total():
            losses["fwm"] = self.fwm.sft_loss(pairs)
        opts = [idm_opt, fwm_opt][: len(losses)]
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(sum(losses.values()))
        self._optimizer_steps(opts)
        for which, loss in losses.items():
            self.log(f"{which}/sft_loss", loss, prog_bar=True, batch_size=b)

    @torch.no_grad()
    def label_pairs(self, x: Tensor, y: Tensor) -> tuple[list[str], Tensor]:
        """Greedy IDM labels for unlabelled pairs and their mean token log-prob ``(B,)`` (recorded while decoding)."""
        with self.scoring("idm"):
            labels = [
                self.idm.model.sample(part["x"], part["y"], greedy=True)
                for part in self._micro_batches({"x": x, "y": y})
            ]
        texts = [t for r in labels for t in r.texts]
        return texts, torch.cat([mean_token_logprob(r.old_logprobs, r.mask) for r in labels])

    def filtered_labels(self, pairs: dict) -> tuple[Tensor, Tensor, list[str]] | None:
        """The unlabelled pairs whose greedy IDM label passes ``min_label_logprob``: ``(x, y, z)``, or None."""
        x, y = pairs["x"], pairs["y"]
        z, label_logprob = self.label_pairs(x, y)
        keep = label_logprob >= self.hparams.min_label_logprob
        self.log("phase1/labels_kept", keep.float().mean(), batch_size=len(z))
        self.log("phase1/label_logprob", label_logprob.mean(), batch_size=len(z))
        if not keep.any():
            return None
        idx = keep.nonzero().squeeze(1)
        return x[idx], y[idx], [z[i] for i in idx.tolist()]

    def _idle_loss(self, policy: nn.Module) -> Tensor:
        """The loss of a Bootstrap step with nothing to learn from: 0, with a gradient for every parameter. Under FSDP2
        a forward pass of the SFT loss (on a pair of the step) as well, since every process must run as many."""
        pairs = self._idle_pair
        if not is_sharded(policy) or pairs is None:
            return zero_loss(policy)
        x, y = pairs
        loss = policy.sft_loss(x, ["idle"], y) if policy is self.fwm.model else policy.sft_loss(x, y, ["idle"])
        return loss * 0

    def _zero_step(self, opt: Any, model: nn.Module) -> None:
        self._step(opt, self._idle_loss(model))

    def bootstrap_fwm_step(self, pairs: dict, opt: Any) -> None:
        """The Bootstrap baseline (paper, Table 1): SFT of the FWM on the frozen IDM's filtered greedy labels."""
        labelled = self.filtered_labels(pairs) if len(pairs["x"]) else None
        if labelled is None:
            return self._zero_step(opt, self.fwm.model)
        x, y, z = labelled
        loss = self.fwm.model.sft_loss(x, z, y)
        self._step(opt, loss)
        self.log("phase1/loss", loss.detach(), batch_size=len(z))

    def phase1_fwm_step(self, pairs: dict, opt: Any) -> None:
        """Phase I: variational information maximisation; the FWM trains with reward ``log Q_φ(z | x, ŷ)``."""
        g = self.hparams.fwm_group_size
        # Under DDP every rank must make as many backward passes: as many micro-batches as the batch came with, the
        # ones left empty by the label filter contributing zero gradients. Under FSDP2 each forward pass is a
        # collective too: an empty micro-batch then runs in full (sampling, reward, scoring) on a stand-in pair of
        # the step, its loss weighted 0.
        num_chunks = self._step_chunks
        labelled = self.filtered_labels(pairs) if len(pairs["x"]) else None
        parts = [] if labelled is None else self._micro_batches({"x": labelled[0], "z": labelled[2]})
        kept = len(parts)
        if is_sharded(self.fwm.model) and self._idle_pair is not None:
            parts += [{"x": self._idle_pair[0], "z": ["stand-in"]}] * (num_chunks - kept)
        if not parts:
            return self.update(self.fwm_objective, self.fwm.model, None, [None] * num_chunks, opt, 0.0, "phase1")
        chunks: list[tuple[Rollout, Tensor] | None] = []
        with torch.no_grad():
            for part in parts:
                rollout = self.fwm.model.sample(
                    part["x"], part["z"], num_samples=g, **(self.hparams.fwm_generation or {})
                )
                x_rep, z_rep = part["x"].repeat_interleave(g, 0), [a for a in part["z"] for _ in range(g)]
                with self.scoring("idm"):
                    keys = rollout_keys(rollout.images, g)
                    rewards = scored_once(self.idm.model.log_likelihood, keys, x_rep, rollout.images, z_rep).float()
                chunks.append((rollout, rewards.clamp(min=self.hparams.reward_floor)))
        chunks += [None] * (num_chunks - len(chunks))
        beta, stand_ins = self.hparams.fwm_beta, range(kept, len(parts))
        self.update(self.fwm_objective, self.fwm.model, self.fwm_ref, chunks, opt, beta, "phase1", stand_ins)
        if self._should_log_rollouts() and labelled is not None:
            x, y, z = labelled
            rollout, rewards = chunks[0]  # never None: the first micro-batch holds the first kept pairs
            k = min(4, rollout.num_samples // g)
            shown = min(g, 4)
            ys = rollout.images.view(-1, g, *rollout.images.shape[1:])[:k, :shown]
            sample_rewards = [[f"reward {r:.2f}" for r in row] for row in rewards.view(-1, g)[:k, :shown].tolist()]
            log_transitions(
                self.logger, "phase1/rollouts", x[:k], ys, y[:k], list(z[:k]), self.global_step, sample_rewards
            )

    def phase2_idm_step(self, pairs: dict, opt: Any) -> None:
        """Phase II: ELBO maximisation; the IDM trains with reward ``log P_θ(y | x, z)``."""
        g = self.hparams.idm_group_size
        chunks: list[tuple[Rollout, Tensor] | None] = []
        with torch.no_grad():
            for part in self._micro_batches({"x": pairs["x"], "y": pairs["y"]}):
                x, y = part["x"], part["y"]
                rollout = self.idm.model.sample(x, y, num_samples=g, **(self.hparams.idm_generation or {}))
                x_rep, y_rep = x.repeat_interleave(g, 0), y.repeat_interleave(g, 0)
                with self.scoring("fwm"):
                    rewards = self.fwm.model.log_likelihood(x_rep, rollout.texts, y_rep, group_size=g).float()
                chunks.append((rollout, rewards.clamp(min=self.hparams.reward_floor)))
        chunks += [None] * (self._step_chunks - len(chunks))
        self.update(self.idm_objective, self.idm.model, self.idm_ref, chunks, opt, self.hparams.idm_beta, "phase2")
        if self._should_log_rollouts() and chunks[0] is not None:
            rollout, rewards = chunks[0]
            k = min(2, rollout.num_samples // g)
            groups = grouped_lines(rollout.texts[: k * g], rewards[: k * g].tolist(), g)
            log_action_groups(  # the first micro-batch's pairs: the first of the batch
                self.logger, "phase2/sampled_actions", pairs["x"][:k], pairs["y"][:k], groups, self.global_step
            )

    def update(
        self,
        objective: PolicyObjective,
        policy: nn.Module,
        reference: nn.Module | None,
        chunks: list[tuple[Rollout, Tensor] | None],
        opt: Any,
        beta: float,
        prefix: str,
        stand_ins: range = range(0),
    ) -> None:
        """``updates_per_rollout`` steps of ``policy`` on rollout micro-batches ``(rollout, rewards (N,))``, each step
        one backward per micro-batch (gradients accumulate to the whole batch's), under ``objective``; logs the
        phase's scalars. A None micro-batch (no pair kept) takes part with a zero loss, as DDP needs; the
        ``stand_ins`` (indices) run in full with their loss weighted 0, as FSDP2 needs."""
        live = [chunk for i, chunk in enumerate(chunks) if chunk is not None and i not in stand_ins]
        for rollout, rewards in live:
            assert rewards.shape == (rollout.num_samples,), (rewards.shape, rollout.num_samples)
        total = max(sum(objective.num_terms(rollout, rewards) for rollout, rewards in live), 1)
        old: list[Tensor | None] = [None] * len(chunks)
        gaps: list[Tensor] = []
        for _ in range(self.hparams.updates_per_rollout):
            opt.zero_grad()
            outs = []
            for i, chunk in enumerate(chunks):
                if chunk is None:
                    self.manual_backward(zero_loss(policy))
                    continue
                rollout, rewards = chunk
                out = objective(policy, reference, rollout, rewards, beta, old_logprobs=old[i], num_terms=total)
                if i in stand_ins:
                    self.manual_backward(out.loss * 0)
                    old[i] = out.logprobs
                    continue
                self.manual_backward(out.loss)
                if old[i] is None and (gap := sampler_gap(out.logprobs, rollout)) is not None:
                    gaps.append(gap)
                old[i] = out.logprobs
                outs.append(out)
            self._optimizer_steps([opt])
        if not live:
            return
        rewards = torch.cat([r for _, r in live])
        adv = group_advantages(rewards, live[0][0].group_size)  # the whole batch's, for the logs
        finite = rewards[torch.isfinite(rewards)].float()
        n = rewards.numel()
        self.log(f"{prefix}/reward_mean", finite.mean() if finite.numel() else torch.nan, prog_bar=True, batch_size=n)
        self.log(f"{prefix}/reward_std", finite.std() if finite.numel() > 1 else torch.nan, batch_size=n)
        # Each micro-batch's figure is its share of the batch's (divided by the batch's count): they add up.
        self.log(f"{prefix}/kl", sum(out.kl for out in outs), batch_size=n)
        self.log(f"{prefix}/clip_frac", sum(out.clip_frac for out in outs), batch_size=n)
        self.log(f"{prefix}/loss", sum(out.loss.detach() for out in outs), batch_size=n)
        self.log(f"{prefix}/frac_zero_std", adv.frac_zero_std, batch_size=n)
        self.log(f"{prefix}/nonfinite_groups", float(adv.num_nonfinite_groups), batch_size=n, reduce_fx="sum")
        if gaps:
            self.log(f"{prefix}/sampler_logprob_gap", torch.stack(gaps).mean(), batch_size=n)

    def _should_log_rollouts(self) -> bool:
        every = self.hparams.log_rollouts_every_n_steps
        return bool(every) and self.step_in_phase % every == 0 and self.global_rank == 0

    # ---------------------------------------------------------------- evaluation

    def evaluate_batch(self, batch: dict) -> tuple[dict[str, Tensor], Tensor, list[str]]:
        with self.scoring("fwm"):
            fwm_metrics, y_hat = self.fwm.evaluate(batch)
        with self.scoring("idm"):
            idm_metrics, texts = self.idm.evaluate(batch)
        y_hat = y_hat.float()
        return {**fwm_metrics, **idm_metrics}, y_hat, texts

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> None:
        metrics, y_hat, texts = self.evaluate_batch(batch)
        if split == "test":  # plus the costly metrics; aggregated per task and logged in on_test_epoch_end
            metrics |= self.fwm.test_only_metrics(batch) | self.idm.test_only_metrics(batch)
            metrics |= evaluate_cycle(self.fwm.model, batch, texts)
            self.test_table.add(metrics, batch["task"])
        else:
            log_means(self, split, metrics)
        if batch_idx == 0:  # as many as each module's log_images (0: none)
            if self.fwm.log_images:
                self.fwm.log_outputs(batch, y_hat, f"{split}/fwm", self.global_step)
            if self.idm.log_images:
                self.idm.log_outputs(batch, texts, f"{split}/idm", self.global_step)

    @override
    def on_test_start(self) -> None:
        # `test` restores the weights but not the loops, so its scalars would sit at step 0 of the run they test:
        # put them at the training step the checkpoint was written at (the x of the run's training scalars).
        epoch_loop = self.trainer.fit_loop.epoch_loop
        if self._checkpoint_batches is not None:  # never backwards (a test after fit in the same process)
            epoch_loop._batches_that_stepped = max(epoch_loop._batches_that_stepped, self._checkpoint_batches)

    @override
    def on_test_epoch_start(self) -> None:
        self.test_table = MetricTable()

    @override
    def on_test_epoch_end(self) -> None:
        self.fwm.add_rollouts(self.test_table, self.trainer)
        finish_test_report(self, self.test_table)

    @torch.no_grad()
    def evaluate_loader(self, loader: Any, max_batches: int | None = None) -> dict[str, float]:
        """Mean of every metric over ``loader`` (used by the schedule at stage boundaries)."""
        was_training = {name: getattr(self, name).training for name in ("fwm", "idm")}
        self.fwm.eval()
        self.idm.eval()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            metrics, _, _ = self.evaluate_batch(move_data_to_device(batch, self.device))
            for name, values in metrics.items():
                answered = values[~values.isnan()]  # NaN: no answer (e.g. a pair without a next state)
                sums[name] += float(answered.sum())
                counts[name] += answered.numel()
        for name, was in was_training.items():
            getattr(self, name).train(was)
        return {name: sums[name] / counts[name] for name in sorted(sums) if counts[name]}

    @override
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """A pair batch's greedy outputs, as ``evaluate_batch`` makes them: ``y_hat (B, 3, H, W)``, the FWM's next state
        under the batch's action; ``idm_action``, the IDM's action for ``(x, y)``; per-pair ``metrics`` ``{name: (B,)}``;
        with the batch's images and text fields. ``swirl_vl.predict.PredictionWriter`` writes them out."""
        metrics, y_hat, idm_action = self.evaluate_batch(batch)
        fields = {name: batch[name] for name in ("x", "y", "action", "task", "key")}
        outputs = {"has_target": target_rows(batch), "y_hat": y_hat, "idm_action": idm_action, "metrics": metrics}
        return fields | outputs
