"""The two model interfaces every backend implements, and the rollout record GRPO consumes.

Conventions (README, "Layout"):
- images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``; actions are ``list[str]``;
- a rollout of ``G`` samples per condition is ordered group-major: row ``b * G + g`` is sample ``g``
  of condition ``b`` (what ``repeat_interleave(G, 0)`` produces);
- ``rollout_logprobs`` returns per-token (or per-denoising-step) log-probs with grad, ``(N, L)``,
  and a boolean mask ``(N, L)`` of the positions that count.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from swirl_vl.rl.grpo import k3_kl


@dataclass
class Rollout:
    """``N = B * G`` sampled outputs with what is needed to re-score them under other weights."""

    group_size: int
    old_logprobs: Tensor
    """``(N, L)`` log-probs recorded at sampling time (no grad)."""
    mask: Tensor
    """``(N, L)`` bool: positions that are real tokens / trainable denoising steps."""
    images: Tensor | None = None
    """FWM rollouts: ``(N, 3, H, W)`` in ``[0, 1]``."""
    texts: list[str] | None = None
    """IDM rollouts: ``N`` action texts."""
    context: dict[str, Tensor] = field(default_factory=dict)
    """Backend-specific tensors (token ids, latents, conditioning) that ``rollout_logprobs`` needs."""
    temperature: float = 1.0
    """Sampling temperature of token rollouts: old and new log-probs are scored on logits divided by it, so that the
    policy GRPO optimises is the one that sampled (as TRL does; top-k / top-p truncation is not re-applied)."""

    def __post_init__(self) -> None:
        assert self.old_logprobs.shape == self.mask.shape, (self.old_logprobs.shape, self.mask.shape)

    @property
    def num_samples(self) -> int:
        return self.old_logprobs.shape[0]

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(
            group_size=self.group_size,
            old_logprobs=self.old_logprobs.to(device),
            mask=self.mask.to(device),
            images=None if self.images is None else self.images.to(device),
            texts=self.texts,
            context={k: v.to(device) for k, v in self.context.items()},
            temperature=self.temperature,
        )


@dataclass
class PolicyScores:
    """What a GRPO update needs from the policy for one rollout batch."""

    logp: Tensor
    """``(N, L)`` log-probs under the current weights, with grad."""
    mask: Tensor
    """``(N, L)`` bool, as the rollout's."""
    kl: Tensor | None
    """``(N, L)`` per-position estimate of ``KL(π ‖ π_ref)``, with grad; None without a reference."""


class GRPOPolicy(nn.Module, ABC):
    """What both world models share as GRPO policies: scoring a rollout and its KL to a reference policy."""

    fsdp2_unsupported: ClassVar[str | None] = None
    """Why this backend cannot run sharded by FSDP2 (``swirl_vl.training.fsdp``), or None: it can."""

    @abstractmethod
    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Log-probs ``(N, L)`` of the rollout's samples under the current weights (with grad), and the mask."""

    def policy_scores(self, rollout: Rollout, reference: GRPOPolicy | None = None) -> PolicyScores:
        """Log-probs and the per-token k3 KL to ``reference`` (``exp(r) − r − 1``, ``r = log π_ref − log π``).

        Token policies: k3 is an unbiased, non-negative estimate of the KL of the sampled token. Backends whose
        positions are continuous (diffusion steps) override this with a closed form.
        """
        if reference is None:
            return PolicyScores(*self.rollout_logprobs(rollout), None)
        with torch.no_grad():  # first: its activations are freed before the policy's graph is built
            ref_logp, _ = reference.rollout_logprobs(rollout)
        logp, mask = self.rollout_logprobs(rollout)
        return PolicyScores(logp, mask, k3_kl(logp, ref_logp, mask))


class ForwardWorldModel(GRPOPolicy):
    """``P_θ(y | x, z)``: edits image ``x`` under action text ``z`` into the next image ``y``."""

    image_size: int

    @abstractmethod
    def sft_loss(self, x: Tensor, z: list[str], y: Tensor) -> Tensor:
        """Supervised loss (scalar) on labelled pairs."""

    @abstractmethod
    def sample(self, x: Tensor, z: list[str], num_samples: int = 1, greedy: bool = False, **gen) -> Rollout:
        """``num_samples`` next states per condition; ``greedy`` gives the deterministic mode used for eval."""

    @abstractmethod
    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Log-probs ``(N, L)`` of the rollout's samples under the current weights (with grad), and the mask."""

    @abstractmethod
    def log_likelihood(self, x: Tensor, z: list[str], y: Tensor, group_size: int = 1) -> Tensor:
        """``(B,)`` estimate of ``log P(y | x, z)`` (Phase II reward). No grad.

        Rows in consecutive blocks of ``group_size`` share any random draws (diffusion ELBO), so that
        the noise cancels in group-relative advantages.
        """

    @abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write the model in its Hugging Face format (loadable by transformers / diffusers)."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path) -> ForwardWorldModel:
        """Load a model written by ``save_pretrained`` (or a real checkpoint in the same format)."""


class InverseDynamicsModel(GRPOPolicy):
    """``Q_φ(z | x, y)``: says which action text turned image ``x`` into image ``y``."""

    image_size: int

    @abstractmethod
    def sft_loss(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        """Supervised loss (scalar): mean token negative log-likelihood of ``z``."""

    @abstractmethod
    def sample(self, x: Tensor, y: Tensor, num_samples: int = 1, greedy: bool = False, **gen) -> Rollout:
        """``num_samples`` action texts per pair, with token ids and old log-probs (``rollout.texts``)."""

    @abstractmethod
    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Per-token log-probs ``(N, L)`` of the rollout's texts under the current weights, and the mask."""

    @abstractmethod
    def log_likelihood(self, x: Tensor, y: Tensor, z: list[str]) -> Tensor:
        """``(B,)`` mean-token ``log Q(z | x, y)`` (Phase I reward). No grad."""

    @abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write the model and its processor in the Hugging Face format."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path) -> InverseDynamicsModel:
        """Load a model written by ``save_pretrained`` (or a real checkpoint in the same format)."""


def check_sampling_settings(model: nn.Module, settings: dict | None, flag: str) -> None:
    """Raise now, not at the first RL step, if ``settings`` are not keyword arguments of ``model.sample``: a name it
    does not take, or a value that is not a number where it takes one."""
    taken = {
        name: p
        for name, p in inspect.signature(model.sample).parameters.items()
        if name not in ("self", "x", "y", "z", "num_samples", "greedy")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for name, value in (settings or {}).items():
        if name not in taken:
            raise ValueError(
                f"{flag}: {type(model).__name__} samples with {', '.join(sorted(taken))}; it takes no {name!r}"
            )
        default = taken[name].default
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{flag}: {name} must be a number (default {default}); got {value!r}")


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass instead of keeping them (its library's own switch:
    transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before 5.2x), non-reentrant, or
    diffusers' ``enable_gradient_checkpointing``)."""
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    else:
        raise ValueError(f"{type(module).__name__} has no gradient checkpointing switch")


def missing_checkpoint_error(path: str | Path, what: str, fix: str) -> FileNotFoundError:
    """The one error every loader raises for a model folder that is not there."""
    return FileNotFoundError(f"{what} not found at '{path}'. {fix}")


def write_folder_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling folder, then rename it to ``path`` (a no-op if another process won).

    The rename is atomic, so concurrent ranks and crashed runs never leave a half-written folder at ``path``;
    a process that loses the race discards its copy (every rank builds the same seeded weights). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        os.rename(tmp, path)  # fails if the folder exists
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


SETTINGS_FILE = "swirl_vl.json"
"""Written by ``save_pretrained`` beside the library's own files: the backend settings reloading needs (an IDM's
prompt, the image size a token model was trained at), which the library's config does not hold."""


def saved_settings(folder: str | Path) -> dict[str, Any]:
    """The settings a ``save_pretrained`` folder was written with; ``{}`` for a folder from elsewhere."""
    file = Path(folder) / SETTINGS_FILE
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except ValueError as exn:
        raise ValueError(f"'{file}' is not valid JSON ({exn}): delete it to load the folder with defaults") from exn
    if not isinstance(settings, dict):
        raise ValueError(f"'{file}' must hold a JSON object")
    return settings


def write_settings(folder: str | Path, settings: dict[str, Any]) -> None:
    """Write ``settings`` to ``folder/swirl_vl.json`` (a temporary name, then a rename)."""
    file = Path(folder) / SETTINGS_FILE
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, file)
