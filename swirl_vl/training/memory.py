"""The memory plan ``fit`` prints at its start: what the weights, gradients, optimiser state, KL references and one
RL micro-batch's activations will take on each device, at the configured sizes, before a step has run.

The static items are exact (they are counted from the tensors); activations are an estimate for transformer
backends (the tensors a decoder layer keeps for backward, plus the scored positions' logits) and are not estimated
for a diffusion FWM. ``runtime`` is what the process holds when fit starts (the libraries, the data pipeline and the
weights already loaded): the process's resident memory on CPU, the allocated memory on a GPU.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from swirl_vl.training.precision import DTYPES

if TYPE_CHECKING:
    from swirl_vl.training.swirl import SwirlModule

MIB = 2**20


def parameter_bytes(params: Iterable[nn.Parameter]) -> int:
    """Bytes of ``params`` on this device, each tensor counted once (a shared base appears under both models); of a
    parameter sharded by FSDP2, this process's shard."""
    unique = {id(p): p for p in params}
    return sum(_local(p).numel() * p.element_size() for p in unique.values())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def decoder_activation_bytes(
    config: Any, rows: int, tokens: int, scored: int, element_size: int = 4, head_rows: int | None = None
) -> int:
    """Activations a decoder-only transformer keeps for backward over ``rows × tokens`` positions.

    Per position and layer: the layer's inputs to its norms, projections and MLP, ``8·h + 3·i`` values (``h``
    hidden, ``i`` MLP width), and one row of attention probabilities per head (``heads × tokens``). Plus, for the
    ``rows × scored`` positions whose log-probs are taken, the logits and their gradient (``2 × vocab``, float32;
    ``head_rows``: the head computes that many vocabulary rows only, as a token FWM's image-code head does).
    """
    h, i = config.hidden_size, config.intermediate_size
    per_position = config.num_hidden_layers * (8 * h + 3 * i + config.num_attention_heads * tokens) * element_size
    return rows * tokens * per_position + rows * scored * 2 * (head_rows or config.vocab_size) * 4


def rollout_activation_bytes(policy: nn.Module, rows: int, group_size: int) -> int | None:
    """Estimated activations of scoring ``rows`` rollouts of ``policy`` with grad (None: no estimate for it).

    A group's prompt runs once (``grouped_tail_logits``), so prompt positions count ``rows / group_size`` times.
    """
    from swirl_vl.models.idm import VLMIDM
    from swirl_vl.models.token_fwm import TokenFWM
    from swirl_vl.models.token_idm import TokenIDM

    head_rows = None
    if isinstance(policy, TokenFWM):
        config, prompt, scored = policy.lm.config.get_text_config(), policy.image_length + 24, policy.image_length
        head_rows = len(policy.code_token_ids)  # code_logprobs' head computes the image codes only
    elif isinstance(policy, TokenIDM):
        config, prompt, scored = policy.lm.config.get_text_config(), 2 * policy.image_length + 5, policy.max_new_tokens
    elif isinstance(policy, VLMIDM):
        config = policy.model.config.get_text_config()
        vision = getattr(policy.model.config, "vision_config", None)
        patches = (vision.image_size // vision.patch_size) ** 2 if vision is not None else 256
        prompt, scored = 2 * patches + 48, policy.max_new_tokens
    else:
        return None
    element_size = next(policy.parameters()).element_size()
    tail = decoder_activation_bytes(config, rows, scored, scored, element_size, head_rows)
    head = decoder_activation_bytes(config, max(rows // group_size, 1), prompt, 0, element_size)
    return tail + head


def runtime_bytes(device: torch.device) -> int:
    """What the process holds now: allocated memory on a CUDA device, peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class MemoryPlan:
    """Bytes per item and the predicted peak of each stage (runtime + what that stage adds)."""

    items: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def table(self) -> str:
        lines = ["| item | MiB |", "|---|---|"]
        lines += [f"| {name} | {value / MIB:.1f} |" for name, value in self.items.items()]
        lines += [f"| **predicted peak, {stage}** | **{value / MIB:.1f}** |" for stage, value in self.stages.items()]
        return "\n".join(lines + [f"({note})" for note in self.notes])


def parked_bytes(module: SwirlModule, frozen: str, dtype: torch.dtype) -> int:
    """What parking ``frozen`` changes on its device (negative: frees): a ``dtype`` copy of its float weights is added;
    on a GPU its float32 data and its AdamW moments leave for CPU memory, on a CPU device they stay in the same memory
    (the moments are dropped with ``fresh_rl_optimizer``)."""
    floats = [p for p in getattr(module, frozen).model.parameters() if p.is_floating_point()]
    weights = parameter_bytes(floats)
    copy = sum(_local(p).numel() for p in {id(p): p for p in floats}.values()) * dtype.itemsize
    moments = 2 * parameter_bytes(module.trained_parameters(frozen))  # AdamW's, once it has stepped
    if module.device.type == "cpu":
        return copy - (moments if module.hparams.fresh_rl_optimizer else 0)
    return copy - weights - moments


def memory_plan(module: SwirlModule, runtime: int, rl_pairs: int | None) -> MemoryPlan:
    """The plan for ``module`` at its configured sizes; ``runtime``: what the process holds already (weights in);
    ``rl_pairs``: pairs per RL step (``rl_batch_size``, or the loader's batch size)."""
    h = module.hparams
    plan = MemoryPlan()
    trained = {which: parameter_bytes(module.trained_parameters(which)) for which in ("fwm", "idm")}
    weights = {which: parameter_bytes(getattr(module, which).model.parameters()) for which in ("fwm", "idm")}
    plan.items["runtime (libraries, data, weights loaded)"] = runtime
    for which in ("fwm", "idm"):
        plan.items[f"{which} weights (in runtime)"] = weights[which]
    # AdamW keeps two moments per trained parameter, for both models, from their first step on.
    adam = 2 * sum(trained.values())
    plan.items["AdamW state, both models"] = adam
    plan.items["gradients in SFT, both models"] = sum(trained.values())
    references = 0 if h.lora is not None else sum(weights.values())
    plan.items["KL references (full copies)" if h.lora is None else "KL references (LoRA: the base, no copy)"] = (
        references
    )
    plan.stages["sft"] = runtime + adam + sum(trained.values())
    frozen_dtype = DTYPES.get(h.get("frozen_dtype") or "")
    plan.notes.append("SFT activations are not estimated")
    for stage, which, group in (("phase1", "fwm", h.fwm_group_size), ("phase2", "idm", h.idm_group_size)):
        pairs = min(h.rl_micro_batch_size or rl_pairs or 0, rl_pairs or h.rl_micro_batch_size or 0)
        if not pairs:
            plan.notes.append(f"{stage} activations: set rl_batch_size or rl_micro_batch_size for an estimate")
            activations = 0
        else:
            estimate = rollout_activation_bytes(getattr(module, which).model, pairs * group, group)
            if estimate is None:
                plan.notes.append(
                    f"{stage} activations are not estimated for {type(getattr(module, which).model).__name__}"
                )
            activations = estimate or 0
            plan.items[f"{stage} activations, {pairs * group} rollouts per micro-batch (estimate)"] = activations
        plan.items[f"gradients in {stage} ({which})"] = trained[which]
        parked = 0
        if frozen_dtype is not None:
            parked = parked_bytes(module, "idm" if which == "fwm" else "fwm", frozen_dtype)
            plan.items[f"{stage}: frozen model parked, {frozen_dtype} copy (change)"] = parked
        plan.stages[stage] = runtime + adam + references + trained[which] + activations + parked
    return plan
